"""From raw rows to :class:`PreferenceExample` objects, counting (or, in strict mode, refusing) bad rows.

Supported row formats (the preference formats of TRL), after the ``data.columns`` renaming:

* **standard**: ``prompt``, ``chosen``, ``rejected`` are strings; the responses continue the prompt text.
* **conversational**: ``prompt`` is a list of ``{"role", "content"}`` messages (the conversation before
  the responses) and ``chosen`` / ``rejected`` are lists of (assistant) messages.
* **full conversations** (UltraFeedback binarized): ``chosen`` / ``rejected`` are whole conversations that
  begin with the prompt messages, and ``prompt`` repeats the user turn as a string; the shared leading
  messages are the prompt (as for an implicit prompt) and the string is not used.
* **implicit prompt**: only ``chosen`` and ``rejected``. For strings the prompt is their exact longest
  common prefix of characters (no cut at a word boundary); for conversations it is their common leading
  messages. The responses are what follows.

A row that cannot be used is skipped with one of the reasons in :data:`SKIP_REASONS`, counted in a
:class:`SkipReport` that remembers the first few origins (``"train.jsonl:12"``) per reason.
"""

from __future__ import annotations

import difflib
import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sparsealign.data.examples import Message, PreferenceExample
from sparsealign.data.files import RawRow, RowStream, dataset_has_single_split, read_dataset, read_file
from sparsealign.errors import DataError

__all__ = [
    "FIELDS",
    "HOLDOUT_SEED",
    "SKIP_REASONS",
    "DataError",
    "Skip",
    "SkipReport",
    "extract_prompt",
    "load_examples",
    "parse_row",
    "parse_rows",
    "split_holdout",
]

logger = logging.getLogger("sparsealign.data")

FIELDS = ("prompt", "chosen", "rejected")
SKIP_REASONS = ("malformed_json", "missing_field", "not_a_string", "empty_response", "identical_responses")
HOLDOUT_SEED = 20240601
"""Fixed seed of the eval hold-out shuffle: the same data always gives the same train/eval split."""

MAX_ORIGINS = 5
"""Origins remembered per skip reason."""


@dataclass(frozen=True)
class Skip:
    """Why one row was not used: ``reason`` is one of :data:`SKIP_REASONS`, ``detail`` is for humans."""

    reason: str
    detail: str


# --------------------------------------------------------------------------------------------------
# Skip report


def _split_origin(origin: str) -> tuple[str, str | None]:
    """``"train.jsonl:12"`` -> ``("train.jsonl", "12")``; an origin without a trailing number -> (origin, None)."""
    head, sep, tail = origin.rpartition(":")
    return (head, tail) if sep and tail.isdigit() else (origin, None)


@dataclass
class SkipReport:
    """Counts of skipped rows per reason, with the first :data:`MAX_ORIGINS` origins of each."""

    total: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    origins: dict[str, list[str]] = field(default_factory=dict)
    unit: str = "line"

    @property
    def skipped(self) -> int:
        """Rows skipped for any reason."""
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        """Rows that became examples."""
        return self.total - self.skipped

    def add(self, reason: str, origin: str) -> None:
        """Count one skipped row."""
        self.counts[reason] += 1
        kept = self.origins.setdefault(reason, [])
        if len(kept) < MAX_ORIGINS:
            kept.append(origin)

    def merge(self, other: SkipReport) -> SkipReport:
        """Add ``other``'s totals, counts and origins into this report (in place) and return it."""
        self.total += other.total
        self.counts.update(other.counts)
        for reason, origins in other.origins.items():
            kept = self.origins.setdefault(reason, [])
            kept.extend(origins[: max(0, MAX_ORIGINS - len(kept))])
        return self

    def _where(self, reason: str) -> str:
        origins = self.origins.get(reason, [])
        if not origins:
            return ""
        parts = [_split_origin(origin) for origin in origins]
        same_place = len({head for head, _ in parts}) == 1 and all(num is not None for _, num in parts)
        if same_place:
            unit = self.unit if len(parts) == 1 else f"{self.unit}s"
            listed = f"{unit} {', '.join(str(num) for _, num in parts)}"
        else:
            listed = ", ".join(origins)
        more = ", ..." if self.counts[reason] > len(origins) else ""
        return f" ({listed}{more})"

    def summary(self) -> str:
        """E.g. ``"skipped 3 of 10 rows: empty_response=2 (lines 4, 7), malformed_json=1 (line 2)"``."""
        text = f"skipped {self.skipped} of {self.total} rows"
        if not self.skipped:
            return text
        ordered = sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))
        return text + ": " + ", ".join(f"{reason}={count}{self._where(reason)}" for reason, count in ordered)


# --------------------------------------------------------------------------------------------------
# One row


