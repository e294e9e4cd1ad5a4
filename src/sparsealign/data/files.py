"""Reading raw rows, with their line or row numbers, from local files and from ``datasets``.

Every reader returns a :class:`RowStream`: an iterable of ``(origin, row)`` pairs where ``origin`` is a
``"name:number"`` string such as ``"train.jsonl:12"`` and ``row`` is a ``dict`` or, for a row that could not
be read (a malformed JSON line), the exception. Bad rows are thus reported by the parser in
:mod:`sparsealign.data.formats` instead of aborting the whole read.

Numbers are 1-based: file lines for JSON Lines (``unit="line"``), items or data rows for JSON, Parquet,
CSV and datasets (``unit="row"``; CSV rows do not count the header).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsealign.errors import DataError

Row = dict[str, Any]
RawRow = tuple[str, Row | Exception]

SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
"""File extension -> reader kind for ``data.path``."""

_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class RowStream:
    """Raw rows from one place: ``name`` for messages, ``unit`` ("line" or "row") for the numbers."""

    name: str
    unit: str
    rows: Iterable[RawRow]

    def __iter__(self) -> Iterator[RawRow]:
        return iter(self.rows)


def _extensions_text() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def read_file(path: str | os.PathLike[str]) -> RowStream:
    """Open a local data file by its extension (see :data:`SUPPORTED_EXTENSIONS`).

    Raises :class:`DataError` for a missing path, a folder, or an unsupported extension.
    """
    file = Path(path)
    if file.is_dir():
        raise DataError(
            f"Data path '{path}' is a folder, not a file. For a folder written by `Dataset.save_to_disk` "
            f"use data.dataset={path}; data.path takes one file ({_extensions_text()})."
        )
    kind = SUPPORTED_EXTENSIONS.get(file.suffix.lower())
    if kind is None:
        raise DataError(
            f"Data file '{path}' has an unsupported extension '{file.suffix}'. "
            f"Supported extensions: {_extensions_text()}."
        )
    if not file.is_file():
        raise DataError(f"Data file '{path}' not found. Supported extensions: {_extensions_text()}.")
    if kind == "jsonl":
        return RowStream(file.name, "line", _read_jsonl(file))
    if kind == "json":
        return _read_json(file)
    if kind == "parquet":
        return RowStream(file.name, "row", _read_parquet(file))
    return RowStream(file.name, "row", _read_csv(file, sep="\t" if kind == "tsv" else ","))


def _parse_json_line(raw: bytes) -> Row | Exception:
    try:
        value = json.loads(raw)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return error
    if not isinstance(value, dict):
        return ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    """One JSON object per line; blank lines are ignored, malformed lines come back as exceptions."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if lineno == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if not raw.strip():
                continue
            yield f"{path.name}:{lineno}", _parse_json_line(raw)


