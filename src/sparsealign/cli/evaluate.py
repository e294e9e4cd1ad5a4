"""``sparsealign evaluate SAMPLES --metrics ...``: text, diversity and model metrics of a sample file.

Metrics (``sparsealign.eval.metrics`` gives each formula and library): ``kl`` (sequence and per-token KL
of the samples to ``--reference``, teacher-forced under ``--model``), ``rouge``, ``bertscore`` (against the
``reference`` column), ``self-bleu``, ``distinct``, ``entropy`` (of ``--model`` along the samples),
``reward-accuracy`` (implicit reward of the run ``--model`` on held-out pairs), ``edna`` (with ``--nli``).
A metric that cannot run here (its model not obtainable offline, no NLI model) is reported unavailable
with what to do; the others are still computed. The summary goes to ``<stem>.evaluate.json`` beside
SAMPLES and is printed as a table.
"""

from __future__ import annotations

import argparse
import functools

HELP = (
    "Metrics of a sample file: KL to a reference, ROUGE, BERTScore, self-BLEU, distinct-n, entropy, EDNA..."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    from sparsealign.eval.metrics import DEFAULT_METRICS, METRICS

    parser.add_argument(
        "samples", metavar="SAMPLES", help="A sample file (JSONL, as `sparsealign sample` writes)."
    )
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"Comma-separated, from: {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)}).",
    )
    parser.add_argument(
        "--model",
        metavar="MODEL_OR_RUN",
        help="The model that drew the samples (kl, entropy): a run folder or a built-in, folder or hub id; "
        "reward-accuracy needs a run folder.",
    )
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="The reference model for kl (default for a run: the reference it trained against).",
    )
    parser.add_argument("--nli", metavar="MODEL", help="An NLI classifier (hub id or folder) for edna.")
    parser.add_argument(
        "--bertscore-model",
        metavar="M",
        help="The BERTScore model: a name bert-score knows or a local folder (default: roberta-large).",
    )
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="Preference pairs for reward-accuracy (default: the run's held-out split).",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences per forward (default 16).")


def _check_inputs(specs: list, args: argparse.Namespace, is_run: bool) -> None:
    from sparsealign.errors import ConfigError

    for spec in specs:
        if "model" in spec.needs and not args.model:
            raise ConfigError(f"{spec.name} needs --model MODEL_OR_RUN (the model that drew the samples).")
        if "run" in spec.needs and not is_run:
            raise ConfigError(
                f"{spec.name} needs --model RUN, a run folder (config.yaml and final/): its beta, reference "
                "and held-out pairs define the implicit reward."
            )
        if "reference" in spec.needs and not (args.reference or is_run):
            raise ConfigError(
                f"{spec.name} needs --reference MODEL (or --model RUN, whose reference is used)."
            )


def _same_vocabulary(policy_tokenizer, reference_tokenizer, name: str) -> None:
    from sparsealign.errors import ModelError

    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ModelError(
            f"--reference {name} has a different tokenizer than the model; the KL is read at the sampled "
            "token ids, so both must share one vocabulary."
        )


def run(args: argparse.Namespace) -> int:
    from sparsealign.eval.metrics import MetricContext, get_metrics
    from sparsealign.eval.metrics.models import default_device, load_run_reference
    from sparsealign.eval.run_model import is_run_folder, load_eval_model
    from sparsealign.eval.score import evaluate_samples

    specs = get_metrics(args.metrics)
    is_run = bool(args.model) and is_run_folder(args.model)
    _check_inputs(specs, args, is_run)
    device = default_device()

    # Loaded on first use and kept, so kl and entropy load the policy once.
    policy = functools.cache(lambda: load_eval_model(args.model, device))
    run_config = functools.cache(lambda: policy().config)
    run_reference = functools.cache(lambda: load_run_reference(run_config(), device))

    @functools.cache
    def reference():
        if not args.reference:
            return run_reference()
        loaded = load_eval_model(args.reference, device)
        _same_vocabulary(policy().tokenizer, loaded.tokenizer, args.reference)
        return loaded.model.requires_grad_(False)

    ctx = MetricContext(
        policy=policy if args.model else None,
        reference=reference if (args.reference or is_run) else None,
        run_config=run_config if is_run else None,
        run_reference=run_reference if is_run else None,
        nli=args.nli,
        bertscore_model=args.bertscore_model,
        data=args.data,
        batch_size=args.batch_size,
    )
    config = {
        "metrics": [spec.name for spec in specs],
        "model": args.model,
        "reference": args.reference or (f"{args.model} (the run's reference)" if is_run else None),
        "nli": args.nli,
        "bertscore_model": args.bertscore_model,
        "data": args.data,
    }
    evaluate_samples(args.samples, specs, ctx, config)
    return 0
