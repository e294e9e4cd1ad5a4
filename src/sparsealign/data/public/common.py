"""What every public-dataset source shares: where its data lives, strict column access, counted drops.

A public source is a :class:`PublicDataset` (hub id, splits, repository sub-folders) plus a ``convert``
function from the dataset's own rows to :class:`~sparsealign.data.examples.PreferenceExample` objects.
:func:`register_public` registers it under its name so that ``data.source=NAME`` loads it from the hub and
``data.source=NAME data.path=FILE_OR_FOLDER`` from a local copy (:mod:`sparsealign.data.public_files`).

A row without a column the schema needs, or with a value of the wrong type, is a :class:`DataError` that
names the source, the column and the row (``"hh: row train.jsonl:3 (line 3): column 'chosen' is
missing"``): such a file is not the dataset the source expects. Rows the source leaves out on purpose (the
SHP score-ratio filter, non-English OASST messages, ...) are counted per reason and logged with their first
origins.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.formats import HOLDOUT_SEED, SkipReport, split_holdout
from sparsealign.data.public_files import read_public
from sparsealign.data.sources import SourceData, SourceRequest, register_source
from sparsealign.errors import DataError

logger = logging.getLogger("sparsealign.data")

__all__ = [
    "Convert",
    "PublicDataset",
    "RowReader",
    "load_public",
    "register_public",
]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(origin: str) -> str | None:
    _, sep, tail = origin.rpartition(":")
    return tail if sep and tail.isdigit() else None


@dataclass
class RowReader:
    """Column access and drop counting for one split of one source."""

    source: str
    split: str
    unit: str = "row"
    drops: SkipReport = field(default_factory=SkipReport)
    seed: int = HOLDOUT_SEED
    sft_turns: str = "all"
    """``data.sft_turns``: which assistant turns of an SFT conversation become examples."""

    def where(self, origin: str) -> str:
        number = _number(origin)
        return f"row {origin}" + (f" ({self.unit} {number})" if number else "")

    def rows(self, stream: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The stream's rows; an unreadable row (malformed JSON) is a :class:`DataError` naming it."""
        for origin, row in stream:
            if isinstance(row, Exception):
                raise DataError(f"{self.source}: {self.where(origin)} could not be read: {row}")
            yield origin, row

    def get(self, row: dict[str, Any], origin: str, column: str, kinds: type | tuple[type, ...] = str) -> Any:
        """``row[column]`` (a dotted name reads nested objects: ``info.post``), checked against ``kinds``."""
        value: Any = row
        parts = column.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(value, dict) or part not in value:
                have = ", ".join(sorted(map(str, value))) if isinstance(value, dict) else _kind(value)
                inside = f" in '{'.'.join(parts[:depth])}'" if depth else ""
                raise DataError(
                    f"{self.source}: {self.where(origin)}: column '{column}' is missing{inside} (the row has: "
                    f"{have or 'nothing'}). Is this the {self.source} dataset as published? See docs/data.md."
                )
            value = value[part]
        accepted = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            names = " or ".join(k.__name__ for k in accepted)
            raise DataError(
                f"{self.source}: {self.where(origin)}: column '{column}' is {_kind(value)}, expected {names}."
            )
        return value

    def messages(self, row: dict[str, Any], origin: str, column: str) -> list[dict[str, str]]:
        """A list of ``{"role", "content"}`` messages (extra keys are dropped)."""
        value = self.get(row, origin, column, list)
        out = []
        for index, message in enumerate(value):
            if not isinstance(message, dict) or not all(
                isinstance(message.get(key), str) for key in ("role", "content")
            ):
                raise DataError(
                    f"{self.source}: {self.where(origin)}: column '{column}'[{index}] is not a "
                    '{"role": str, "content": str} message.'
                )
            out.append({"role": message["role"], "content": message["content"]})
        return out

    def drop(self, reason: str, origin: str) -> None:
        """Leave one row (or pair) out on purpose, counted under ``reason``."""
        self.drops.add(reason, origin)


Convert = Callable[[Iterable[tuple[str, Any]], RowReader], list[PreferenceExample]]
"""``(rows, reader) -> examples``: one source's schema to examples; ``reader.split`` is "train" or "eval"."""


@dataclass(frozen=True)
class PublicDataset:
    """Where a public dataset lives and which of its splits train and evaluate."""

    name: str
    hub_id: str | None
    train_split: str
    eval_split: str | None
    config_name: str | None = None
    data_dirs: tuple[str, ...] = ()
    """Repository sub-folders holding this source's files (hub ``data_dir`` and local folders)."""
    local_dirs: tuple[str, ...] = ()
    """More sub-folders, looked for in local folders only."""
    file_contains: str = ""
    """In a local folder, read only the files whose name contains this text."""
    schema_url: str = ""


