"""What every metric family shares: the unavailable-metric signal and the context a metric reads.

A metric is one of three kinds (see :mod:`sparsealign.eval.metrics`):

* ``rows``: ``fn(rows, ctx) -> {column: [value or None per row]}``; a group's value is the mean over its
  rows with a value (``None``: the row could not be scored, e.g. no ``reference``; counted);
* ``group``: ``fn(rows, ctx) -> {name: value}`` over one group of rows (distinct-n);
* ``run``: ``fn(ctx) -> {name: value}`` once, independent of the sample rows (implicit-reward accuracy).

A metric that cannot run here (its model cannot be obtained offline, no NLI model given) raises
:class:`MetricUnavailable` with a message that says what to do; the other metrics still run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["rows", "group", "run"]
Needs = frozenset[str]
"""Command-line inputs a metric needs: ``model`` (the sampled policy), ``reference``, ``run`` (a run
folder as the model), ``nli``."""


class MetricUnavailable(Exception):
    """This metric cannot be computed here; ``str(error)`` says why and what to download or pass."""


@dataclass
class MetricContext:
    """Inputs shared by the metrics of one ``evaluate`` call. Models are loaded on first use and kept, so
    ``kl`` and ``entropy`` load the policy once."""

    policy: Callable[[], Any] | None = None
    """Returns the sampled policy as a :class:`~sparsealign.eval.run_model.EvalModel`."""
    reference: Callable[[], Any] | None = None
    """Returns the reference ``nn.Module`` (same tokenizer as the policy)."""
    run_config: Callable[[], Any] | None = None
    """Returns the run's :class:`~sparsealign.config.Config` when the model is a run folder."""
    run_reference: Callable[[], Any] | None = None
    """Returns the reference the run trained against (for its implicit reward), when a run folder."""
    nli: str | None = None
    bertscore_model: str | None = None
    data: str | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class MetricSpec:
    """One metric as ``--metrics`` names it: its kind, what it needs and the function that computes it."""

    name: str
    kind: Kind
    fn: Callable[..., dict[str, Any]]
    needs: Needs = frozenset()
    help: str = ""
