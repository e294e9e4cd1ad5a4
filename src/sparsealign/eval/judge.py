"""``sparsealign judge``: pairwise LLM judging of a candidate against a baseline, HALOs' protocol
(:mod:`sparsealign.eval.judge_protocol`) over any OpenAI-compatible server
(:mod:`sparsealign.eval.judge_client`).

Each pair (:mod:`sparsealign.eval.judge_pairs`) is judged once, with the order of the two responses drawn
from ``(seed, index)``, or with ``both_orders`` twice (candidate first, then baseline first). A comparison's
outcome is ``candidate`` or ``baseline`` (the side the judge chose, mapped back from its position),
``tie`` (``both_orders`` only: the two orders disagree) or ``failed`` (a reply naming neither or both
responses, or a request the server refused; with ``both_orders``, either judgment failing). Requests run
concurrently in a thread pool; answers are cached, so a rerun only sends what was never answered.

Outputs: one JSON record per comparison in ``<out stem>.comparisons.jsonl`` (:func:`comparisons_path`), and
the summary (:func:`sparsealign.eval.judge_stats.count_outcomes` plus the run's settings) appended as the
last line of ``out``.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sparsealign.errors import DataError, JudgeError
from sparsealign.eval.judge_client import (
    ChatJudge,
    ComparisonError,
    JudgmentCache,
    ServerSettings,
    default_cache_dir,
)
from sparsealign.eval.judge_pairs import Pair, load_pairs
from sparsealign.eval.judge_protocol import build_messages, candidate_first, parse_verdict
from sparsealign.eval.judge_stats import count_outcomes
from sparsealign.eval.samples import write_rows
from sparsealign.io import atomic_write

__all__ = ["JudgeOptions", "comparisons_path", "format_table", "judge_samples", "pair_outcome"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeOptions:
    """Everything ``sparsealign judge`` takes (see its ``--help``)."""

    samples: Path
    candidate: str
    baseline: str
    out: Path
    max_comparisons: int
    server: ServerSettings
    seed: int = 0
    both_orders: bool = False
    concurrency: int = 4
    baseline_file: Path | None = None
    cache: Path | None = None


def comparisons_path(out: str | Path) -> Path:
    """The per-comparison sidecar of ``out``: ``<out stem>.comparisons.jsonl`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.comparisons.jsonl")


def pair_outcome(choices: list[str | None]) -> str:
    """A pair's outcome from its judgments' choices (``"candidate"``, ``"baseline"`` or ``None``): any
    ``None`` -> ``failed``; all the same -> that side; otherwise (the two orders disagree) -> ``tie``."""
    if not choices or any(choice is None for choice in choices):
        return "failed"
    return choices[0] if len(set(choices)) == 1 else "tie"


def _public_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for files and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _orders(options: JudgeOptions, index: int) -> tuple[bool, ...]:
    """For pair ``index``, whether each of its requests shows the candidate first: both orders, or one
    drawn from ``(seed, index)``."""
    return (True, False) if options.both_orders else (candidate_first(options.seed, index),)


def _validate(options: JudgeOptions) -> None:
    if options.max_comparisons < 1:
        raise DataError(f"--max-comparisons must be at least 1, not {options.max_comparisons}")
    if options.concurrency < 1:
        raise DataError(f"--concurrency must be at least 1, not {options.concurrency}")
    if options.server.max_retries < 0 or options.server.timeout <= 0 or options.server.max_tokens < 1:
        raise DataError("--max-retries must be >= 0, --timeout > 0 and --max-tokens >= 1")


def _judgment(judge: ChatJudge, pair: Pair, shows_candidate_first: bool) -> dict[str, Any]:
    """One request (or cache hit) and its verdict, mapped back to the side it names."""
    first, second = (
        (pair.candidate, pair.baseline) if shows_candidate_first else (pair.baseline, pair.candidate)
    )
    position = 1 if shows_candidate_first else 2
    try:
        reply, cached = judge.ask(build_messages(pair.prompt, first, second))
    except ComparisonError as error:
        log.warning("%s: the judge refused the request (%s); counted as failed", pair.origin, error)
        return {
            "candidate_position": position,
            "reply": None,
            "choice": None,
            "cached": False,
            "error": str(error),
        }
    verdict = parse_verdict(reply)
    choice = None if verdict is None else ("candidate" if verdict == position else "baseline")
    if choice is None:
        log.debug("%s: no verdict in the judge's reply %r", pair.origin, reply)
    return {"candidate_position": position, "reply": reply, "choice": choice, "cached": cached}


def _run_requests(
    judge: ChatJudge, jobs: list[tuple[int, Pair, bool]], concurrency: int
) -> dict[tuple[int, bool], dict[str, Any]]:
    """Every job's judgment, ``concurrency`` at a time, with a progress bar. After a :class:`JudgeError`
    no new request starts, the ones in flight finish (and are cached), and the first error is raised."""
    from tqdm.auto import tqdm

    stop = threading.Event()

    def one(pair: Pair, first: bool) -> dict[str, Any] | None:
        if stop.is_set():
            return None
        try:
            return _judgment(judge, pair, first)
        except JudgeError:
            stop.set()
            raise

    results: dict[tuple[int, bool], dict[str, Any]] = {}
    errors: list[BaseException] = []
    with (
        ThreadPoolExecutor(max_workers=concurrency) as pool,
        tqdm(total=len(jobs), desc="judging", unit="req", disable=None) as bar,
    ):
        futures = {pool.submit(one, pair, first): (index, first) for index, pair, first in jobs}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                errors.append(error)
            elif (result := future.result()) is not None:
                results[futures[future]] = result
                bar.update(1)
    if errors:
        raise errors[0]
    return results


def judge_samples(options: JudgeOptions) -> dict[str, Any]:
    """Judge the pairs of ``options``; write the sidecar and append the summary to ``options.out``; return
    the summary."""
    _validate(options)
    pair_set = load_pairs(options.samples, options.candidate, options.baseline, options.baseline_file)
    pairs = pair_set.pairs[: options.max_comparisons]
    if not pairs:
        reasons = "; ".join(f"{count} {reason}" for reason, count in pair_set.skipped.items() if count)
        raise DataError(f"{options.samples}: no pair to judge (skipped: {reasons or 'the file has no rows'})")
    jobs = [(index, pair, first) for index, pair in enumerate(pairs) for first in _orders(options, index)]
    cache = JudgmentCache(options.cache or default_cache_dir())
    judge = ChatJudge(options.server, cache)
    base_url = _public_url(options.server.base_url)
    log.info(
        "judging %d pair(s) (%d request(s)) with %s at %s; cache %s",
        len(pairs),
        len(jobs),
        options.server.judge,
        base_url,
        cache.folder,
    )
    try:
        results = _run_requests(judge, jobs, options.concurrency)
    except JudgeError as error:
        raise JudgeError(
            f"{error}. {judge.sent + judge.from_cache} of {len(jobs)} judgment(s) are cached in {cache.folder}; "
            "a rerun sends only the rest"
        ) from None
    records, outcomes = [], []
    for index, pair in enumerate(pairs):
        judgments = [results[(index, first)] for first in _orders(options, index)]
        outcome = pair_outcome([judgment["choice"] for judgment in judgments])
        outcomes.append(outcome)
        records.append(
            {
                "index": index,
                "origin": pair.origin,
                "prompt": pair.prompt,
                "candidate": pair.candidate,
                "baseline": pair.baseline,
                "judgments": judgments,
                "outcome": outcome,
            }
        )
    sidecar = comparisons_path(options.out)
    write_rows(sidecar, records)
    baseline_source = options.baseline_file or options.samples
    summary = {
        **count_outcomes(outcomes),
        "candidate": f"{options.samples}:{options.candidate}",
        "baseline": f"{baseline_source}:{options.baseline}",
        "judge": options.server.judge,
        "base_url": base_url,
        "seed": options.seed,
        "both_orders": options.both_orders,
        "requests_sent": judge.sent,
        "from_cache": judge.from_cache,
        "skipped_rows": sum(pair_set.skipped.values()),
        "candidate_mean_chars": sum(len(pair.candidate) for pair in pairs) / len(pairs),
        "baseline_mean_chars": sum(len(pair.baseline) for pair in pairs) / len(pairs),
        "comparisons": str(sidecar),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _append_line(Path(options.out), summary)
    return summary


def _append_line(path: Path, row: dict[str, Any]) -> None:
    """Rewrite ``path`` atomically with ``row`` as its new last line (earlier runs' lines are kept)."""
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    with atomic_write(path) as handle:
        handle.write(before + json.dumps(row, ensure_ascii=False) + "\n")


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a two-column table, the win rate and its interval as percentages."""
    rate, interval = summary["win_rate"], summary["win_rate_ci95"]
    rows = [
        ("candidate", summary["candidate"]),
        ("baseline", summary["baseline"]),
        (
            "judge",
            f"{summary['judge']} at {summary['base_url']} (seed {summary['seed']}"
            f"{', both orders' if summary['both_orders'] else ''})",
        ),
        ("candidate_wins", summary["candidate_wins"]),
        ("baseline_wins", summary["baseline_wins"]),
        ("ties", summary["ties"]),
        ("failed", summary["failed"]),
        ("total", summary["total"]),
        ("win_rate", "n/a (nothing decided)" if rate is None else f"{100 * rate:.1f}%"),
        (
            "win_rate_ci95",
            "n/a" if interval is None else f"{100 * interval[0]:.1f}% - {100 * interval[1]:.1f}% (Wilson)",
        ),
        ("requests", f"{summary['requests_sent']} sent, {summary['from_cache']} from the cache"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
