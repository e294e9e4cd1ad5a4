"""``sparsealign export RUN --out DIR [--merge-lora] [--force]``: a run's model as a plain Hugging Face folder.

The logic is :mod:`sparsealign.eval.export`; this module parses arguments and prints the result.
"""

from __future__ import annotations

import argparse

HELP = "Export a run's final model as a plain Hugging Face folder (safetensors, tokenizer, chat template)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument("run", metavar="RUN", help="A run folder (config.yaml + final/).")
    parser.add_argument("--out", required=True, metavar="DIR", help="The folder to write.")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA runs: merge the adapter into the base weights and write a full model (needed when the "
        "base is a local folder or a built-in).",
    )
    parser.add_argument("--force", action="store_true", help="Replace DIR if it is not empty.")


def run(args: argparse.Namespace) -> int:
    """Export and say what was written."""
    from sparsealign.eval.export import export_run

    result = export_run(args.run, args.out, merge_lora=args.merge_lora, force=args.force)
    what = {
        "full": "a full model",
        "merged": "a full model (LoRA adapter merged)",
        "adapter": f"a LoRA adapter over {result.base}",
    }[result.kind]
    print(
        f"exported {what} to {result.folder}; load it with AutoModelForCausalLM.from_pretrained('{result.folder}')"
    )
    return 0
