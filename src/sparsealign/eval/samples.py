"""Sample files: the JSONL that ``sparsealign sample`` writes and ``judge``, ``score``, ``evaluate`` and
``passk`` read.

One JSON object per line. ``sparsealign sample`` writes at least :data:`SAMPLE_FIELDS` (``prompt``,
``output``, ``reference`` (the source's chosen response, ``null`` without one), ``temperature``,
``sample_index``, ``model``); other commands add columns (``reward``) or need others (``task_id`` and
``tests`` for ``passk``). A command's summary goes beside its input: :func:`summary_path`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sparsealign.errors import DataError
from sparsealign.io import atomic_write

__all__ = ["SAMPLE_FIELDS", "append_rows", "iter_rows", "read_rows", "summary_path", "write_rows"]

SAMPLE_FIELDS = ("prompt", "output", "reference", "temperature", "sample_index", "model")


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, row)`` for every non-blank line of a JSONL file; a line that is not a JSON object is a
    :class:`~sparsealign.errors.DataError` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such sample file")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}, line {number}: not UTF-8 text ({error.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_rows(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every row of a JSONL file; each must have the ``required`` columns (else a DataError naming the
    file, the line and the missing column)."""
    required = tuple(required)
    rows = []
    for number, row in iter_rows(path):
        missing = [name for name in required if name not in row]
        if missing:
            raise DataError(
                f"{path}, line {number}: missing column(s) {', '.join(missing)} (the row has: {', '.join(row)})"
            )
        rows.append(row)
    return rows


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSONL atomically (a reader never sees half a file)."""
    with atomic_write(Path(path)) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append ``rows`` to a JSONL file, flushed and synced, so that an interrupted command keeps what it
    finished (a partial last line is ignored and rewritten by a resuming writer)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def summary_path(path: str | Path, name: str) -> Path:
    """Where a command's summary of ``path`` goes: beside it, ``<stem>.<name>.json``
    (``samples.jsonl`` → ``samples.rouge.json``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{name}.json")