def check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a ``data.columns`` mapping (target field -> column in the data)."""
    mapping = dict(columns or {})
    for target, source in mapping.items():
        if target in FIELDS:
            continue
        if source in FIELDS:
            hint = f" It maps field -> column; did you mean {{{source}: {target}}}?"
        else:
            close = difflib.get_close_matches(str(target), FIELDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(f"data.columns key '{target}' is not one of {', '.join(FIELDS)}.{hint}")
    return mapping


def _rename(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """Apply the column mapping: each target field takes the value of its source column."""
    if not columns:
        return dict(row)
    sources = set(columns.values())
    out = {key: value for key, value in row.items() if key not in sources}
    for target, source in columns.items():
        if source in row:
            out[target] = row[source]
    return out


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list | tuple) else f"a {type(value).__name__}"


def _messages(value: Any, name: str) -> list[Message] | Skip:
    """Validate a list of ``{"role": str, "content": str}`` messages (extra keys are kept)."""
    messages: list[Message] = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            return Skip("not_a_string", f"'{name}'[{index}] is {_kind(message)}, expected a message object")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return Skip(
                    "not_a_string",
                    f"'{name}'[{index}] needs a string '{key}' (got {_kind(message.get(key))})",
                )
        messages.append(dict(message))
    return messages


def extract_prompt(
    chosen: str | list[Message], rejected: str | list[Message]
) -> tuple[str | list[Message], str | list[Message], str | list[Message]]:
    """Split an implicit-prompt pair into ``(prompt, chosen, rejected)``.

    Strings: the prompt is the exact longest common prefix of characters. Conversations: the prompt is the
    longest run of identical leading messages.
    """
    limit = min(len(chosen), len(rejected))
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _is_empty(response: str | list[Message]) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return all(not message["content"].strip() for message in response)


def _typed_fields(data: dict[str, Any]) -> tuple[Any, Any, Any] | Skip:
    """Check the types of prompt/chosen/rejected: all strings, or all message lists (prompt may be absent)."""
    prompt, chosen, rejected = data.get("prompt"), data["chosen"], data["rejected"]
    if isinstance(chosen, str):
        for name, value in (("rejected", rejected), ("prompt", prompt)):
            if value is not None and not isinstance(value, str):
                return Skip("not_a_string", f"'chosen' is a string but '{name}' is {_kind(value)}")
        return prompt, chosen, rejected
    if not isinstance(chosen, list | tuple):
        return Skip("not_a_string", f"'chosen' is {_kind(chosen)}, expected a string or a list of messages")
    if isinstance(prompt, str):
        # Full conversations with the prompt also given as text (UltraFeedback binarized): the responses'
        # shared leading messages are the prompt; the text column is redundant.
        prompt = None
        if not (isinstance(rejected, list | tuple) and rejected and chosen and rejected[0] == chosen[0]):
            return Skip(
                "not_a_string",
                "'prompt' is a string and 'chosen' a list of messages, but 'chosen' and 'rejected' do not "
                "start with the same (prompt) messages",
            )
    checked = []
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None:
            checked.append(None)
            continue
        if not isinstance(value, list | tuple):
            return Skip("not_a_string", f"'chosen' is a list of messages but '{name}' is {_kind(value)}")
        messages = _messages(value, name)
        if isinstance(messages, Skip):
            return messages
        checked.append(messages)
    return checked[0], checked[1], checked[2]


def parse_row(
    row: Mapping[str, Any], columns: Mapping[str, str] | None = None, origin: str = ""
) -> PreferenceExample | Skip:
    """Turn one raw row into a :class:`PreferenceExample`, or a :class:`Skip` saying why it cannot be used."""
    mapping = dict(columns or {})
    data = _rename(row, mapping)
    for name in ("chosen", "rejected"):
        if data.get(name) is None:
            mapped = f" (mapped from column '{mapping[name]}')" if name in mapping else ""
            have = ", ".join(sorted(map(str, row))) or "none"
            return Skip(
                "missing_field",
                f"no '{name}' column{mapped}; the row has columns: {have}. Map yours with data.columns",
            )
    typed = _typed_fields(data)
    if isinstance(typed, Skip):
        return typed
    prompt, chosen, rejected = typed
    if chosen == rejected:
        if _is_empty(chosen):
            return Skip("empty_response", "'chosen' and 'rejected' are both empty")
        return Skip("identical_responses", "'chosen' and 'rejected' are identical")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(value):
            return Skip("empty_response", f"'{name}' response is empty")
    meta = {key: value for key, value in data.items() if key not in FIELDS}
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, origin=origin, meta=meta)


# --------------------------------------------------------------------------------------------------
# Many rows


def _no_usable_rows(report: SkipReport, name: str) -> DataError:
    if report.total == 0:
        return DataError(f"The data in {name} has no rows.")
    hint = ""
    if report.counts.get("missing_field"):
        hint = (
            " Rows need 'chosen' and 'rejected' (and optionally 'prompt'); map other column names with "
            "data.columns, e.g. data.columns={prompt: question, chosen: good, rejected: bad}."
        )
    return DataError(f"None of the {report.total} rows in {name} were usable: {report.summary()}.{hint}")


def parse_rows(
    rows: Iterable[RawRow] | RowStream,
    columns: Mapping[str, str] | None = None,
    strict: bool = False,
    *,
    unit: str = "line",
    name: str = "the data",
    require_any: bool = True,
) -> tuple[list[PreferenceExample], SkipReport]:
    """Parse ``(origin, row or exception)`` pairs into examples, skipping and counting bad rows.

    With ``strict`` the first bad row raises :class:`DataError` naming its origin and reason. With
    ``require_any`` a result without a single usable row raises :class:`DataError` with the counts.
    A :class:`RowStream` brings its own ``unit`` and ``name``.
    """
    if isinstance(rows, RowStream):
        unit, name = rows.unit, rows.name
    mapping = check_columns(columns)
    report = SkipReport(unit=unit)
    examples: list[PreferenceExample] = []
    for origin, row in rows:
        report.total += 1
        if isinstance(row, Exception):
            result: PreferenceExample | Skip = Skip("malformed_json", str(row))
        else:
            result = parse_row(row, mapping, origin)
        if isinstance(result, Skip):
            if strict:
                _, number = _split_origin(origin)
                where = f" ({unit} {number})" if number else ""
                raise DataError(
                    f"Bad data row at {origin}{where}: {result.reason}: {result.detail}. Fix or remove the "
                    f"row, or set data.strict=false to skip and count bad rows."
                )
            report.add(result.reason, origin)
            continue
        examples.append(result)
    if require_any and not examples:
        raise _no_usable_rows(report, name)
    return examples, report


def split_holdout(
    examples: list[PreferenceExample], fraction: float, seed: int = HOLDOUT_SEED
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Hold out ``fraction`` of the examples (at least one when there are two or more) for evaluation.

    The held-out indices come from a shuffle with a fixed ``seed``, so the same data always gives the same
    split; both parts keep the original order.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}.")
    count = len(examples)
    if fraction == 0.0 or count < 2:
        return list(examples), []
    n_eval = min(count - 1, max(1, round(count * fraction)))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [example for index, example in enumerate(examples) if index not in held]
    evaluation = [example for index, example in enumerate(examples) if index in held]
    return train, evaluation


def _log_report(report: SkipReport, name: str) -> None:
    if report.skipped:
        logger.warning("%s: %s", name, report.summary())
    else:
        logger.info("%s: read %d rows, none skipped", name, report.total)


def _load_dataset_examples(cfg: Any) -> tuple[list[PreferenceExample], list[PreferenceExample], SkipReport]:
    stream = read_dataset(cfg.dataset, cfg.split)
    train, report = parse_rows(stream, cfg.columns, cfg.strict)
    _log_report(report, stream.name)
    if not cfg.eval_split:
        return *split_holdout(train, cfg.eval_fraction), report
    if cfg.eval_split == cfg.split:
        raise DataError(f"data.eval_split '{cfg.eval_split}' is the training split; choose another split.")
    if dataset_has_single_split(cfg.dataset):
        raise DataError(
            f"Dataset folder '{cfg.dataset}' holds a single split, so data.eval_split='{cfg.eval_split}' "
            f"cannot be found; unset data.eval_split to hold out data.eval_fraction instead."
        )
    eval_stream = read_dataset(cfg.dataset, cfg.eval_split)
    evaluation, eval_report = parse_rows(eval_stream, cfg.columns, cfg.strict)
    _log_report(eval_report, eval_stream.name)
    return train, evaluation, report.merge(eval_report)


def load_examples(cfg: Any) -> tuple[list[PreferenceExample], list[PreferenceExample], SkipReport]:
    """Read ``data.path`` or ``data.dataset`` of a :class:`~sparsealign.config.DataConfig`.

    Returns ``(train, eval, report)``: the eval examples come from ``data.eval_split`` (datasets only) or a
    deterministic hold-out of ``data.eval_fraction``; ``data.max_examples`` then caps the training examples.
    ``data.source`` is not handled here (see :mod:`sparsealign.data.sources`).
    """
    if cfg.path is not None:
        if cfg.eval_split:
            logger.warning(
                "data.eval_split applies to data.dataset only; holding out data.eval_fraction instead"
            )
        stream = read_file(cfg.path)
        examples, report = parse_rows(stream, cfg.columns, cfg.strict)
        _log_report(report, stream.name)
        train, evaluation = split_holdout(examples, cfg.eval_fraction)
    elif cfg.dataset is not None:
        train, evaluation, report = _load_dataset_examples(cfg)
    elif cfg.source is not None:
        raise DataError(
            f"data.source='{cfg.source}' is a registered source; load it with "
            f"sparsealign.data.sources.get_source, not load_examples."
        )
    else:
        raise DataError("No training data: set one of data.path, data.dataset or data.source.")
    if cfg.max_examples is not None:
        train = train[: max(0, cfg.max_examples)]
    logger.info("data: %d training and %d eval examples", len(train), len(evaluation))
    return train, evaluation, report
