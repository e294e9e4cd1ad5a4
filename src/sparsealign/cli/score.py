"""``sparsealign score SAMPLES --reward NAME``: add a ``reward`` column to a sample file.

The reward is the one the IMDB job trains with (:mod:`sparsealign.rewards`): ``imdb-sentiment`` (the
offline classifier) or a hub id / folder of a sequence classifier (its positive label's log-odds). The rows
are written back in place (atomically) or to ``--out``; the summary (mean, std, sem per model and per
temperature when those vary) goes to ``<stem>.score.json`` beside SAMPLES and is printed as a table.
"""

from __future__ import annotations

import argparse

HELP = "Add a reward column to a sample file (imdb-sentiment or any sequence classifier) and summarise it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument(
        "samples", metavar="SAMPLES", help="A sample file (JSONL, as `sparsealign sample` writes)."
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="imdb-sentiment (offline TF-IDF classifier), or a hub id or folder of a sequence classifier.",
    )
    parser.add_argument(
        "--text",
        choices=("prompt+output", "output"),
        default="prompt+output",
        help="What the reward reads: prompt + output (the IMDB continuation task, default) or the output alone.",
    )
    parser.add_argument(
        "--positive-label",
        type=int,
        default=1,
        help="For a sequence classifier: the class whose log-odds is the reward (default 1).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Texts per scoring batch (default 64).")
    parser.add_argument("--out", help="Write the scored rows here instead of rewriting SAMPLES in place.")


def run(args: argparse.Namespace) -> int:
    from sparsealign.config import RewardConfig
    from sparsealign.eval.score import score_samples
    from sparsealign.rewards import load_reward

    reward = load_reward(
        RewardConfig(name=args.reward, positive_label=args.positive_label, batch_size=args.batch_size)
    )
    score_samples(args.samples, reward, args.text, args.out)
    return 0
