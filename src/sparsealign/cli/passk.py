"""``sparsealign passk SAMPLES --k 1,10,100 --timeout SECONDS --out FILE``: pass@k of code samples.

Every sample (a row with ``task_id``, ``output`` and ``tests``, or a row in MBPP's or HumanEval's layout) runs
with its tests in the sandbox of :mod:`sparsealign.eval.sandbox`; the estimator is Chen et al. 2021's
(:mod:`sparsealign.eval.passk`). ``FILE`` gets one line per task and the summary as its last line,
``<FILE stem>.samples.jsonl`` one line per sample; the summary is also written beside SAMPLES
(``<stem>.passk.json``) and printed as a table.
"""

from __future__ import annotations

import argparse
import os

HELP = "pass@k of code samples (MBPP, HumanEval or task_id/output/tests rows), each run in a sandbox."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument(
        "samples", metavar="SAMPLES", help="JSONL samples: task_id, output and the task's tests."
    )
    parser.add_argument(
        "--k",
        metavar="K[,K...]",
        default="1,10,100",
        help="The k of pass@k, comma-separated (default 1,10,100).",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="Wall-clock seconds per program (default 5); CPU time: that, rounded up, +1 s.",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        required=True,
        help="Output JSONL: one line per task, then the summary as the last line.",
    )
    parser.add_argument(
        "--workers",
        metavar="W",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="Programs run at once (default: min(4, CPUs)).",
    )
    parser.add_argument(
        "--memory-mb",
        metavar="M",
        type=int,
        default=1024,
        help="Address-space limit per program in MB (default 1024).",
    )


def parse_ks(text: str) -> list[int]:
    """``"1,10,100"`` → ``[1, 10, 100]`` (sorted, without repeats); anything else is a DataError."""
    from sparsealign.errors import DataError

    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise DataError(
            f"--k {text!r}: give positive integers separated by commas, e.g. --k 1,10,100"
        ) from None
    if not ks or ks[0] < 1:
        raise DataError(f"--k {text!r}: give positive integers separated by commas, e.g. --k 1,10,100")
    return ks


def format_table(summary: dict) -> str:
    """The summary as a small table: each pass@k (or why not computable), then the counts."""
    from sparsealign.eval.sandbox import STATUSES

    lines = []
    for key, value in summary.items():
        if key.startswith("pass@"):
            shown = f"{value:.4f}" if value is not None else "n/a: " + summary["not_computable"][key]
            lines.append(f"{key:<10} {shown}")
    lines.append(f"{'tasks':<10} {summary['tasks']}")
    lines.append(f"{'samples':<10} {summary['samples']}")
    lines.extend(f"{status:<10} {summary[status]}" for status in STATUSES)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    from sparsealign.errors import DataError
    from sparsealign.eval.passk import evaluate_passk
    from sparsealign.eval.samples import summary_path
    from sparsealign.eval.sandbox import Limits
    from sparsealign.io import atomic_write

    ks = parse_ks(args.k)
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, not {args.workers}")
    try:
        limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
    except ValueError as error:
        raise DataError(f"--timeout/--memory-mb: {error}") from None
    summary = evaluate_passk(args.samples, args.out, ks, limits, workers=args.workers)
    beside = summary_path(args.samples, "passk")
    with atomic_write(beside) as handle:
        handle.write(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"per task and summary: {args.out}; per sample: {summary['results']}; summary: {beside}")
    return 0
