"""``sparsealign report RUN``: write the run's self-contained HTML page, ``RUN/report/index.html``."""

from __future__ import annotations

import argparse

HELP = "Write RUN/report/index.html: config, curves, evaluation tables, samples (one file, no server)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument("run", metavar="RUN", help="A run folder (config.yaml, metrics.jsonl, report/).")
    parser.add_argument(
        "--samples",
        type=int,
        default=4,
        metavar="N",
        help="Prompts of report/samples.jsonl shown, each with one generation per model (default 4).",
    )


def run(args: argparse.Namespace) -> int:
    from sparsealign.errors import ConfigError
    from sparsealign.eval.run_report import write_run_report

    if args.samples < 0:
        raise ConfigError(f"--samples must be 0 or more, got {args.samples}.")
    path = write_run_report(args.run, samples_per_model=args.samples)
    print(f"Run report: {path}")
    print(f"Open it in a browser: file://{path.resolve()}")
    return 0
