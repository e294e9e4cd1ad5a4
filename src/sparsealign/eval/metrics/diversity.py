"""Diversity of the samples: self-BLEU (``sacrebleu``) and distinct-n.

**Self-BLEU** (Zhu et al., 2018, "Texygen"): each sample's BLEU with the *other* samples of the same
prompt (same model and temperature) as its references; higher means the samples repeat each other (100:
identical, about 0: no shared n-grams). BLEU is sacrebleu's ``sentence_bleu`` (Post, 2018: standard
13a tokenisation, n-grams up to 4, brevity penalty, exponential smoothing), the SacreBLEU that the SparsePO
TL;DR evaluation names. A prompt with a single sample has no self-BLEU (skipped, counted).

**distinct-n** (Li et al., 2016, "A Diversity-Promoting Objective Function"): over all outputs of a group,
``|unique n-grams| / |n-grams|`` for n = 1, 2, 3, on whitespace tokens. This is a count, so it is computed
here; no library is needed for it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from sparsealign.eval.metrics.base import MetricContext, MetricUnavailable

logger = logging.getLogger(__name__)

DISTINCT_N = (1, 2, 3)


def sample_sets(rows: list[dict[str, Any]]) -> dict[tuple, list[int]]:
    """Row indices grouped by ``(model, temperature, prompt)``: the samples drawn for one prompt under one
    setting. Rows without a text output are left out."""
    sets: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if isinstance(row.get("output"), str):
            key = (str(row.get("model")), repr(row.get("temperature")), _prompt_key(row.get("prompt")))
            sets[key].append(i)
    return sets


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else repr(prompt)


def self_bleu_of(outputs: list[str]) -> list[float]:
    """Each output's sentence BLEU (0-100) against all the other outputs as references."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    return [bleu.sentence_score(out, outputs[:i] + outputs[i + 1 :]).score for i, out in enumerate(outputs)]


def self_bleu(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, list[float | None]]:
    """``self_bleu`` per row: its BLEU against the other samples of its prompt set."""
    values: list[float | None] = [None] * len(rows)
    singles = 0
    for indices in sample_sets(rows).values():
        if len(indices) < 2:
            singles += 1
            continue
        for i, score in zip(indices, self_bleu_of([rows[i]["output"] for i in indices]), strict=True):
            values[i] = score
    if all(v is None for v in values):
        raise MetricUnavailable(
            "self-BLEU needs at least two samples of one prompt (sample with --n 2 or more)"
        )
    if singles:
        logger.warning("self-BLEU: %d prompt set(s) with a single sample skipped", singles)
    return {"self_bleu": values}


def distinct_n(texts: list[str], n: int) -> float:
    """``|unique n-grams| / |n-grams|`` over the whitespace tokens of all ``texts`` (nan without n-grams)."""
    grams = [
        tuple(tokens[i : i + n]) for tokens in (t.split() for t in texts) for i in range(len(tokens) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else float("nan")


def distinct(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, float]:
    """``distinct_1``, ``distinct_2``, ``distinct_3`` over the outputs of ``rows``."""
    texts = [row["output"] for row in rows if isinstance(row.get("output"), str)]
    if not texts:
        raise MetricUnavailable("no row has a text `output`")
    return {f"distinct_{n}": distinct_n(texts, n) for n in DISTINCT_N}
