"""``sparsealign data``: how a recipe's data is read and tokenised, the first thing to run when training
looks wrong.

:func:`inspect_data` reads the configured data exactly as training does (``data.path``, ``data.dataset`` or
``data.source``), tokenises every example with the run's tokenizer and ``data.*`` options, and returns a
:class:`DataInspection`: examples per source, rows skipped and pairs dropped per reason with their first
origins, token-length percentiles, the number of boundary fallbacks (pairs whose response had to be
tokenised on its own because the prompt's tokens are not a prefix of the whole text's) and, for the examples
to show, the rendered texts and token counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.formats import MAX_ORIGINS, SkipReport, load_examples
from sparsealign.data.sources import load_source
from sparsealign.data.tokenize import pair_texts, tokenize_pair
from sparsealign.errors import DataError

__all__ = ["DataInspection", "InspectedExample", "inspect_data", "percentiles"]

PERCENTILES = (50, 90, 99, 100)


@dataclass
class InspectedExample:
    """One tokenised example: texts as rendered, token counts, where it came from."""

    source: str
    origin: str
    prompt_text: str
    chosen_text: str
    rejected_text: str
    prompt_tokens: int
    chosen_tokens: int
    rejected_tokens: int
    boundary_fallback: bool = False

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of an example."""
        return {
            "prompt_text": self.prompt_text,
            "chosen_text": self.chosen_text,
            "rejected_text": self.rejected_text,
            "prompt_tokens": self.prompt_tokens,
            "chosen_tokens": self.chosen_tokens,
            "rejected_tokens": self.rejected_tokens,
            "source": self.source,
            "origin": self.origin,
            "boundary_fallback": self.boundary_fallback,
        }


@dataclass
class DataInspection:
    """What :func:`inspect_data` found for one split."""

    split: str
    read_from: str
    rows: int
    examples: list[InspectedExample]
    per_source: Counter[str]
    dropped: Counter[str]
    first_origins: dict[str, list[str]] = field(default_factory=dict)
    boundary_fallbacks: int = 0

    def lengths(self) -> dict[str, dict[str, int]]:
        """Token-length percentiles (p50, p90, p99, max) of prompts, responses and whole sequences."""
        columns = {
            "prompt": [e.prompt_tokens for e in self.examples],
            "chosen": [e.chosen_tokens for e in self.examples],
            "rejected": [e.rejected_tokens for e in self.examples],
            "total": [e.prompt_tokens + max(e.chosen_tokens, e.rejected_tokens) for e in self.examples],
        }
        return {name: percentiles(values) for name, values in columns.items()}

    def summary(self) -> dict[str, Any]:
        """The last ``--json`` object."""
        return {
            "summary": True,
            "split": self.split,
            "read_from": self.read_from,
            "rows": self.rows,
            "examples": len(self.examples),
            "per_source": dict(self.per_source),
            "dropped": dict(self.dropped),
            "first_dropped": self.first_origins,
            "boundary_fallbacks": self.boundary_fallbacks,
            "lengths": self.lengths(),
        }


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles ``p50``, ``p90``, ``p99`` and ``max`` of ``values`` (empty: ``{}``)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for q in PERCENTILES:
        rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), at least the first
        out["max" if q == 100 else f"p{q}"] = ordered[rank - 1]
    return out


def _read(
    config: Any, split: str, context: dict[str, Any]
) -> tuple[list[PreferenceExample], SkipReport | None, str]:
    """The split's text examples as training reads them, the parse report, and a name for where from."""
    d = config.data
    if d.source is not None:
        source = load_source(config, context)
        return (source.train if split == "train" else source.eval), None, f"data.source={d.source}"
    if d.path is None and d.dataset is None:
        raise DataError("No data configured: set data.path (a local file), data.dataset or data.source.")
    train, evaluation, report = load_examples(d)
    return (train if split == "train" else evaluation), report, str(d.path or d.dataset)


def inspect_data(
    config: Any, tokenizer: Any, split: str = "train", context: dict[str, Any] | None = None
) -> DataInspection:
    """Read and tokenise the ``split`` (``train`` or ``eval``) of ``config``'s data with ``tokenizer``.

    ``context`` is handed to a named source (the objects a source like ``imdb`` needs: ``bundle``,
    ``reward``...). Examples that carry their token ids (sampled pairs) are decoded for display.
    """
    if split not in ("train", "eval"):
        raise DataError(f"--split must be 'train' or 'eval', not '{split}'.")
    examples, report, read_from = _read(config, split, context or {})
    default_source = config.data.source or Path(read_from).name
    dropped: Counter[str] = Counter()
    first: dict[str, list[str]] = {}
    if report is not None:
        dropped.update(report.counts)
        first.update({reason: list(origins) for reason, origins in report.origins.items()})
    kept: list[InspectedExample] = []
    per_source: Counter[str] = Counter()
    fallbacks = 0
    for example in examples:
        source = str(example.meta.get("source") or default_source)
        inspected = _inspect_one(example, tokenizer, config.data, source)
        if isinstance(inspected, str):
            dropped[inspected] += 1
            origins = first.setdefault(inspected, [])
            if len(origins) < MAX_ORIGINS:
                origins.append(example.origin)
            continue
        per_source[source] += 1
        fallbacks += inspected.boundary_fallback
        kept.append(inspected)
    rows = report.total if report is not None else len(examples)
    return DataInspection(split, read_from, rows, kept, per_source, dropped, first, fallbacks)


def _inspect_one(
    example: PreferenceExample, tokenizer: Any, data_cfg: Any, source: str
) -> InspectedExample | str:
    """One example's texts and token counts, or the reason tokenisation drops it."""
    meta = example.meta
    if "prompt_ids" in meta:  # sampled pairs: token ids are the truth; decode them for display
        ids = [list(meta[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
        texts = [tokenizer.decode(tokens) for tokens in ids]
        return InspectedExample(source, example.origin, *texts, *(len(tokens) for tokens in ids))
    stats: Counter[str] = Counter()
    texts = pair_texts(example, tokenizer, data_cfg)
    if isinstance(texts, str):
        return texts
    pair = tokenize_pair(example, tokenizer, data_cfg, stats=stats)
    if isinstance(pair, str):
        return pair
    return InspectedExample(
        source,
        example.origin,
        *texts,
        len(pair.prompt_ids),
        len(pair.chosen_ids),
        len(pair.rejected_ids),
        boundary_fallback=stats["boundary_fallback"] > 0,
    )
