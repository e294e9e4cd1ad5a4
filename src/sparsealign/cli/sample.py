"""``sparsealign sample MODEL_OR_RUN --prompts SOURCE ...``: sample a model or a run on a prompt set.

The logic is :mod:`sparsealign.eval.sampling`; this module parses arguments and prints what happened.
"""

from __future__ import annotations

import argparse

HELP = "Sample a run or a model on a prompt set (N samples per prompt per temperature) into a JSONL file."

FORMATS = ("jsonl", "alpacaeval", "arenahard")


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument(
        "model",
        metavar="MODEL_OR_RUN",
        help="A run folder (its final/ model or LoRA adapter, with the run's own prompt formatting) or "
        "anything model.name accepts (built-in, folder, hub id).",
    )
    parser.add_argument(
        "--prompts",
        required=True,
        metavar="SOURCE",
        help="A data file (.jsonl/.json/.parquet/.csv), a dataset folder, a recipe (its held-out split) or a "
        "named data source.",
    )
    parser.add_argument(
        "--split", help="eval (default) or train for recipes and sources; a split name for dataset folders."
    )
    parser.add_argument("--limit", type=int, metavar="K", help="Use the first K prompts only.")
    parser.add_argument(
        "--n", type=int, default=1, metavar="N", help="Samples per prompt at each temperature."
    )
    parser.add_argument(
        "--temperatures",
        type=_temperatures,
        default=(1.0,),
        metavar="T1,T2,...",
        help="Temperatures, e.g. 0,0.25,0.5,0.75,1.0 (0 decodes greedily). Default 1.",
    )
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="Nucleus sampling threshold.")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, metavar="M", help="Tokens per sample at most."
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="Sampling seed (reproducible per seed)."
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="B", help="Prompts per generation call."
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="Output file; rerunning with the same FILE resumes."
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="jsonl",
        help="jsonl: sparsealign's sample rows; alpacaeval: a JSON list of {instruction, output, generator}; "
        "arenahard: Arena-Hard's answer JSONL. The other formats also keep the sample rows in "
        "<FILE stem>.samples.jsonl (what a rerun resumes from).",
    )
    parser.add_argument(
        "--name", help="Model name written in the files (default: the run folder's or model's name)."
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="Wrap plain-text prompts in a user message rendered with the chat template (instruction rows "
        "and conversations always are).",
    )
    parser.add_argument(
        "--control",
        choices=("good", "bad"),
        help="Conditional-SFT runs: append the run's good (or bad) control text to every prompt.",
    )


def run(args: argparse.Namespace) -> int:
    """Load, sample (resuming), and write the requested format."""
    import json
    from pathlib import Path

    import torch

    from sparsealign.eval.run_model import load_eval_model
    from sparsealign.eval.samples import read_rows, write_rows
    from sparsealign.eval.sampling import (
        SampleSettings,
        alpacaeval_records,
        arenahard_records,
        encode_prompts,
        load_prompts,
        sample_to_file,
    )
    from sparsealign.io import atomic_write

    settings = SampleSettings(
        n=args.n,
        temperatures=tuple(args.temperatures),
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        control=args.control,
    )
    out = Path(args.out)
    if args.format != "jsonl" and (args.n != 1 or len(settings.temperatures) != 1):
        from sparsealign.errors import DataError

        raise DataError(f"--format {args.format} takes one answer per prompt: use --n 1 and one temperature.")
    device = "cuda" if torch.cuda.is_available() else None
    model = load_eval_model(args.model, device)
    if args.name:
        model.label = args.name
    items = load_prompts(args.prompts, model.tokenizer, args.split, args.limit, model.config, chat=args.chat)
    items, dropped = encode_prompts(items, model.tokenizer, model.data)
    if not items:
        from sparsealign.errors import DataError

        raise DataError(f"no prompt of '{args.prompts}' could be formatted for this model ({dict(dropped)}).")
    samples = out if args.format == "jsonl" else out.with_name(f"{out.stem}.samples.jsonl")
    written, kept = sample_to_file(model, items, settings, samples, source=args.prompts)
    if args.format != "jsonl":
        rows = read_rows(samples)
        if args.format == "alpacaeval":
            with atomic_write(out) as handle:
                json.dump(alpacaeval_records(rows, model.label), handle, ensure_ascii=False, indent=1)
        else:
            write_rows(out, arenahard_records(rows, model.label, model.tokenizer))
    resumed = f" ({kept} already there)" if kept else ""
    print(f"{written} samples written to {samples}{resumed}; {len(items)} prompts, model {model.label}")
    if samples != out:
        print(f"{args.format} file: {out}")
    return 0
