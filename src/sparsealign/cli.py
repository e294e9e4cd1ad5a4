"""The ``sparsealign`` command line.

``sparsealign train [RECIPE] [key=value ...]`` trains; with no recipe it runs the embedded default,
``configs/imdb/sparsepo.yaml``. ``sparsealign cache RECIPE`` stores a recipe's reference outputs (the
offline reference cache). ``sparsealign config [RECIPE] [key=value ...]`` prints the resolved config
(``--keys`` lists every key with its help). Heavy libraries are imported only inside the commands, so
``sparsealign --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_RECIPE = "configs/imdb/sparsepo.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]

COMMANDS = {
    "train": "Train a policy with a recipe (default: SparsePO on IMDB with SmolLM2, fully offline).",
    "config": "Print the fully resolved configuration of a recipe, or list every key with --keys.",
    "cache": "Run the reference once over a recipe's data and store its outputs (training then runs none).",
    "masks": "Write an HTML page colouring response tokens by their SparsePO/MaPO reward and KL masks.",
}


def resolve_recipe(recipe: str | None) -> Path:
    """A recipe path as given, else relative to the repository's ``configs/`` folder."""
    name = recipe or DEFAULT_RECIPE
    for candidate in (Path(name), REPO_ROOT / name, REPO_ROOT / "configs" / name):
        if candidate.is_file():
            return candidate
    from sparsealign.config import ConfigError

    raise ConfigError(
        f"Recipe '{name}' not found (looked in the current folder and {REPO_ROOT / 'configs'})."
    )


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is the recipe unless it is an override (contains '=')."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "accelerate", "datasets", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    from sparsealign.config import load_config

    recipe, overrides = _split_args(args.args)
    config = load_config(resolve_recipe(recipe), overrides)
    from sparsealign.train.loop import train

    result = train(config)
    if result.interrupted:
        print(
            f"Interrupted at step {result.steps}; a checkpoint is in {result.output_dir}/checkpoints. "
            "Continue with train.resume=auto.",
            file=sys.stderr,
        )
        return 130
    print(f"Done: {result.steps} steps; run folder {result.output_dir}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from sparsealign.config import Config, describe, load_config, to_dict

    if args.keys:
        for key, default, text in describe(Config):
            print(f"{key:28s} {default:22s} {text}")
        return 0
    import yaml

    recipe, overrides = _split_args(args.args)
    config = load_config(resolve_recipe(recipe), overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from sparsealign.config import load_config

    recipe, overrides = _split_args(args.args)
    config = load_config(resolve_recipe(recipe), overrides)
    from sparsealign.refcache.build import cache_run

    folder, built = cache_run(config, force=args.force)
    print(f"{'Wrote' if built else 'Up to date:'} {folder}; train with reference.cache={folder}")
    return 0


def _cmd_masks(args: argparse.Namespace) -> int:
    from sparsealign.eval.masks_page import write_masks_page

    path = write_masks_page(args.run, args.n)
    print(f"Wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsealign",
        description="Sparse preference optimisation and the DPO family for language models.",
        epilog="Example: sparsealign train configs/imdb/dpo.yaml method.beta=0.2 train.max_steps=50",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    train = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    train.add_argument(
        "args", nargs="*", metavar="[RECIPE] [key=value ...]", help="A YAML recipe and dotted overrides."
    )
    train.set_defaults(func=_cmd_train)
    config = sub.add_parser("config", help=COMMANDS["config"], description=COMMANDS["config"])
    config.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]")
    config.add_argument("--keys", action="store_true", help="List every key, its default and its meaning.")
    config.set_defaults(func=_cmd_config)
    cache = sub.add_parser("cache", help=COMMANDS["cache"], description=COMMANDS["cache"])
    cache.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]")
    cache.add_argument("--force", action="store_true", help="Rebuild even a cache that exists.")
    cache.set_defaults(func=_cmd_cache)
    masks = sub.add_parser("masks", help=COMMANDS["masks"], description=COMMANDS["masks"])
    masks.add_argument("run", help="A run folder of a sparsepo or mapo run.")
    masks.add_argument("--n", type=int, default=8, help="Number of held-out pairs to show.")
    masks.set_defaults(func=_cmd_masks)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging(args.verbose)
    from sparsealign.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
