"""``sparsealign data RECIPE [key=value ...] [--show N] [--split train|eval] [--json]``: how the recipe's
data is read and tokenised (counts per source, drops per reason with their first origins, length
percentiles, boundary fallbacks) and N examples rendered with the prompt/response boundary marked.
See :mod:`sparsealign.data.inspect`."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "Show how a recipe's data is read and tokenised: counts, drops, lengths, examples with boundaries."
BOUNDARY = "⟦▶⟧"
"""Printed between the prompt and a response: the exact point where the response's tokens start."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    from sparsealign.cli import RECIPE_HELP

    parser.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]", help=RECIPE_HELP)
    parser.add_argument("--show", type=int, default=3, metavar="N", help="Examples to show (default 3).")
    parser.add_argument("--split", default="train", choices=("train", "eval"), help="Which split (train).")
    parser.add_argument(
        "--json",
        action="store_true",
        help="One JSON object per shown example, then a summary object (examples, dropped, boundary_fallbacks).",
    )


class _LazyBundle:
    """The run's models, loaded only if a named source asks for them (``imdb`` samples with the policy)."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self._bundle: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._bundle is None:
            from sparsealign.models.loading import load_bundle

            cfg = self._config
            self._bundle = load_bundle(cfg.model, cfg.train.seed, reference=cfg.reference)
        return getattr(self._bundle, name)


def _context(config: Any) -> dict[str, Any]:
    from sparsealign.data.prepare import LazyReward

    return {
        "bundle": _LazyBundle(config),
        "reward": LazyReward(config.reward),
        "model_id": config.model.name,
        "is_main_process": True,
    }


def _print_report(inspection: Any, show: int) -> None:
    summary = inspection.summary()
    print(f"{inspection.split} split read from {inspection.read_from}: {summary['rows']} rows")
    for source, count in inspection.per_source.most_common():
        print(f"  {source}: {count} examples")
    if inspection.dropped:
        print("dropped:")
        for reason, count in inspection.dropped.most_common():
            where = ", ".join(inspection.first_origins.get(reason, []))
            print(f"  {reason}: {count}" + (f" (first: {where})" if where else ""))
    else:
        print("dropped: none")
    print(f"boundary fallbacks: {inspection.boundary_fallbacks}")
    print(f"\n{'tokens':10}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}")
    for name, values in summary["lengths"].items():
        cells = "".join(f"{values.get(key, '-'):>7}" for key in ("p50", "p90", "p99", "max"))
        print(f"{name:10}{cells}")
    for index, example in enumerate(inspection.examples[:show], start=1):
        print(
            f"\n── example {index} ({example.origin or example.source}): prompt {example.prompt_tokens} tokens, "
            f"chosen {example.chosen_tokens}, rejected {example.rejected_tokens}"
            + (" · boundary fallback" if example.boundary_fallback else "")
        )
        print(f"[chosen]   {example.prompt_text}{BOUNDARY}{example.chosen_text}")
        print(f"[rejected] {example.prompt_text}{BOUNDARY}{example.rejected_text}")


def run(args: argparse.Namespace) -> int:
    """Read, tokenise and report."""
    from sparsealign.cli import _split_args
    from sparsealign.data.inspect import inspect_data
    from sparsealign.models.loading import load_tokenizer
    from sparsealign.recipes.load import load_config

    recipe, overrides = _split_args(args.args)
    config = load_config(recipe, overrides)
    inspection = inspect_data(config, load_tokenizer(config.model), args.split, _context(config))
    if args.json:
        for example in inspection.examples[: args.show]:
            print(json.dumps(example.to_json(), ensure_ascii=False))
        print(json.dumps(inspection.summary(), ensure_ascii=False))
    else:
        _print_report(inspection, args.show)
    return 0
