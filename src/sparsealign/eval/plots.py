"""The run report's figures: metric curves from ``metrics.jsonl`` and sample distributions, as PNG bytes.

Matplotlib with its non-interactive Agg backend (no display, no browser, no JavaScript): each figure is
rendered to PNG in memory and inlined by :mod:`sparsealign.eval.run_report` as a ``data:`` URI.

Metric keys are grouped into figures by :data:`GROUPS` (first matching group wins); a key no group
claims gets a figure of its own namespace (the part before its last ``/``), so every logged numeric metric
is plotted. A held-out key ``eval/<k>`` is drawn on the same axes as ``<k>`` (train: line; eval: dashed
with markers). Long noisy training curves (at least :data:`SMOOTH_FROM` points) are drawn faintly with an
exponential moving average on top: ``s_t = a * s_{t-1} + (1 - a) * x_t`` with ``a = 0.9``, started at
``s_0 = x_0`` (TensorBoard's smoothing).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # before pyplot: render off-screen, never open a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "GROUPS",
    "NOT_PLOTTED",
    "FigureSpec",
    "Series",
    "distribution_png",
    "ema",
    "figure_specs",
    "metric_figure_png",
]

Series = dict[str, list[tuple[float, float]]]
"""Metric key (train keys bare, held-out keys with their ``eval/`` prefix) -> ``(step, value)`` points."""

NOT_PLOTTED = frozenset({"step", "time", "elapsed_s", "epoch"})
"""Bookkeeping columns of ``metrics.jsonl``, never curves."""

SMOOTH_FROM = 50
EMA_WEIGHT = 0.9
DPI = 100
SIZE = (6.4, 3.6)  # inches: 640 x 360 pixels at DPI


@dataclass(frozen=True)
class Group:
    """A figure of related metrics: a title, a y-axis label and which (train) keys belong to it."""

    title: str
    ylabel: str
    matches: Callable[[str], bool]


def _is(*names: str) -> Callable[[str], bool]:
    return lambda key: key in names


def _prefix(*prefixes: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefixes)


GROUPS: tuple[Group, ...] = (
    Group("Loss", "loss", lambda k: k == "loss" or k.endswith("_loss") or k.startswith("ppo/loss/")),
    Group("Implicit rewards", "reward", _is("rewards/chosen", "rewards/rejected", "rewards/margins")),
    Group("Reward accuracy", "fraction of pairs", _is("rewards/accuracies")),
    Group("KL to the reference", "KL (nats)", lambda k: k.startswith(("kl/", "masked_kl/")) or k == "kl"),
    Group("Log-probabilities", "sum of log p", _prefix("logps/")),
    Group("Parts of the logit", "value", _prefix("logits/")),
    Group("Mask sparsity", "% of tokens", _prefix("mask/sparsity")),
    Group("Mask values", "mean mask value", _prefix("mask/")),
    Group("Feature distances", "distance", _prefix("fpo/feature_dist")),
    Group("Learning rate", "learning rate", _is("lr")),
    Group("Throughput", "tokens / s", _is("tokens_per_s")),
    Group("Gradient norm", "norm (before clipping)", _is("grad_norm")),
)
"""The named figures, in page order. KTO logs its reference point z0 as ``kl``, so it lands in the KL
figure; SparsePO's mask statistics and FPO's feature distances get their own figures."""


@dataclass
class FigureSpec:
    """One figure to draw: its title, y label and the train keys whose train and eval curves it shows."""

    title: str
    ylabel: str
    keys: list[str] = field(default_factory=list)


def _base(key: str) -> str:
    return key[len("eval/") :] if key.startswith("eval/") else key


def figure_specs(series: Series) -> list[FigureSpec]:
    """The figures for the logged keys of ``series``: the :data:`GROUPS` that have at least one key, in
    order, then one figure per remaining namespace (``ppo/val/mean`` -> ``ppo/val``), sorted."""
    bases = sorted({_base(k) for k in series if _base(k) not in NOT_PLOTTED})
    specs = [FigureSpec(g.title, g.ylabel) for g in GROUPS]
    extra: dict[str, FigureSpec] = {}
    for key in bases:
        for group, spec in zip(GROUPS, specs, strict=True):
            if group.matches(key):
                spec.keys.append(key)
                break
        else:
            namespace = key.rsplit("/", 1)[0] if "/" in key else key
            extra.setdefault(namespace, FigureSpec(namespace, "value")).keys.append(key)
    return [s for s in specs if s.keys] + [extra[name] for name in sorted(extra)]


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average ``s_t = w * s_{t-1} + (1 - w) * x_t``, ``s_0 = x_0``; non-finite values
    are carried through without updating the average."""
    out: list[float] = []
    state: float | None = None
    for x in values:
        if math.isfinite(x):
            state = x if state is None else weight * state + (1 - weight) * x
        out.append(state if state is not None else x)
    return out


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _label(key: str, keys: Sequence[str]) -> str:
    """The legend name of ``key`` in a figure of ``keys``: the part that differs (``rewards/margins`` ->
    ``margins`` when every key shares ``rewards/``)."""
    if len(keys) == 1:
        return ""
    common = re.sub(r"[^/_]*$", "", _common_prefix(keys))
    return key[len(common) :] or key


def _common_prefix(keys: Sequence[str]) -> str:
    first, last = min(keys), max(keys)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def metric_figure_png(spec: FigureSpec, series: Series) -> bytes:
    """One figure: for each key of ``spec``, its training curve (solid; faint plus an EMA when long) and
    its held-out curve ``eval/<key>`` (dashed, markers) in the same colour, against the optimizer step."""
    fig, ax = plt.subplots(figsize=SIZE, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, key in enumerate(spec.keys):
        colour = colours[index % len(colours)]
        name = _label(key, spec.keys)
        train = series.get(key, [])
        if train:
            steps, values = zip(*train, strict=True)
            label = f"{name} (train)".strip() if name else "train"
            if len(values) >= SMOOTH_FROM:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
                ax.plot(steps, ema(values), color=colour, linewidth=1.8, label=f"{label}, smoothed")
            else:
                ax.plot(steps, values, color=colour, linewidth=1.8, label=label)
        held = series.get(f"eval/{key}", [])
        if held:
            steps, values = zip(*held, strict=True)
            label = f"{name} (eval)".strip() if name else "eval"
            ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=4, label=label)
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    if spec.title == "Learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(fontsize="small", loc="best")
    return _png(fig)


def distribution_png(columns: dict[str, dict[str, list[float]]]) -> bytes:
    """Histograms of per-sample values, one panel per column (e.g. ``length``, ``reward``, ``kl``), one
    overlaid histogram per model (``reference``, ``policy``) with shared bins."""
    names = [name for name, per_model in columns.items() if any(per_model.values())]
    if not names:
        raise ValueError("no values to plot")
    fig, axes = plt.subplots(
        1, len(names), figsize=(SIZE[0] * len(names) / 2 + 1, SIZE[1]), layout="constrained", squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        per_model = {m: [v for v in vals if math.isfinite(v)] for m, vals in columns[name].items()}
        every = [v for vals in per_model.values() for v in vals]
        low, high = (min(every), max(every)) if every else (0.0, 1.0)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        bins = [low + (high - low) * i / 20 for i in range(21)]
        for model, vals in per_model.items():
            if vals:
                ax.hist(vals, bins=bins, alpha=0.55, label=f"{model} (n={len(vals)})")
        ax.set_title(name)
        ax.set_ylabel("samples")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _png(fig)
