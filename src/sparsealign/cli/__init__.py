"""The ``sparsealign`` command line.

``sparsealign train [RECIPE] [key=value ...]`` trains; with no recipe it runs the default,
``imdb/sparsepo``. A RECIPE is a YAML file or the name of a built-in recipe (``smoke``, ``imdb/dpo``;
``sparsealign recipes`` lists them, see :mod:`sparsealign.recipes`). ``sparsealign cache RECIPE`` stores a
recipe's reference outputs (the offline reference cache). ``sparsealign config [RECIPE] [key=value ...]``
prints the resolved config (``--keys`` lists every key with its help). ``sparsealign train --nproc N`` runs N
processes through ``accelerate launch``; ``sparsealign push RUN --repo-id NAME`` uploads ``RUN/final``. Heavy libraries are imported only
inside the commands, so ``sparsealign --help`` answers at once.

The evaluation and data commands live in their own modules here (``sparsealign.cli.sample`` ...), each with
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; :data:`COMMAND_MODULES` lists them in the
order ``--help`` shows them. Such a module imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from sparsealign.recipes import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    builtin_recipes,
    recipe_description,
    resolve_recipe,
)
from sparsealign.version import __version__

COMMANDS = {
    "train": "Train a policy with a recipe (default: SparsePO on IMDB with SmolLM2, fully offline).",
    "config": "Print the fully resolved configuration of a recipe, or list every key with --keys.",
    "cache": "Run the reference once over a recipe's data and store its outputs (training then runs none).",
    "masks": "Write an HTML page colouring response tokens by their SparsePO/MaPO reward and KL masks.",
    "sae": "Sparse autoencoders: `sae train` trains a TopK SAE on a model's activations (or a built-in).",
    "recipes": "List the built-in recipes (run one by name: sparsealign train NAME) with their descriptions.",
    "push": "Upload a run's final model or LoRA adapter, with its model card, to the Hugging Face hub.",
}
COMMAND_MODULES = (
    "sample",
    "judge",
    "score",
    "evaluate",
    "passk",
    "experiment",
    "report",
    "export",
    "data",
)
"""The commands with a module of their own in ``sparsealign.cli`` (``sparsealign.cli.<name>``)."""
RECIPE_HELP = (
    f"A YAML recipe file or a built-in recipe's name (`sparsealign recipes` lists them; default: "
    f"{DEFAULT_RECIPE}), then dotted key=value overrides."
)


def _split_args(args: list[str]) -> tuple[Path, list[str]]:
    """The recipe file and the overrides: the first argument is the recipe (a file or a built-in name) unless
    it is an override (contains '='); without one, the default recipe."""
    if args and "=" not in args[0]:
        return resolve_recipe(args[0]), args[1:]
    return resolve_recipe(DEFAULT_RECIPE), args


def _setup_logging(verbose: bool) -> None:
    """Log to stderr. Under a multi-process launch only the main process (``RANK`` 0) logs, so each line
    appears once; with ``-v`` every process logs, its lines tagged ``[process N]``."""
    import os

    rank, several = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")) > 1
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.ERROR
    logging.basicConfig(
        level=level,
        format=(f"[process {rank}] " if several and verbose else "")
        + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in (
        "transformers",
        "accelerate",
        "datasets",
        "urllib3",
        "httpx",
        "httpx2",
        "openai",
        "filelock",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    recipe, overrides = _split_args(args.args)
    from sparsealign.recipes.load import load_config

    config = load_config(recipe, overrides)
    from sparsealign.api import train

    result = train(config)
    if result.interrupted:
        from sparsealign.train.distributed import earlier_failure

        failed = earlier_failure()  # stopped by the launcher because another process failed: it reported
        if failed is not None:
            return failed
        print(
            f"Interrupted at step {result.steps}; a checkpoint is in {result.output_dir}/checkpoints. "
            "Continue with train.resume=auto.",
            file=sys.stderr,
        )
        return 130
    import os

    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, the main process alone prints it
        from sparsealign.train.summary import format_run_summary

        print(format_run_summary(result))
    return 0


def launch_command(
    nproc: int, train_args: list[str], gpus: int, verbose: bool = False, config: str = "ddp"
) -> tuple[list[str], dict]:
    """``sparsealign train --nproc N``: the ``accelerate launch`` command line and the environment variables
    to add, for ``N`` processes on this machine (``gpus``: its GPU count).

    With GPUs, one process per GPU, through the shipped ``ddp.yaml`` (so a default config saved by
    ``accelerate config`` does not change the run) or ``config`` (``--accelerate-config``: a shipped config's
    name, ``fsdp``, ``deepspeed-zero2``, ..., or a file); without, ``N`` CPU processes: ``ACCELERATE_USE_CPU=1``
    with the same multi-process launcher (accelerate's ``--cpu`` alone needs MPI). A free port is picked
    so that two runs on one machine do not collide.
    """
    from sparsealign.errors import TrainingError

    config_file = RECIPES_DIR / "accelerate" / f"{config}.yaml"
    if not config_file.is_file():
        config_file = Path(config).expanduser()
    if not config_file.is_file():
        shipped = ", ".join(sorted(p.stem for p in (RECIPES_DIR / "accelerate").glob("*.yaml")))
        raise TrainingError(f"--accelerate-config {config}: no such file, nor a shipped config ({shipped}).")
    if nproc < 1:
        raise TrainingError(f"--nproc must be at least 1, not {nproc}")
    if gpus and nproc > gpus:
        raise TrainingError(f"--nproc {nproc}, but this machine has {gpus} GPU(s): use at most {gpus}.")
    if not gpus:  # accelerate runs CPU processes as MULTI_CPU (DDP) whatever the config asks for
        from sparsealign.train.distributed import config_engine, refuse_engine

        refuse_engine(config_engine(config_file), "MULTI_CPU", "cpu")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(port),
        "-m",
        "sparsealign.cli",
        *(["-v"] if verbose else []),
        "train",
        *train_args,
    ]
    return argv, ({} if gpus else {"ACCELERATE_USE_CPU": "1"})


def _cmd_train_maybe_launched(args: argparse.Namespace) -> int:
    """``train`` as is, or with ``--nproc N`` (N > 1) under ``accelerate launch``, run in this process: when
    one process fails, torchrun stops the others, the failed one has printed its error (once:
    :func:`_report_error`) and this returns its exit status, without a launcher traceback."""
    if args.nproc is None or args.nproc == 1:
        if args.accelerate_config is not None:
            from sparsealign.errors import TrainingError

            raise TrainingError("--accelerate-config needs --nproc N (N > 1): it configures the launch.")
        return _cmd_train(args)
    import torch

    from sparsealign.train.distributed import run_launcher

    config = args.accelerate_config or "ddp"
    argv, env = launch_command(args.nproc, args.args, torch.cuda.device_count(), args.verbose, config)
    launch_args = argv[argv.index("accelerate.commands.launch") + 1 :]
    return run_launcher(launch_args, env, args.nproc, args.verbose)


def _cmd_push(args: argparse.Namespace) -> int:
    from sparsealign.train.push import push_run

    url = push_run(args.run, args.repo_id, private=args.private)
    print(f"Pushed {Path(args.run) / 'final'} to {args.repo_id}: {url}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from sparsealign.config import Config, describe, describe_trl_names, to_dict
    from sparsealign.methods import describe_methods
    from sparsealign.recipes.load import load_config

    if args.keys:
        for key, default, text in describe(Config):
            if key != "method.name":
                print(f"{key:28s} {default:22s} {text}")
        print("\nmethod.name: one of these methods, with its own method.* options")
        for key, default, text in describe_methods():
            print(f"{key:28s} {default:22s} {text}")
        print("\nTRL's names, accepted with a note (bare or under train.): TRL name -> our key")
        for name, key, note in describe_trl_names():
            print(f"{name:28s} {key:22s} {note}")
        return 0
    import yaml

    recipe, overrides = _split_args(args.args)
    config = load_config(recipe, overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    recipe, overrides = _split_args(args.args)
    from sparsealign.recipes.load import load_config

    config = load_config(recipe, overrides)
    from sparsealign.train.reference_cache import cache_run

    folder, built = cache_run(config, force=args.force)
    print(f"{'Wrote' if built else 'Up to date:'} {folder}; train with reference.cache={folder}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    for name in builtin_recipes():
        print(f"{name:28s} {recipe_description(name)}")
    print(f"\nThe files are in {RECIPES_DIR} (accelerate launch configs in {RECIPES_DIR / 'accelerate'}).")
    return 0


def _cmd_masks(args: argparse.Namespace) -> int:
    from sparsealign.eval.masks_page import write_masks_page

    path = write_masks_page(args.run, args.n)
    print(f"Wrote {path}")
    return 0


_SAE_TRAIN_OPTIONS = {
    "model": "model",
    "site": "site",
    "layer": "layer",
    "width": "width",
    "k": "k",
    "source": "source",
    "context": "context_length",
    "prefix": "prefix",
    "tokens": "tokens",
    "batch_tokens": "batch_tokens",
    "lr": "lr",
    "k_aux": "k_aux",
    "dead_window": "dead_window",
    "heldout_tokens": "heldout_tokens",
    "seed": "seed",
    "device": "device",
    "dtype": "dtype",
}
"""``sparsealign sae train`` option (argparse dest) → ``SAETrainConfig`` field."""


def _cmd_sae_train(args: argparse.Namespace) -> int:
    import json

    from sparsealign.errors import SAEError

    given = {field: getattr(args, dest) for dest, field in _SAE_TRAIN_OPTIONS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    if args.builtin:
        if given or args.out:
            raise SAEError("sae train --builtin takes no other training options and no --out")
        from sparsealign.sae.builtins import ensure_builtin_sae
        from sparsealign.sae.training import METRICS_FILE

        folder = ensure_builtin_sae(args.builtin, refresh=True)
        metrics = json.loads((folder / METRICS_FILE).read_text())
    else:
        if not args.out:
            raise SAEError("sae train needs --out DIR (or --builtin NAME)")
        from sparsealign.sae.training import SAETrainConfig, train_sae

        result = train_sae(SAETrainConfig(**given), args.out)
        folder, metrics = result.folder, result.metrics
    print(
        f"held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.2f}, dead fraction {metrics['dead_fraction']:.4f} "
        f"(dead by the training window {metrics['dead_fraction_train']:.4f}); {metrics['tokens']} tokens in "
        f"{metrics['seconds']:.0f} s"
    )
    print(f"Wrote the SAE to {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsealign",
        description="Sparse preference optimisation and the DPO family for language models.",
        epilog="Example: sparsealign train imdb/dpo method.beta=0.2 train.max_steps=50",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("--version", action="version", version=f"sparsealign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    train = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    train.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]", help=RECIPE_HELP)
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="Train with N processes on this machine through `accelerate launch` (one per GPU; without GPUs, "
        "N CPU processes). Without it: one process.",
    )
    train.add_argument(
        "--accelerate-config",
        metavar="NAME|FILE",
        help="With --nproc: the accelerate config of the launch, a shipped one (ddp, fsdp, deepspeed-zero2, "
        "deepspeed-zero3; `sparsealign recipes` shows where) or a file. Default: ddp.",
    )
    train.set_defaults(func=_cmd_train_maybe_launched)
    config = sub.add_parser("config", help=COMMANDS["config"], description=COMMANDS["config"])
    config.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]", help=RECIPE_HELP)
    config.add_argument("--keys", action="store_true", help="List every key, its default and its meaning.")
    config.set_defaults(func=_cmd_config)
    cache = sub.add_parser("cache", help=COMMANDS["cache"], description=COMMANDS["cache"])
    cache.add_argument("args", nargs="*", metavar="[RECIPE] [key=value ...]", help=RECIPE_HELP)
    cache.add_argument("--force", action="store_true", help="Rebuild even a cache that exists.")
    cache.set_defaults(func=_cmd_cache)
    recipes = sub.add_parser("recipes", help=COMMANDS["recipes"], description=COMMANDS["recipes"])
    recipes.set_defaults(func=_cmd_recipes)
    push = sub.add_parser("push", help=COMMANDS["push"], description=COMMANDS["push"])
    push.add_argument("run", help="A run folder with a final/ (runs/<name>).")
    push.add_argument("--repo-id", required=True, metavar="NAME", help="The hub repository: owner/name.")
    push.add_argument("--private", action="store_true", help="Create the repository private.")
    push.set_defaults(func=_cmd_push)
    masks = sub.add_parser("masks", help=COMMANDS["masks"], description=COMMANDS["masks"])
    masks.add_argument("run", help="A run folder of a sparsepo or mapo run.")
    masks.add_argument("--n", type=int, default=8, help="Number of held-out pairs to show.")
    masks.set_defaults(func=_cmd_masks)
    sae = sub.add_parser("sae", help=COMMANDS["sae"], description=COMMANDS["sae"])
    sae_sub = sae.add_subparsers(dest="sae_command", metavar="SUBCOMMAND", title="subcommands", required=True)
    sae_train = sae_sub.add_parser(
        "train",
        help="Train a TopK SAE (Gao et al. 2024) on activations streamed from a model.",
        description="Train a TopK SAE (Gao et al. 2024) on activations streamed from a model; unset "
        "options take the defaults of sparsealign.sae.training.SAETrainConfig (see docs/sae.md).",
        epilog="Examples: sparsealign sae train --model smollm2-135m-instruct --site resid_post --layer 20 "
        "--width 4608 --k 32 --source imdb --tokens 2000000 --out DIR;  "
        "sparsealign sae train --builtin smollm2-135m-instruct-imdb",
    )
    sae_train.add_argument("--builtin", metavar="NAME", help="(Re)build a built-in SAE into the cache.")
    sae_train.add_argument("--out", metavar="DIR", help="Folder to write the SAE and metrics.json to.")
    sae_train.add_argument("--model", help="Built-in model, local folder or hub id.")
    sae_train.add_argument("--site", help="Hook site: resid_post or mlp_out.")
    sae_train.add_argument("--layer", type=int, help="0-based decoder layer.")
    sae_train.add_argument("--width", type=int, help="Number of latents (d_sae).")
    sae_train.add_argument("--k", type=int, help="Active latents per token.")
    sae_train.add_argument("--source", help="imdb, or a .jsonl file with a text field / a text file.")
    sae_train.add_argument("--context", type=int, help="Tokens per document.")
    sae_train.add_argument(
        "--prefix",
        help="Token in front of each document: bos (default), none, or a token like <|endoftext|>.",
    )
    sae_train.add_argument("--tokens", type=int, help="Training tokens.")
    sae_train.add_argument("--batch-tokens", type=int, help="SAE batch size in tokens.")
    sae_train.add_argument("--lr", type=float, help="Adam lr (default 2e-4 / sqrt(width / 16384)).")
    sae_train.add_argument("--k-aux", type=int, help="AuxK latents (default d_in / 2).")
    sae_train.add_argument(
        "--dead-window", type=int, help="Tokens without firing after which a latent is dead."
    )
    sae_train.add_argument("--heldout-tokens", type=int, help="Held-out tokens for the evaluation.")
    sae_train.add_argument("--seed", type=int, help="Document order, initialisation and shuffling.")
    sae_train.add_argument("--device", help="cpu, cuda or auto.")
    sae_train.add_argument("--dtype", help="Model dtype: auto, float32, bfloat16, float16.")
    sae_train.set_defaults(func=_cmd_sae_train)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"sparsealign.cli.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
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
        return _report_error(error, 2)
    except Exception as error:
        from sparsealign.train.distributed import is_launched

        if not is_launched():
            raise  # one process: Python's own traceback
        return _report_error(error, 1)


def _report_error(error: Exception, status: int) -> int:
    """Print ``error`` (a user error as one line, another as its traceback) and return ``status``. Under a
    multi-process launch only the first process to fail prints; the others, whose errors follow from it (a
    connection closed by the dead process, the launcher's SIGTERM), return its status quietly."""
    from sparsealign.errors import USER_ERRORS
    from sparsealign.train.distributed import claim_failure

    first = claim_failure(status)
    if first is not None:
        logging.getLogger("sparsealign.cli").debug("stopped after another process failed: %r", error)
        return first
    if isinstance(error, USER_ERRORS):
        print(f"error: {error}", file=sys.stderr)
    else:
        import traceback

        traceback.print_exception(error)
    return status


if __name__ == "__main__":
    sys.exit(main())
