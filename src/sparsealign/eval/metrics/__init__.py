"""The metrics of ``sparsealign evaluate``, one module per family, named here as ``--metrics`` names them.

| name | module | library | needs |
|---|---|---|---|
| ``rouge`` | :mod:`.text` | rouge-score | ``reference`` column |
| ``bertscore`` | :mod:`.text` | bert-score | ``reference`` column, its model offline |
| ``self-bleu`` | :mod:`.diversity` | sacrebleu | two or more samples per prompt |
| ``distinct`` | :mod:`.diversity` | (a count) | |
| ``kl`` | :mod:`.kl` | the shared per-token path | ``--model``, ``--reference`` (a run's own by default) |
| ``entropy`` | :mod:`.entropy` | the shared per-token path | ``--model`` |
| ``reward-accuracy`` | :mod:`.implicit_reward` | the training log-prob path | ``--model RUN`` |
| ``edna`` | :mod:`.edna` | transformers NLI classifier | ``--nli`` |

Each module's docstring gives the formula and the paper. Importing this package is cheap: the modules
import torch and the metric libraries inside their functions.
"""

from __future__ import annotations

from sparsealign.eval.metrics import diversity, edna, entropy, implicit_reward, kl, text
from sparsealign.eval.metrics.base import MetricContext, MetricSpec, MetricUnavailable

__all__ = ["DEFAULT_METRICS", "METRICS", "MetricContext", "MetricSpec", "MetricUnavailable", "get_metrics"]

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "kl",
            "rows",
            kl.kl,
            frozenset({"model", "reference"}),
            "sequence and per-token KL to the reference",
        ),
        MetricSpec("rouge", "rows", text.rouge, help="ROUGE-1/2/L F1 against `reference`"),
        MetricSpec("bertscore", "rows", text.bertscore, help="BERTScore P/R/F1 against `reference`"),
        MetricSpec("self-bleu", "rows", diversity.self_bleu, help="BLEU of each sample against its siblings"),
        MetricSpec("distinct", "group", diversity.distinct, help="distinct-1/2/3 over the outputs"),
        MetricSpec("entropy", "rows", entropy.entropy, frozenset({"model"}), "mean next-token entropy"),
        MetricSpec(
            "reward-accuracy",
            "run",
            implicit_reward.reward_accuracy,
            frozenset({"model", "run"}),
            "implicit-reward accuracy on held-out pairs",
        ),
        MetricSpec("edna", "rows", edna.edna, help="harmonic mean of NLI faithfulness and diversity"),
    )
}
"""Every metric by its ``--metrics`` name, in the order the table shows them."""

DEFAULT_METRICS = ("rouge", "self-bleu", "distinct")
"""The metrics that need nothing but the sample file."""


def get_metrics(names: str | list[str]) -> list[MetricSpec]:
    """The specs of a comma-separated list (or list) of names; an unknown name is a ConfigError."""
    from sparsealign.errors import ConfigError

    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not wanted:
        raise ConfigError(f"--metrics is empty; choose from {', '.join(METRICS)}")
    return [METRICS[n] for n in dict.fromkeys(wanted)]
