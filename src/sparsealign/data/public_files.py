"""Reading a public dataset as it is published: offline from its own files, or from the hub.

``data.path`` may name

* one file: JSON Lines (``.jsonl``, ``.jsonl.gz``: Anthropic HH ships gzipped JSON Lines), JSON (a list of
  objects, or JSON Lines under a ``.json`` name as SHP does) or Parquet (the hub's converted files);
* a folder of such files (a clone or ``snapshot_download`` of the dataset repository): the files whose
  relative path names the split (``train-00000-of-00001.parquet``, ``helpful-base/test.jsonl.gz``,
  ``data/train_prefs-*.parquet``) are that split; a folder whose file names name no split is read whole;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Without ``data.path`` the dataset is loaded with ``datasets.load_dataset`` when the hub is reachable; when it
is not, a :class:`DataError` says which files to download and to pass them as ``data.path``.

Every reader yields ``(origin, row)`` pairs (:class:`~sparsealign.data.files.RowStream`), origins such as
``"train.jsonl:12"`` (line 12) or ``"train-00000-of-00001.parquet:7"`` (row 7).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from sparsealign.data.files import RawRow, RowStream, read_dataset, read_file
from sparsealign.errors import DataError
from sparsealign.hub import hub_reachable

__all__ = ["PublicRows", "read_public"]

_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".ndjson")


@dataclass
class PublicRows:
    """Rows of one split. ``whole`` is True when the rows are not split-specific (one file, or a folder whose
    file names name no split): the caller then holds out its evaluation examples itself."""

    stream: RowStream
    whole: bool = False


def _is_data_file(path: Path, contains: str = "") -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(_DATA_SUFFIXES) and contains.lower() in name


def _data_files(folder: Path, data_dirs: Sequence[str], contains: str) -> list[Path]:
    """Data files under ``folder`` (only under ``data_dirs`` where those exist), names containing ``contains``."""
    roots = [folder / d for d in data_dirs if (folder / d).is_dir()] or [folder]
    return sorted(f for root in roots for f in root.rglob("*") if _is_data_file(f, contains))


def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _read_json_lines(path: Path) -> RowStream:
    """One JSON object per line (plain or gzipped); a line that is not an object comes back as the error."""

    def rows() -> Iterator[RawRow]:
        with _open(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if not raw.strip():
                    continue
                try:
                    value: Any = json.loads(raw)
                except ValueError as error:
                    yield f"{path.name}:{lineno}", error
                    continue
                if not isinstance(value, dict):
                    value = ValueError(f"expected a JSON object, got {type(value).__name__}")
                yield f"{path.name}:{lineno}", value

    return RowStream(path.name, "line", rows())


def _starts_with_object(path: Path) -> bool:
    """Whether the file's first non-blank line is a whole JSON object (JSON Lines, whatever the extension)."""
    with _open(path) as handle:
        for raw in handle:
            line = raw.lstrip(b"\xef\xbb\xbf").strip()
            if line:
                try:
                    return isinstance(json.loads(line), dict)
                except ValueError:
                    return False
    return False


def _read_one(path: Path, label: str | None = None) -> RowStream:
    """One data file; ``label`` (a path relative to the folder) replaces the file name in origins."""
    name = path.name.lower()
    if name.endswith(".gz") or (name.endswith(".json") and _starts_with_object(path)):
        stream = _read_json_lines(path)  # SHP and summarize_from_feedback ship JSON Lines named .json
    else:
        stream = read_file(path)
    if label is None or label == path.name:
        return stream
    prefix = path.name

    def relabelled() -> Iterator[RawRow]:
        for origin, row in stream:
            yield label + origin[len(prefix) :], row

    return RowStream(label, stream.unit, relabelled())


def _tokens(relative: str) -> set[str]:
    """Name parts of a relative path: ``data/train_prefs-00000-of-00001.parquet`` -> {data, train_prefs, ...}."""
    return {part for part in re.split(r"[/\\.\-]+", relative.lower()) if part}


