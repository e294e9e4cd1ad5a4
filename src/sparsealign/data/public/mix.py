"""``mix``: several sources in one run, each with its weight and splits (``data.source=mix data.mix=[...]``).

Each entry of ``data.mix`` is ``{source: NAME, path: FILE_OR_FOLDER (optional), weight: W (default 1),
split: ..., eval_split: ...}``. Each source is loaded as if it were the run's only ``data.source`` (with that
path and those splits). ``weight`` scales its training examples: W = 0.5 keeps half of them, W = 2 takes them
twice, any W keeps ``round(W * n)`` (whole copies, then a part drawn with ``random.Random(train.seed)``).
Evaluation examples and prompts are all kept.

Unlike HALOs, whose ``DataLoader`` merges the datasets into one dict keyed by prompt (a prompt present in two
datasets keeps only the later one's pairs), examples are kept in lists, so nothing overwrites anything: a
prompt shared by two sources keeps both sources' pairs. Such prompts and exact duplicate pairs across
sources are counted and logged (they are kept, apart). Every example carries ``meta["source"]``.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.sources import SourceData, SourceRequest, get_source, register_source
from sparsealign.errors import DataError

logger = logging.getLogger("sparsealign.data")

ENTRY_KEYS = ("source", "path", "weight", "split", "eval_split")


def _key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def weighted(examples: list[PreferenceExample], weight: float, seed: int) -> list[PreferenceExample]:
    """``round(weight * len(examples))`` examples: whole copies, then a seeded draw without replacement."""
    if weight < 0:
        raise DataError(f"data.mix: weight {weight} is negative.")
    target = round(weight * len(examples))
    copies, rest = divmod(target, len(examples)) if examples else (0, 0)
    picked = sorted(random.Random(seed).sample(range(len(examples)), rest))
    return [ex for _ in range(copies) for ex in examples] + [examples[i] for i in picked]


def count_overlaps(parts: dict[str, list[PreferenceExample]]) -> dict[str, int]:
    """``shared_prompts``: prompts present in more than one source; ``duplicate_pairs``: identical
    (prompt, chosen, rejected) pairs found in more than one source (each counted once per extra source)."""
    prompt_sources: dict[str, set[str]] = {}
    pair_sources: dict[str, set[str]] = {}
    for name, examples in parts.items():
        for ex in examples:
            prompt_sources.setdefault(_key(ex.prompt), set()).add(name)
            pair = json.dumps([_key(ex.prompt), _key(ex.chosen), _key(ex.rejected)])
            pair_sources.setdefault(pair, set()).add(name)
    return {
        "shared_prompts": sum(len(s) > 1 for s in prompt_sources.values()),
        "duplicate_pairs": sum(len(s) - 1 for s in pair_sources.values()),
    }


@register_source("mix")
def mix(request: SourceRequest) -> SourceData:
    """The sources of ``data.mix``, weighted; see the module docstring."""
    config = request.config
    entries = list(getattr(config.data, "mix", None) or [])
    if not entries:
        raise DataError(
            "data.source=mix needs data.mix, e.g. data.mix=[{source: hh}, {source: shp, weight: 0.5}]."
        )
    seed = config.train.seed
    train: list[PreferenceExample] = []
    evaluation: list[PreferenceExample] = []
    prompts: dict[str, None] = {}
    parts: dict[str, list[PreferenceExample]] = {}
    for index, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if "source" not in entry or unknown:
            raise DataError(
                f"data.mix[{index}] = {entry}: each entry needs 'source' and may have {', '.join(ENTRY_KEYS[1:])}"
                + (f" (unknown: {', '.join(unknown)})." if unknown else ".")
            )
        name = str(entry["source"])
        if name == "mix":
            raise DataError(f"data.mix[{index}]: a mix cannot contain 'mix'.")
        sub = copy.deepcopy(config)
        sub.data.source, sub.data.path, sub.data.mix = name, entry.get("path"), []
        sub.data.split = entry.get("split", "train")
        sub.data.eval_split = entry.get("eval_split")
        label = name if name not in parts else f"{name}#{index}"
        data = get_source(name)(SourceRequest(config=sub, context=dict(request.context)))
        for ex in (*data.train, *data.eval):
            ex.meta["source"] = label
            if not ex.origin.startswith(f"{label}:"):
                ex.origin = f"{label}:{ex.origin}"
        part = weighted(data.train, float(entry.get("weight", 1.0)), seed + index)
        parts[label] = part
        logger.info(
            "mix: %s: %d of %d training examples (weight %s), %d eval",
            label,
            len(part),
            len(data.train),
            entry.get("weight", 1.0),
            len(data.eval),
        )
        train += part
        evaluation += data.eval
        prompts.update(dict.fromkeys(data.eval_prompts))
    overlaps = count_overlaps(parts)
    if any(overlaps.values()):
        logger.warning(
            "mix: %d prompts appear in more than one source and %d pairs are exact duplicates across sources; "
            "all are kept as separate examples",
            overlaps["shared_prompts"],
            overlaps["duplicate_pairs"],
        )
    return SourceData(train=train, eval=evaluation, eval_prompts=list(prompts))
