"""``sparsealign judge``: pairwise LLM judging (HALOs' protocol) over an OpenAI-compatible server.

See :mod:`sparsealign.eval.judge` and docs/evaluation.md (judging). Imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = (
    "Judge a candidate against a baseline, pair by pair, with an LLM on any OpenAI-compatible server "
    "(HALOs' protocol); prints the win rate."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example:\n  sparsealign judge samples.jsonl --candidate output --baseline reference --judge gpt-4o \\\n"
        "    --base-url https://api.openai.com/v1 --max-comparisons 256 --out judge.jsonl\n\n"
        "The API key is read from OPENAI_API_KEY (or --api-key-env NAME), sent as a bearer token and never\n"
        "written to any file or log. See docs/evaluation.md (judging)."
    )
    parser.add_argument("samples", type=Path, help="A JSONL sample file (sparsealign sample writes one).")
    parser.add_argument(
        "--candidate", default="output", metavar="KEY", help="Column of SAMPLES to judge (default: output)."
    )
    parser.add_argument(
        "--baseline",
        metavar="KEY",
        help="Column to compare against: of SAMPLES (default: reference), or of --baseline-file (default: output).",
    )
    parser.add_argument(
        "--baseline-file",
        type=Path,
        metavar="B.jsonl",
        help="Take the baseline from this sample file instead, matched to SAMPLES by prompt "
        "(and temperature, sample_index when both files have them).",
    )
    parser.add_argument(
        "--judge", required=True, metavar="MODEL", help="The judge model's name on the server."
    )
    parser.add_argument(
        "--base-url",
        required=True,
        metavar="URL",
        help="The server's OpenAI-compatible API root, e.g. https://api.openai.com/v1, http://localhost:8000/v1 "
        "(vLLM), http://localhost:11434/v1 (Ollama), http://localhost:8080/v1 (llama.cpp).",
    )
    parser.add_argument(
        "--max-comparisons",
        type=int,
        required=True,
        metavar="N",
        help="Judge at most the first N usable pairs (a cost guard; with --both-orders, 2N requests).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="Append the summary (a JSON line) here; per-comparison records go to <FILE stem>.comparisons.jsonl.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seeds the order of the two responses per comparison (default: 0).",
    )
    parser.add_argument(
        "--both-orders",
        action="store_true",
        help="Judge each pair in both orders; the two disagreeing is a tie (2 requests per pair).",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, metavar="C", help="Requests in flight at once (default: 4)."
    )
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="Environment variable holding the API key (default: OPENAI_API_KEY; when that is unset the "
        "placeholder EMPTY is sent, for local servers without a key).",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="Judgment cache folder (default: $SPARSEALIGN_CACHE/judge or ~/.cache/sparsealign/judge).",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="Per-request timeout (default: 60)."
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=5,
        metavar="R",
        help="Retries of a request on connection errors, timeouts, 429 and 5xx, with exponential backoff "
        "(0.5 s doubling, at most 8 s) or the server's Retry-After (default: 5).",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=10,
        metavar="T",
        help="Most tokens the judge may answer with (default: 10, as HALOs; raise it for reasoning models).",
    )


def run(args: argparse.Namespace) -> int:
    from sparsealign.eval.judge import JudgeOptions, format_table, judge_samples
    from sparsealign.eval.judge_client import ServerSettings

    if not getattr(args, "verbose", False):  # one log line per HTTP request otherwise (retries still show)
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    baseline = args.baseline or ("output" if args.baseline_file else "reference")
    options = JudgeOptions(
        samples=args.samples,
        candidate=args.candidate,
        baseline=baseline,
        out=args.out,
        max_comparisons=args.max_comparisons,
        server=ServerSettings(
            base_url=args.base_url,
            judge=args.judge,
            api_key_env=args.api_key_env,
            timeout=args.timeout,
            max_retries=args.max_retries,
            max_tokens=args.max_tokens,
        ),
        seed=args.seed,
        both_orders=args.both_orders,
        concurrency=args.concurrency,
        baseline_file=args.baseline_file,
        cache=args.cache,
    )
    summary = judge_samples(options)
    print(format_table(summary))
    print(f"Wrote {args.out} (summary, last line) and {summary['comparisons']}")
    return 0