def _saved_splits(folder: Path) -> list[str] | None:
    """The splits of a ``save_to_disk`` folder (``[]`` for a lone Dataset), or None if it is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            return list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            return [child.name for child in folder.iterdir() if (child / "state.json").is_file()]
    if (folder / "state.json").is_file():
        return []
    return None


def _chain(streams: list[RowStream], name: str) -> RowStream:
    unit = streams[0].unit if len({s.unit for s in streams}) == 1 else "row"
    return RowStream(name, unit, chain.from_iterable(streams))


def _read_folder(folder: Path, split: str, data_dirs: Sequence[str], contains: str) -> PublicRows | None:
    saved = _saved_splits(folder)
    if saved is not None:
        if not saved:  # one Dataset without splits
            return PublicRows(read_dataset(str(folder), split), whole=True)
        if split not in saved:
            return None
        return PublicRows(read_dataset(str(folder), split))
    files = _data_files(folder, data_dirs, contains)
    if not files:
        raise DataError(
            f"Data folder '{folder}' holds no data files ({', '.join(_DATA_SUFFIXES)}) and was not written by "
            "`save_to_disk`. Point data.path at the dataset's files."
        )
    relative = {f: f.relative_to(folder).as_posix() for f in files}
    chosen = [f for f in files if split.lower() in _tokens(relative[f])]
    if chosen:
        streams = [_read_one(f, relative[f]) for f in chosen]
        return PublicRows(_chain(streams, f"{folder.name}/{split}"))
    return None


def _offline_message(source: str, hub_id: str | None, why: str) -> str:
    where = f"the hub dataset '{hub_id}'" if hub_id else "its published files"
    return (
        f"data source '{source}': {why}. Download {where} on a machine with network (e.g. "
        f"`huggingface-cli download --repo-type dataset {hub_id or 'REPO'} --local-dir DIR`) and pass the "
        f"folder or one of its files as data.path=DIR (see docs/data.md)."
    )


def _load_hub(
    source: str, hub_id: str, split: str, config_name: str | None, data_dirs: Sequence[str]
) -> RowStream | None:
    import datasets

    streams: list[RowStream] = []
    for data_dir in data_dirs or [None]:
        try:
            data = datasets.load_dataset(hub_id, config_name, data_dir=data_dir, split=split)
        except ValueError as error:
            if "split" in str(error).lower() and "unknown" in str(error).lower():
                return None
            raise DataError(_offline_message(source, hub_id, f"loading failed: {error}")) from None
        except Exception as error:  # ConnectionError, FileNotFoundError, hub errors...
            raise DataError(_offline_message(source, hub_id, f"loading failed: {error}")) from None
        label = f"{hub_id}{'/' + data_dir if data_dir else ''}/{split}"

        def rows(data: Any = data, label: str = label) -> Iterator[RawRow]:
            for index, row in enumerate(data, start=1):
                yield f"{label}:{index}", dict(row)

        streams.append(RowStream(label, "row", rows()))
    return _chain(streams, f"{hub_id}/{split}")


def read_public(
    source: str,
    path: str | None,
    split: str,
    *,
    hub_id: str | None,
    config_name: str | None = None,
    data_dirs: Sequence[str] = (),
    local_dirs: Sequence[str] = (),
    file_contains: str = "",
) -> PublicRows | None:
    """Rows of ``split`` of a public dataset: from ``path`` (see the module docstring) or from the hub.

    Returns None when the split does not exist (a folder with no file naming it, a saved dataset without
    it, a hub dataset without it) while other splits do. ``data_dirs``: the repository sub-folders that
    hold this source's files (``helpful-base`` for HH's helpful subset), used on the hub and in folders;
    ``local_dirs``: more such sub-folders, for local folders only; ``file_contains``: in a local folder,
    read only files whose name contains this text.
    """
    if path is not None:
        location = Path(path)
        if location.is_dir():
            local_dirs = (*data_dirs, *local_dirs)
            found = _read_folder(location, split, local_dirs, file_contains)
            if found is not None or _saved_splits(location) is not None:
                return found
            files = _data_files(location, local_dirs, file_contains)
            if _any_split_named(location, files):
                return None  # the folder has splits, but not this one
            streams = [_read_one(f, f.relative_to(location).as_posix()) for f in files]
            return PublicRows(_chain(streams, location.name), whole=True)
        if location.is_file():
            return PublicRows(_read_one(location), whole=True)
        raise DataError(f"data source '{source}': data.path '{path}' does not exist.")
    if hub_id is None:
        raise DataError(_offline_message(source, None, "this dataset is not on the Hugging Face Hub"))
    if not hub_reachable():
        raise DataError(_offline_message(source, hub_id, "the Hugging Face Hub is not reachable"))
    stream = _load_hub(source, hub_id, split, config_name, data_dirs)
    return None if stream is None else PublicRows(stream)


_SPLIT_WORDS = {"train", "test", "validation", "valid", "dev", "eval"}


def _any_split_named(folder: Path, files: Sequence[Path]) -> bool:
    """Whether any of ``files`` names a split word in its path (train, test, validation, ``train_prefs``...)."""
    for f in files:
        for token in _tokens(f.relative_to(folder).as_posix()):
            if token in _SPLIT_WORDS or token.split("_")[0] in _SPLIT_WORDS:
                return True
    return False
