"""The pairs ``sparsealign judge`` compares: two columns of one sample file, or one column of each of two
sample files matched by prompt.

A row whose candidate or baseline is missing, ``null`` or blank (e.g. ``reference`` for a source without a
chosen response) is skipped, counted and logged; a column that no row has is a
:class:`~sparsealign.errors.DataError`.

Matching two files (``--baseline-file``): rows are matched on ``prompt`` plus each of ``temperature`` and
``sample_index`` that every row of both files has, so that samples drawn with the same settings face each
other; rows still sharing a key pair up in file order (the k-th with the k-th). Rows without a partner are
skipped, counted and logged.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsealign.errors import DataError
from sparsealign.eval.samples import read_rows

__all__ = ["MATCH_FIELDS", "Pair", "PairSet", "load_pairs"]

log = logging.getLogger(__name__)

MATCH_FIELDS = ("temperature", "sample_index")
"""Fields added to ``prompt`` in the matching key when every row of both files has them."""


@dataclass(frozen=True)
class Pair:
    """One comparison: the prompt (text or chat messages), the two responses and where they came from
    (``file row N``, counting non-blank lines)."""

    prompt: str | list[dict[str, Any]]
    candidate: str
    baseline: str
    origin: str


@dataclass
class PairSet:
    """The usable pairs, in file order, and how many rows were skipped and why."""

    pairs: list[Pair]
    skipped: dict[str, int]


def _usable(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_column(rows: list[dict[str, Any]], key: str, path: Path) -> None:
    if rows and not any(key in row for row in rows):
        columns = sorted({name for row in rows for name in row})
        raise DataError(f"{path}: no row has the column {key!r} (columns: {', '.join(columns)})")


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _log_skips(skipped: dict[str, int]) -> None:
    for reason, count in skipped.items():
        if count:
            log.warning("skipped %d row(s): %s", count, reason)


def load_pairs(
    samples: str | Path, candidate: str, baseline: str, baseline_file: str | Path | None = None
) -> PairSet:
    """The pairs to judge: ``candidate`` and ``baseline`` columns of ``samples``, or (with ``baseline_file``)
    ``candidate`` of ``samples`` against ``baseline`` of ``baseline_file``, matched by prompt."""
    samples = Path(samples)
    rows = read_rows(samples, required=("prompt",))
    _check_column(rows, candidate, samples)
    if baseline_file is None:
        _check_column(rows, baseline, samples)
        skipped = {f"no {candidate!r} or no {baseline!r} text": 0}
        pairs = []
        for number, row in enumerate(rows, start=1):
            if _usable(row.get(candidate)) and _usable(row.get(baseline)):
                pairs.append(Pair(row["prompt"], row[candidate], row[baseline], f"{samples} row {number}"))
            else:
                skipped[f"no {candidate!r} or no {baseline!r} text"] += 1
        _log_skips(skipped)
        return PairSet(pairs, skipped)
    baseline_file = Path(baseline_file)
    others = read_rows(baseline_file, required=("prompt",))
    _check_column(others, baseline, baseline_file)
    fields = [name for name in MATCH_FIELDS if all(name in row for row in rows + others)]

    def key(row: dict[str, Any]) -> tuple:
        return (_prompt_key(row["prompt"]), *(json.dumps(row[name]) for name in fields))

    partners: dict[tuple, deque[tuple[int, dict[str, Any]]]] = defaultdict(deque)
    for number, row in enumerate(others, start=1):
        partners[key(row)].append((number, row))
    skipped = {
        f"no {candidate!r} text in {samples.name}": 0,
        f"no {baseline!r} text in {baseline_file.name}": 0,
        f"prompt without a partner in {baseline_file.name}": 0,
        f"prompt without a partner in {samples.name}": 0,
    }
    pairs = []
    for number, row in enumerate(rows, start=1):
        queue = partners.get(key(row))
        if not queue:
            skipped[f"prompt without a partner in {baseline_file.name}"] += 1
            continue
        other_number, other = queue.popleft()
        if not _usable(row.get(candidate)):
            skipped[f"no {candidate!r} text in {samples.name}"] += 1
        elif not _usable(other.get(baseline)):
            skipped[f"no {baseline!r} text in {baseline_file.name}"] += 1
        else:
            origin = f"{samples} row {number} / {baseline_file} row {other_number}"
            pairs.append(Pair(row["prompt"], row[candidate], other[baseline], origin))
    skipped[f"prompt without a partner in {samples.name}"] = sum(len(queue) for queue in partners.values())
    _log_skips(skipped)
    if fields:
        log.info("matched the two files on prompt, %s", ", ".join(fields))
    return PairSet(pairs, skipped)
