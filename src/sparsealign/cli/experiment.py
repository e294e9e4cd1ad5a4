"""``sparsealign experiment imdb-frontier``: the SparsePO paper's IMDB reward-vs-KL frontier at laptop scale.

Trains every method at every β on the IMDB default (one run per cell, :mod:`sparsealign.eval.frontier`),
then writes ``DIR/frontier.csv``, ``frontier.json``, ``frontier.png`` and ``index.html``. Rerunning skips
finished cells and continues an interrupted one.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from sparsealign.eval.frontier import (
    BETA_FACTORS,
    DEFAULT_METHODS,
    QUICK_BETA_FACTORS,
    QUICK_OVERRIDES,
)

HELP = (
    "Train each method at each β on IMDB and plot mean reward against KL (the SparsePO paper's IMDB figure)."
)

DEFAULT_OUT = "runs/imdb-frontier"
QUICK_OUT = "runs/imdb-frontier-quick"


def _factors(factors: tuple[float, ...]) -> str:
    return ", ".join(f"{f:g}" for f in factors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.description = (
        f"{HELP}\n\nEach cell is one run of the method's built-in recipe imdb/<method> with method.beta set and "
        "eval.generate=true; its report's policy reward and sequence KL (mean ± sem over the held-out samples) "
        "is the point. The model, reward, sampled pairs and reference caches are shared by all cells.\n\n"
        f"--quick: 2 βs per method (× {_factors(QUICK_BETA_FACTORS)} of the recipe's β: dpo/tdpo1/tdpo2/sparsepo/"
        f"mapo 0.05 and 0.2, simpo and fpo 1 and 4; fpo only once its built-in SAE is built) and "
        f"{', '.join(QUICK_OVERRIDES)} (about 105 s a cell here, 21-26 minutes in all); the pairs, reward and "
        "model are the IMDB default's (384 training pairs, 64 held-out prompts). docs/frontier.md has the "
        "timing. Without --quick: βs × "
        f"{_factors(BETA_FACTORS)} of the recipe's β, each run the full recipe (one epoch, 48 steps)."
    )
    parser.add_argument("experiment", choices=["imdb-frontier"], help="The experiment to run.")
    _add_options(parser)
    parser.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="key=value",
        help="Config overrides applied to every cell (after the experiment's name, mixed with the options).",
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods",
        default=None,
        help=f"Comma-separated methods, each with a β option (default: {','.join(DEFAULT_METHODS)}; with --quick "
        "without fpo while FPO's built-in SAE is not built yet).",
    )
    parser.add_argument(
        "--betas",
        action="append",
        default=[],
        metavar="[METHOD=]LIST",
        help="βs, e.g. 0.05,0.1,0.2 for every method, or simpo=1,2,4 for one (repeat the option; a method's own "
        "list wins). Default: multiples of each method's recipe β (see above).",
    )
    parser.add_argument("--quick", action="store_true", help="Fewer βs and steps (see above).")
    parser.add_argument(
        "--out", default=None, help=f"Output folder (default {DEFAULT_OUT}, with --quick {QUICK_OUT})."
    )


def parse_rest(args: argparse.Namespace) -> argparse.Namespace:
    """Options and ``key=value`` overrides given after the experiment's name (argparse hands them over
    unparsed, so that overrides may come last): parsed here into ``args.overrides``."""
    extra = argparse.ArgumentParser(prog="sparsealign experiment imdb-frontier", add_help=False)
    _add_options(extra)
    extra.add_argument("overrides", nargs="*")
    return extra.parse_intermixed_args(args.rest, namespace=args)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparsealign.api import train
    from sparsealign.errors import ConfigError
    from sparsealign.eval.frontier import (
        Experiment,
        Interrupted,
        expand_grid,
        parse_betas,
        run_experiment,
        summarize,
        unbuilt_saes,
    )

    args = parse_rest(args)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides are key=value; got {' '.join(bad)}.")
    methods = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods names no method.")
    out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    cells = expand_grid(methods, out, parse_betas(args.betas), args.quick, args.overrides)
    for name, users in unbuilt_saes(cells).items():
        build = f"`sparsealign sae train --builtin {name}`"
        if args.quick and args.methods is None:  # the default grid must fit --quick's time: leave them out
            cells = [c for c in cells if c.method not in users]
            methods = [m for m in methods if m not in users]
            print(
                f"note: --quick leaves out {', '.join(users)}: the built-in SAE {name} is not built yet and "
                f"training it takes about 16 minutes on 2 cores. Build it with {build}, then rerun to add it "
                "(the finished cells are kept).",
                file=sys.stderr,
            )
        else:
            print(
                f"note: the built-in SAE {name} ({', '.join(users)}) is not built yet; the first cell that needs "
                f"it trains it once (about 16 minutes on 2 cores; or build it ahead with {build}).",
                file=sys.stderr,
            )
    settings = {
        "command": "sparsealign " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "",
        "quick": args.quick,
        "methods": ",".join(methods),
        "cells": len(cells),
        "cell overrides": " ".join((*(QUICK_OVERRIDES if args.quick else ()), *args.overrides)),
    }
    print(f"imdb-frontier: {len(cells)} cells ({', '.join(c.name for c in cells)}) into {out}", flush=True)
    try:
        rows = run_experiment(Experiment(cells, out, settings), train)
    except Interrupted as stop:
        print(
            f"\n{stop}; the finished cells are in {out}. Rerun the same command to continue.", file=sys.stderr
        )
        return 130
    print(summarize(rows))
    print(f"wrote {out / 'frontier.csv'}, {out / 'frontier.png'}, {out / 'index.html'}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} cell(s) failed (see the error column and the log above).", file=sys.stderr)
        return 1
    return 0
