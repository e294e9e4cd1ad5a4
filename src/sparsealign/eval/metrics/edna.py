"""EDNA: faithfulness and diversity of a set of samples in one number, with an NLI model.

EDNA ("Evaluating Diversity aNd fAithfulness", Narayan et al., 2022, "A Well-Composed Text is Half Done!
Composition Sampling for Diverse Conditional Generation") is the metric the SparsePO document reports for
TL;DR summaries, pointing to SummaC for the entailment part. For the samples ``y_1..y_k`` of one prompt
``x`` (one model, one temperature), with ``e(p, h)`` an NLI model's probability that premise ``p`` entails
hypothesis ``h``:

* faithfulness ``F = (1/k) sum_i e(x, y_i)`` (the source entails each sample);
* self-entailment ``S = 1/(k(k-1)) sum_{i != j} e(y_i, y_j)`` (the samples entail each other);
* diversity ``D = 1 - S``;
* ``EDNA = 2 F D / (F + D)``, the harmonic mean (0 when ``F + D = 0``).

Every sample of the set carries the set's values, so a group's mean weights sets by their size (equal
sizes: the mean over prompts). A set with one sample has no self-entailment and no EDNA (skipped,
counted). ``e`` is any ``transformers`` sequence classifier trained on NLI (``--nli``, e.g.
``microsoft/deberta-large-mnli`` or a local folder), with its entailment class found from ``id2label``;
SummaC-Conv's sentence-level aggregation is not reproduced (``summac`` pins old libraries), so long
prompts are truncated to the NLI model's length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from sparsealign.eval.metrics.base import MetricContext, MetricUnavailable
from sparsealign.eval.metrics.diversity import sample_sets

logger = logging.getLogger(__name__)

Entailment = Callable[[Sequence[str], Sequence[str]], list[float]]
"""``(premises, hypotheses) -> P(premise entails hypothesis)`` for each pair."""

NO_NLI = (
    "EDNA needs an NLI model: pass --nli MODEL (a hub id such as microsoft/deberta-large-mnli, downloaded "
    "with `huggingface-cli download microsoft/deberta-large-mnli`, or a local folder of an NLI classifier)."
)


def edna_score(faithfulness: float, diversity: float) -> float:
    """The harmonic mean ``2 F D / (F + D)`` (0 when both are 0)."""
    total = faithfulness + diversity
    return 2 * faithfulness * diversity / total if total > 0 else 0.0


def set_scores(source: str, samples: Sequence[str], entail: Entailment) -> dict[str, float]:
    """``faithfulness``, ``self_entailment``, ``diversity`` and ``edna`` of one sample set (k >= 2)."""
    k = len(samples)
    faithful = entail([source] * k, list(samples))
    ordered = [(i, j) for i in range(k) for j in range(k) if i != j]
    mutual = entail([samples[i] for i, _ in ordered], [samples[j] for _, j in ordered])
    f = sum(faithful) / k
    s = sum(mutual) / len(ordered)
    return {"faithfulness": f, "self_entailment": s, "diversity": 1 - s, "edna": edna_score(f, 1 - s)}


def entailment_label(config: Any) -> int:
    """The index of the entailment class in an NLI classifier's ``id2label``."""
    labels = {int(i): str(name).lower() for i, name in (config.id2label or {}).items()}
    found = [i for i, name in labels.items() if name.startswith("entail")]
    if len(found) != 1:
        raise MetricUnavailable(
            f"the NLI model's labels {sorted(labels.values())} have no single 'entailment' class; pass an NLI "
            "classifier (e.g. microsoft/deberta-large-mnli)"
        )
    return found[0]


def load_entailment(name: str, batch_size: int = 16, device: str | None = None) -> Entailment:
    """An :data:`Entailment` function from a transformers NLI classifier (hub id or folder)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name)
    except (OSError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MetricUnavailable(
            f"the NLI model '{name}' cannot be loaded ({detail}). Download it where the hub is reachable "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass --nli DIR."
        ) from None
    label = entailment_label(model.config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    def entail(premises: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(premises), batch_size):
                enc = tokenizer(
                    list(premises[start : start + batch_size]),
                    list(hypotheses[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    return_tensors="pt",
                ).to(device)
                out.extend(model(**enc).logits.float().softmax(-1)[:, label].tolist())
        return out

    return entail


def edna_rows(rows: list[dict[str, Any]], entail: Entailment) -> dict[str, list[float | None]]:
    """Per-row ``faithfulness``, ``self_entailment``, ``diversity``, ``edna`` of each row's sample set."""
    names = ("faithfulness", "self_entailment", "diversity", "edna")
    out: dict[str, list[float | None]] = {name: [None] * len(rows) for name in names}
    singles = 0
    for indices in sample_sets(rows).values():
        source = rows[indices[0]].get("prompt")
        if len(indices) < 2 or not isinstance(source, str):
            singles += 1
            continue
        scores = set_scores(source, [rows[i]["output"] for i in indices], entail)
        for i in indices:
            for name in names:
                out[name][i] = scores[name]
    if all(v is None for v in out["edna"]):
        raise MetricUnavailable("EDNA needs at least two samples of one prompt (sample with --n 2 or more)")
    if singles:
        logger.warning("EDNA: %d prompt set(s) with a single sample (or no text prompt) skipped", singles)
    return out


def edna(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, list[float | None]]:
    """The ``edna`` metric with the NLI model ``--nli``."""
    if ctx.nli is None:
        raise MetricUnavailable(NO_NLI)
    return edna_rows(rows, load_entailment(ctx.nli, ctx.batch_size))
