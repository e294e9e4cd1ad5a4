"""From raw rows to :class:`PreferenceExample` objects, counting (or, in strict mode, refusing) bad rows.

Supported row formats (the preference formats of TRL), after the ``data.columns`` renaming:

* **standard**: ``prompt``, ``chosen``, ``rejected`` are strings; the responses continue the prompt text.
* **conversational**: ``prompt`` is a list of ``{"role", "content"}`` messages (the conversation before
  the responses) and ``chosen`` / ``rejected`` are lists of (assistant) messages.
* **full conversations** (UltraFeedback binarized): ``chosen`` / ``rejected`` are whole conversations that
  begin with the prompt messages, and ``prompt`` repeats the user turn as a string; the shared leading
  messages are the prompt (as for an implicit prompt) and the string is not used.
* **SFT conversations** (UltraChat, any chat dataset): only ``messages``, a list of ``{"role", "content"}``.
  Each assistant turn (``data.sft_turns=all``) or the last one (``last``) becomes an example whose prompt is
  every message before it; such examples carry no rejected response (``meta["sft_only"]``) and train only
  with methods that use the chosen rows alone (``method.name=sft``).
* **unpaired** (binary feedback, TRL's unpaired format): ``prompt``, ``completion`` and ``label`` (true or
  false, or the integers 1 and 0: is the completion desirable?), strings or message lists as above. Each row
  becomes one item (:func:`unpaired_example`) that trains with KTO; :func:`unpair_examples` turns preference
  pairs into such items (``data.flatten_pairs``).
* **implicit prompt**: only ``chosen`` and ``rejected``. For strings the prompt is their longest common
  prefix of characters, ending at its last ``"\n\nAssistant:"`` for HH-style transcripts and otherwise
  without trailing whitespace (the whitespace starts the responses, TRL's rule); for conversations it is
  their common leading messages. The responses are what follows.

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

from sparsealign.data.examples import Message, PreferenceExample, feedback_label
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
    "sft_examples",
    "split_holdout",
    "unpair_examples",
    "unpaired_example",
]

logger = logging.getLogger("sparsealign.data")

FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("completion", "label")
"""The unpaired format's fields besides ``prompt`` (``data.columns`` may map them too)."""
SKIP_REASONS = (
    "malformed_json",
    "not_an_object",
    "missing_field",
    "not_a_string",
    "empty_response",
    "identical_responses",
    "bad_label",
)
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
    known = FIELDS + UNPAIRED_FIELDS
    for target, source in mapping.items():
        if target in known:
            continue
        if source in known:
            hint = f" It maps field -> column; did you mean {{{source}: {target}}}?"
        else:
            close = difflib.get_close_matches(str(target), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(f"data.columns key '{target}' is not one of {', '.join(known)}.{hint}")
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


HH_ASSISTANT = "\n\nAssistant:"
"""The turn marker of Anthropic HH-style transcripts (``\n\nHuman: ... \n\nAssistant: ...``)."""


def _string_split_point(chosen: str, rejected: str) -> int:
    """Where an implicit-prompt string pair splits: the end of the last ``"\n\nAssistant:"`` inside their
    common prefix when there is one (HH transcripts: the split of the SparsePO code), else the common prefix
    with its trailing whitespace given to the responses (TRL's rule), so that a response starts with its
    space and tokenises as it does inside the whole text."""
    limit = min(len(chosen), len(rejected))
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    marker = chosen.rfind(HH_ASSISTANT, 0, shared)
    if marker >= 0 and marker + len(HH_ASSISTANT) <= shared:
        return marker + len(HH_ASSISTANT)
    while shared > 0 and chosen[shared - 1].isspace():
        shared -= 1
    return shared


def extract_prompt(
    chosen: str | list[Message], rejected: str | list[Message]
) -> tuple[str | list[Message], str | list[Message], str | list[Message]]:
    """Split an implicit-prompt pair into ``(prompt, chosen, rejected)``.

    Strings: the prompt is the longest common prefix of characters, cut back to the end of its last
    ``"\n\nAssistant:"`` for HH-style transcripts, and otherwise without its trailing whitespace (which
    goes to both responses, as in TRL). Conversations: the prompt is the longest run of identical leading
    messages.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _string_split_point(chosen, rejected)
        return chosen[:cut], chosen[cut:], rejected[cut:]
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


def sft_examples(messages: Any, origin: str = "", turns: str = "all") -> list[PreferenceExample] | Skip:
    """The SFT examples of one ``messages`` conversation: one per assistant turn (``turns="all"``) or for the
    last one (``"last"``), each prompted by every message before it. The rejected side repeats the chosen
    one and is never trained on (``meta["sft_only"]``)."""
    if turns not in ("all", "last"):
        raise DataError(f"data.sft_turns must be 'all' or 'last', got '{turns}'.")
    if not isinstance(messages, list | tuple):
        return Skip("not_a_string", f"'messages' is {_kind(messages)}, expected a list of messages")
    checked = _messages(messages, "messages")
    if isinstance(checked, Skip):
        return checked
    positions = [index for index, message in enumerate(checked) if message["role"] == "assistant"]
    if not positions:
        return Skip("missing_field", "'messages' has no assistant turn to train on")
    if turns == "last":
        positions = positions[-1:]
    examples = []
    for index in positions:
        response = [checked[index]]
        if _is_empty(response):
            return Skip("empty_response", f"assistant turn {index} of 'messages' is empty")
        if index == 0:
            return Skip("missing_field", "'messages' starts with an assistant turn: it has no prompt")
        meta = {"sft_only": True, "turn": index}
        examples.append(PreferenceExample(checked[:index], response, response, origin=origin, meta=meta))
    return examples


def _label(value: Any) -> bool | Skip:
    """An unpaired row's label: a bool, or the integer 1 or 0 (not 1.0, not "true")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return Skip("bad_label", f"'label' is {value!r}, expected true or false (or 1 or 0)")


def unpaired_example(row: Mapping[str, Any], origin: str = "") -> PreferenceExample | Skip:
    """One binary-feedback item from a row of TRL's unpaired format (``prompt``, ``completion``, ``label``,
    after the ``data.columns`` renaming), or a :class:`Skip`.

    ``prompt`` and ``completion`` are both strings, or both message lists (the conversation before the
    completion, and the completion's assistant messages). The item is a :class:`PreferenceExample` whose
    chosen and rejected sides are both the completion (only the chosen side is ever forwarded) and whose
    ``meta["label"]`` is the label as a bool (desirable or not); other columns go to ``meta`` as well.
    """
    for name in ("prompt", "completion", "label"):
        if row.get(name) is None:
            have = ", ".join(sorted(map(str, row))) or "none"
            return Skip(
                "missing_field",
                f"no '{name}' column for an unpaired row (prompt, completion, label); the row has columns: "
                f"{have}. Map yours with data.columns",
            )
    label = _label(row["label"])
    if isinstance(label, Skip):
        return label
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(completion, str):
        if not isinstance(prompt, str):
            return Skip("not_a_string", f"'completion' is a string but 'prompt' is {_kind(prompt)}")
    elif isinstance(completion, list | tuple) and isinstance(prompt, list | tuple):
        prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
        for checked in (prompt, completion):
            if isinstance(checked, Skip):
                return checked
    else:
        return Skip(
            "not_a_string",
            f"'prompt' and 'completion' are {_kind(prompt)} and {_kind(completion)}; expected two strings "
            "or two lists of messages",
        )
    if _is_empty(completion):
        return Skip("empty_response", "'completion' is empty")
    meta = {key: value for key, value in row.items() if key not in ("prompt", *UNPAIRED_FIELDS)}
    meta["label"] = label
    return PreferenceExample(prompt, completion, completion, origin=origin, meta=meta)


def unpair_examples(examples: Iterable[PreferenceExample]) -> list[PreferenceExample]:
    """Preference pairs as binary feedback (``data.flatten_pairs``, TRL's ``unpair_preference_dataset``):
    each pair gives two items in a row, its chosen response labelled desirable and then its rejected
    response labelled undesirable; items that already carry a label, and SFT conversations, are kept as
    they are."""
    items: list[PreferenceExample] = []
    for example in examples:
        if feedback_label(example) is not None or example.meta.get("sft_only"):
            items.append(example)
            continue
        for response, label in ((example.chosen, True), (example.rejected, False)):
            meta = {**example.meta, "label": label}
            items.append(PreferenceExample(example.prompt, response, response, example.origin, meta))
    return items


def parse_row(
    row: Mapping[str, Any], columns: Mapping[str, str] | None = None, origin: str = ""
) -> PreferenceExample | Skip:
    """Turn one raw row into a :class:`PreferenceExample`, or a :class:`Skip` saying why it cannot be used
    (a ``messages``-only row: :func:`sft_examples`)."""
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
            " Rows need 'chosen' and 'rejected' (and optionally 'prompt'), or 'prompt', 'completion' and "
            "'label' (binary feedback); map other column names with "
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
    sft_turns: str = "all",
) -> tuple[list[PreferenceExample], SkipReport]:
    """Parse ``(origin, row or exception)`` pairs into examples, skipping and counting bad rows; a row with
    ``messages`` and no ``chosen`` gives its SFT examples (:func:`sft_examples`, ``sft_turns``), one with
    ``completion`` and no ``chosen`` a binary-feedback item (:func:`unpaired_example`).

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
            result: PreferenceExample | list[PreferenceExample] | Skip = Skip("malformed_json", str(row))
        elif not isinstance(row, Mapping):
            result = Skip("not_an_object", f"the row is {_kind(row)}, expected an object with named fields")
        elif "messages" in row and mapping.get("chosen", "chosen") not in row:
            result = sft_examples(row["messages"], origin, sft_turns)
        elif mapping.get("completion", "completion") in row and mapping.get("chosen", "chosen") not in row:
            result = unpaired_example(_rename(row, mapping), origin)
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
        examples.extend(result if isinstance(result, list) else [result])
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
    train, report = parse_rows(stream, cfg.columns, cfg.strict, sft_turns=cfg.sft_turns)
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
    evaluation, eval_report = parse_rows(eval_stream, cfg.columns, cfg.strict, sft_turns=cfg.sft_turns)
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
        examples, report = parse_rows(stream, cfg.columns, cfg.strict, sft_turns=cfg.sft_turns)
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