def _check_nonempty(examples: list[PreferenceExample], reader: RowReader) -> list[PreferenceExample]:
    """Drop pairs with an empty response or identical responses (SFT rows, which repeat chosen, excepted)."""
    kept = []
    for ex in examples:
        texts = [
            r if isinstance(r, str) else "".join(m["content"] for m in r) for r in (ex.chosen, ex.rejected)
        ]
        if any(not t.strip() for t in texts):
            reader.drop("empty_response", ex.origin)
        elif ex.chosen == ex.rejected and not ex.meta.get("sft_only"):
            reader.drop("identical_responses", ex.origin)
        else:
            kept.append(ex)
    return kept


def _convert_split(
    dataset: PublicDataset, convert: Convert, data_cfg: Any, split_name: str, role: str, seed: int
) -> tuple[list[PreferenceExample], bool] | None:
    found = read_public(
        dataset.name,
        data_cfg.path,
        split_name,
        hub_id=dataset.hub_id,
        config_name=dataset.config_name,
        data_dirs=dataset.data_dirs,
        local_dirs=dataset.local_dirs,
        file_contains=dataset.file_contains,
    )
    if found is None:
        return None
    reader = RowReader(
        dataset.name, role, found.stream.unit, SkipReport(unit=found.stream.unit), seed, data_cfg.sft_turns
    )
    total = 0

    def counted() -> Iterator[tuple[str, Any]]:
        nonlocal total
        for item in found.stream:
            total += 1
            yield item

    examples = _check_nonempty(convert(counted(), reader), reader)
    for ex in examples:
        ex.meta.setdefault("source", dataset.name)
    drops = reader.drops
    drops.total = total
    if drops.skipped:
        logger.warning("%s (%s): %d examples; %s", dataset.name, role, len(examples), drops.summary())
    else:
        logger.info("%s (%s): %d rows -> %d examples", dataset.name, role, total, len(examples))
    return examples, found.whole


def load_public(
    dataset: PublicDataset, convert: Convert, config: Any
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Training and evaluation examples of ``dataset`` for the run ``config``.

    Splits: ``data.split`` (when changed from its default "train") or the dataset's training split;
    ``data.eval_split`` or the dataset's evaluation split. A single file or an unsplit folder is all
    training data, of which ``data.eval_fraction`` is held out (:func:`~sparsealign.data.formats.split_holdout`).
    """
    d = config.data
    seed = getattr(getattr(config, "train", None), "seed", HOLDOUT_SEED)
    train_split = d.split if d.split != "train" else dataset.train_split
    loaded = _convert_split(dataset, convert, d, train_split, "train", seed)
    if loaded is None:
        raise DataError(
            f"data source '{dataset.name}': split '{train_split}' not found in "
            f"{d.path or dataset.hub_id}. Set data.split to one of its splits."
        )
    train, whole = loaded
    if not train:
        raise DataError(f"data source '{dataset.name}': no usable training examples (see the log above).")
    if whole:
        return split_holdout(train, d.eval_fraction)
    eval_split = d.eval_split or dataset.eval_split
    evaluation = None
    if eval_split:
        found = _convert_split(dataset, convert, d, eval_split, "eval", seed)
        evaluation = None if found is None else found[0]
    if evaluation is None:
        logger.info("%s: no '%s' split; holding out data.eval_fraction", dataset.name, eval_split)
        return split_holdout(train, d.eval_fraction)
    return train, evaluation


def string_prompts(examples: Iterable[PreferenceExample]) -> list[str]:
    """Distinct string prompts, in order (conversational prompts are left to the caller)."""
    seen: dict[str, None] = {}
    for ex in examples:
        if isinstance(ex.prompt, str):
            seen.setdefault(ex.prompt, None)
    return list(seen)


def register_public(dataset: PublicDataset, convert: Convert) -> Callable[[SourceRequest], SourceData]:
    """Register ``dataset`` as the source ``dataset.name`` and return the source function."""

    def source(request: SourceRequest) -> SourceData:
        train, evaluation = load_public(dataset, convert, request.config)
        return SourceData(train=train, eval=evaluation, eval_prompts=string_prompts(evaluation))

    source.__name__ = source.__qualname__ = f"source_{dataset.name.replace('-', '_')}"
    source.__module__ = convert.__module__
    source.__doc__ = (
        f"The '{dataset.name}' source ({dataset.hub_id or 'local files'}): see {convert.__module__}."
    )
    register_source(dataset.name)(source)
    return source


def sample_pairs(pairs: list[Any], limit: int, seed: int) -> list[Any]:
    """At most ``limit`` of ``pairs``, drawn without replacement by ``random.Random(seed)`` (order kept)."""
    if len(pairs) <= limit:
        return list(pairs)
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in chosen]