def _rows_of_json_document(document: Any, path: Path) -> list[Any]:
    """The list of records in a JSON document: the list itself, or the one list inside an object."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if isinstance(document.get("data"), list):
            return document["data"]
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) == 1:
            return document[lists[0]]
        found = f" (lists under keys {lists})" if lists else ""
        raise DataError(
            f"JSON file '{path}' is an object without a single list of rows{found}. Expected a list of "
            'objects, or an object like {"data": [...]}.'
        )
    raise DataError(f"JSON file '{path}' holds a {type(document).__name__}; expected a list of objects.")


def _read_json(path: Path) -> RowStream:
    """A JSON document with a list of row objects; a ``.json`` file that is really JSON Lines also works."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"JSON file '{path}' is not UTF-8 text (byte {error.start}: {error.reason})."
        ) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines with a .json name
            return RowStream(path.name, "line", _read_jsonl(path))
        raise DataError(
            f"JSON file '{path}' is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        ) from None
    items = _rows_of_json_document(document, path)

    def rows() -> Iterator[RawRow]:
        for index, item in enumerate(items, start=1):
            value: Row | Exception = (
                item
                if isinstance(item, dict)
                else ValueError(f"expected an object, got {type(item).__name__}")
            )
            yield f"{path.name}:{index}", value

    return RowStream(path.name, "row", rows())


def _read_parquet(path: Path) -> Iterator[RawRow]:
    """Parquet through pyarrow, batch by batch; nested lists/structs come back as Python lists/dicts."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"Parquet file '{path}' could not be read: {error}") from None
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            index += 1
            yield f"{path.name}:{index}", row


def _read_csv(path: Path, sep: str) -> Iterator[RawRow]:
    """CSV/TSV through pandas with every cell read as text (empty cells are empty strings, not NaN)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as error:  # pandas raises ParserError, EmptyDataError, UnicodeDecodeError...
        raise DataError(f"CSV file '{path}' could not be read: {error}") from None
    for index, row in enumerate(frame.to_dict("records"), start=1):
        yield f"{path.name}:{index}", {str(key): value for key, value in row.items()}


# --------------------------------------------------------------------------------------------------
# datasets: hub names and save_to_disk folders


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _offline_hint(name: str, error: BaseException) -> str:
    return (
        f"Dataset '{name}' could not be loaded: the Hugging Face Hub appears unreachable ({error}). "
        f"Download it with `datasets` on a machine with network, e.g. "
        f"`datasets.load_dataset('{name}').save_to_disk('PATH')`, copy the folder here and pass it as "
        f"data.dataset=PATH."
    )


def _load_saved(folder: Path, split: str) -> Any:
    """One split of a ``save_to_disk`` folder (a lone ``Dataset`` is returned whatever the split)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as error:
        raise DataError(
            f"Dataset folder '{folder}' could not be loaded with `load_from_disk`: {error}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"Dataset folder '{folder}' has no split '{split}'. Available splits: {', '.join(loaded)}. "
                f"Set data.split / data.eval_split to one of them."
            )
        return loaded[split]
    return loaded


def _load_hub_or_folder(name: str, split: str) -> Any:
    """``load_dataset(name, split=split)``, turning every failure into a :class:`DataError`."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ConnectionError as error:
        raise DataError(_offline_hint(name, error)) from None
    except Exception as error:
        text = str(error)
        if "offline" in text.lower() or "couldn't reach" in text.lower():
            raise DataError(_offline_hint(name, error)) from None
        raise DataError(
            f"Dataset '{name}' (split '{split}') could not be loaded: {type(error).__name__}: {text}. "
            f"If the hub is unreachable, download it with `datasets` on a machine with network, "
            f"`save_to_disk` it and pass the saved folder as data.dataset=PATH."
        ) from None


def dataset_has_single_split(name: str) -> bool:
    """Whether ``name`` is a ``save_to_disk`` folder holding one ``Dataset`` (no named splits)."""
    folder = Path(name)
    return (
        folder.is_dir() and (folder / "state.json").is_file() and not (folder / "dataset_dict.json").is_file()
    )


def read_dataset(name: str, split: str) -> RowStream:
    """Rows of one split of a hub dataset, a ``save_to_disk`` folder, or a local folder of data files.

    Origins are ``"<name>/<split>:<row>"`` with ``<name>`` the folder's base name for local folders.
    """
    folder = Path(name)
    if folder.is_dir():
        data = _load_saved(folder, split) if _is_saved_dataset(folder) else _load_hub_or_folder(name, split)
        label = folder.resolve().name
    elif folder.exists():
        raise DataError(
            f"data.dataset='{name}' is a file; pass single files as data.path={name} "
            f"(supported extensions: {_extensions_text()})."
        )
    else:
        data = _load_hub_or_folder(name, split)
        label = name
    stream_name = f"{label}/{split}"

    def rows() -> Iterator[RawRow]:
        for index, row in enumerate(data, start=1):
            yield f"{stream_name}:{index}", dict(row)

    return RowStream(stream_name, "row", rows())
