"""Overlap with the ``reference`` column: ROUGE-1/2/L (``rouge-score``) and BERTScore (``bert-score``).

**ROUGE** (Lin, 2004) with Google's ``rouge-score`` package, the implementation behind Hugging Face
``evaluate``'s ``rouge`` metric that the SparsePO TL;DR evaluation uses, with Porter stemming as there:
ROUGE-n F1 = 2PR/(P+R) with P = matched n-grams / n-grams of the output and R = matched n-grams / n-grams
of the reference (counts clipped); ROUGE-L uses the longest common subsequence instead of matched n-grams.
Reported per row and averaged (``evaluate`` reports a bootstrap median of the same per-row F1s).

**BERTScore** (Zhang et al., 2020) with the authors' ``bert-score`` package, also what ``evaluate``
wraps: greedy cosine matching of contextual token embeddings, F1 of the matched precision and recall. Its
default English model is ``roberta-large`` (layer 17); when that (or ``--bertscore-model``) cannot be
loaded offline the metric is unavailable with a message naming what to download.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sparsealign.eval.metrics.base import MetricContext, MetricUnavailable

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
BERTSCORE_DEFAULT = "roberta-large"


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """``(index, output, reference)`` of the rows that have a string output and reference."""
    pairs = [
        (i, row["output"], row["reference"])
        for i, row in enumerate(rows)
        if isinstance(row.get("output"), str) and isinstance(row.get("reference"), str)
    ]
    if not pairs:
        raise MetricUnavailable("no row has both a text `output` and a text `reference` to compare with")
    if len(pairs) < len(rows):
        logger.warning("%d of %d rows have no text reference; skipped", len(rows) - len(pairs), len(rows))
    return pairs


def rouge_scores(outputs: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-pair ROUGE-1/2/L F1 (stemmed), as fractions in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, out) for out, ref in zip(outputs, references, strict=True)]
    return {name: [s[name].fmeasure for s in scores] for name in ROUGE_TYPES}


def rouge(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, list[float | None]]:
    """``rouge1``, ``rouge2``, ``rougeL`` F1 of each row's ``output`` against its ``reference``."""
    pairs = _pairs(rows)
    scores = rouge_scores([p[1] for p in pairs], [p[2] for p in pairs])
    return _scatter(scores, [p[0] for p in pairs], len(rows))


def _scatter(values: dict[str, list[float]], index: list[int], n: int) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {}
    for name, column in values.items():
        full: list[float | None] = [None] * n
        for i, value in zip(index, column, strict=True):
            full[i] = value
        out[name] = full
    return out


def _bertscore_model(name: str | None) -> tuple[str, int]:
    """The model to load and the layer to read: bert-score's table for known names, else the last layer
    of the model's config (a local folder)."""
    from bert_score.utils import model2layers

    name = name or BERTSCORE_DEFAULT
    if name in model2layers:
        return name, model2layers[name]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise MetricUnavailable(_bertscore_missing(name, error)) from None
    return name, int(config.num_hidden_layers)


def _bertscore_missing(name: str, error: BaseException) -> str:
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        return f"--bertscore-model {name}: no such folder (a folder written by save_pretrained, or a hub id)."
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"BERTScore needs the model '{name}', which cannot be loaded here ({detail}). Download it where the "
        f"hub is reachable (`huggingface-cli download {name}`, into the Hugging Face cache, or with "
        f"`--local-dir DIR`) and pass `--bertscore-model DIR` if it is a folder."
    )


def bertscore(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, list[float | None]]:
    """BERTScore precision, recall and F1 of each row's ``output`` against its ``reference``."""
    pairs = _pairs(rows)
    name, layers = _bertscore_model(ctx.bertscore_model)
    import bert_score

    try:
        precision, recall, f1 = bert_score.score(
            [p[1] for p in pairs],
            [p[2] for p in pairs],
            model_type=name,
            num_layers=layers,
            batch_size=ctx.batch_size,
        )
    except (OSError, ValueError) as error:
        raise MetricUnavailable(_bertscore_missing(name, error)) from None
    scores = {
        "bertscore_precision": precision.tolist(),
        "bertscore_recall": recall.tolist(),
        "bertscore_f1": f1.tolist(),
    }
    return _scatter(scores, [p[0] for p in pairs], len(rows))
