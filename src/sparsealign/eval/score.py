"""Scoring sample files: the ``reward`` column (``sparsealign score``) and the metrics of
``sparsealign evaluate``, each summarised beside its input and printed as a table.

Summaries are per group: all rows, then one group per value of ``model`` and ``temperature`` when those
columns vary in the file (e.g. the SparsePO TL;DR protocol's five temperatures). A per-row value is
summarised by its mean, standard deviation (``n - 1``) and standard error ``std / sqrt(n)`` over the rows
that have one; a row that cannot be scored (no text output, no reference) has none and is counted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from sparsealign.eval.metrics import MetricContext, MetricSpec, MetricUnavailable
from sparsealign.eval.samples import read_rows, summary_path, write_rows
from sparsealign.io import atomic_write
from sparsealign.rewards.base import RewardModel

logger = logging.getLogger(__name__)

GROUP_COLUMNS = ("model", "temperature")
TextMode = Literal["output", "prompt+output"]
TEXT_MODES: tuple[str, ...] = ("prompt+output", "output")


# --------------------------------------------------------------------------------------------------
# Groups and statistics.


def varying_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns of :data:`GROUP_COLUMNS` that take more than one value in ``rows``."""
    return [c for c in GROUP_COLUMNS if len({json.dumps(r.get(c), sort_keys=True) for r in rows}) > 1]


def groups(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """``(label, row indices)``: all rows (label ``{}``), then one group per combination of the varying
    :data:`GROUP_COLUMNS`, in order of first appearance."""
    columns = varying_columns(rows)
    out: list[tuple[dict[str, Any], list[int]]] = [({}, list(range(len(rows))))]
    if not columns:
        return out
    found: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for i, row in enumerate(rows):
        label = {c: row.get(c) for c in columns}
        found.setdefault(json.dumps(label, sort_keys=True), (label, []))[1].append(i)
    return out + list(found.values())


def column_stats(values: Iterable[float | None]) -> dict[str, float]:
    """``mean``, ``std`` (sample, ``n - 1``), ``sem`` (``std / sqrt(n)``) and ``n`` of the non-None values."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "sem": float("nan"), "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "sem": std / math.sqrt(n), "n": n}


def _label(label: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in label.items()) or "all"


def format_table(summary: dict[str, Any]) -> str:
    """One line per value, one column per group: ``mean ± sem`` for per-row values, the value otherwise."""
    names = [_label(g["group"]) for g in summary["groups"]]
    keys = list(dict.fromkeys(k for g in summary["groups"] for k in g["values"]))
    cells = [[_cell(g["values"].get(k)) for g in summary["groups"]] for k in keys]
    first = max([len(k) for k in keys] + [6])
    widths = [max(len(n), *(len(row[j]) for row in cells)) if cells else len(n) for j, n in enumerate(names)]
    lines = ["".ljust(first) + "".join(f"  {n:>{w}}" for n, w in zip(names, widths, strict=True))]
    for key, row in zip(keys, cells, strict=True):
        lines.append(key.ljust(first) + "".join(f"  {c:>{w}}" for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        if not value["n"] or value["mean"] is None:
            return "-"
        return f"{value['mean']:.4g} ± {value['sem']:.2g}" if value["n"] > 1 else f"{value['mean']:.4g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (nested in dicts and lists) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    with atomic_write(path) as handle:
        json.dump(summary, handle, indent=2, allow_nan=False)
        handle.write("\n")


# --------------------------------------------------------------------------------------------------
# sparsealign score


def reward_text(row: dict[str, Any], text: TextMode) -> str | None:
    """What the reward reads for ``row``: its output, or prompt + output (the IMDB continuation task scores
    the whole review, as training and :mod:`sparsealign.eval.report` do); None when not text."""
    output = row.get("output")
    if not isinstance(output, str):
        return None
    if text == "output":
        return output
    prompt = row.get("prompt")
    return prompt + output if isinstance(prompt, str) else None


def add_rewards(rows: list[dict[str, Any]], reward: RewardModel, text: TextMode = "prompt+output") -> int:
    """Set ``row["reward"]`` on every row (None where the text is missing); returns how many were skipped."""
    if text not in TEXT_MODES:
        raise ValueError(f"text must be one of {TEXT_MODES}, not {text!r}")
    texts = [reward_text(row, text) for row in rows]
    keep = [i for i, t in enumerate(texts) if t is not None]
    scores = reward.score([texts[i] for i in keep]) if keep else []
    for row in rows:
        row["reward"] = None
    for i, value in zip(keep, scores, strict=True):
        rows[i]["reward"] = float(value)
    skipped = len(rows) - len(keep)
    if skipped:
        logger.warning("%d of %d rows have no text %s and got no reward", skipped, len(rows), text)
    return skipped


def score_samples(
    path: str | Path, reward: RewardModel, text: TextMode = "prompt+output", out: str | Path | None = None
) -> dict[str, Any]:
    """Add a ``reward`` column to the sample file ``path`` and write it to ``out`` (default: ``path``,
    atomically); write the summary to ``<stem>.score.json`` beside ``path``, print the table, return it."""
    path = Path(path)
    rows = read_rows(path, required=("output",))
    skipped = add_rewards(rows, reward, text)
    destination = Path(out) if out is not None else path
    write_rows(destination, rows)
    summary = finite(
        {
            "input": str(path),
            "output": str(destination),
            "reward": reward.name,
            "text": text,
            "num_rows": len(rows),
            "skipped": skipped,
            "grouped_by": varying_columns(rows),
            "groups": [
                {"group": label, "values": {"reward": column_stats(rows[i]["reward"] for i in index)}}
                for label, index in groups(rows)
            ],
        }
    )
    _write_summary(summary_path(path, "score"), summary)
    print(format_table(summary))
    return summary


# --------------------------------------------------------------------------------------------------
# sparsealign evaluate


def evaluate_rows(rows: list[dict[str, Any]], specs: list[MetricSpec], ctx: MetricContext) -> dict[str, Any]:
    """Run each metric on ``rows``; an unavailable one is recorded with its reason and the rest still run.

    Returns ``{"metrics": {name: {"available": bool, "reason"?: str}}, "grouped_by": [...],
    "groups": [{"group": label, "values": {...}}]}``; the run-level values (``run`` metrics) are in the
    first group (all rows)."""
    status: dict[str, dict[str, Any]] = {}
    row_values: dict[str, list[float | None]] = {}
    run_values: dict[str, Any] = {}
    group_specs: list[MetricSpec] = []
    for spec in specs:
        try:
            if spec.kind == "rows":
                row_values.update(spec.fn(rows, ctx))
            elif spec.kind == "run":
                run_values.update(spec.fn(ctx))
            else:
                spec.fn(rows, ctx)  # fail early (and once) when it cannot run at all
                group_specs.append(spec)
        except MetricUnavailable as why:
            logger.warning("%s unavailable: %s", spec.name, why)
            status[spec.name] = {"available": False, "reason": str(why)}
            continue
        status[spec.name] = {"available": True}
    summary_groups = []
    for number, (label, index) in enumerate(groups(rows)):
        values: dict[str, Any] = {
            name: column_stats(column[i] for i in index) for name, column in row_values.items()
        }
        subset = [rows[i] for i in index]
        for spec in group_specs:
            values.update(spec.fn(subset, ctx))
        if number == 0:
            values.update(run_values)
        summary_groups.append({"group": label, "values": values})
    return {"metrics": status, "grouped_by": varying_columns(rows), "groups": summary_groups}


def evaluate_samples(
    path: str | Path, specs: list[MetricSpec], ctx: MetricContext, config: dict[str, Any]
) -> dict[str, Any]:
    """``sparsealign evaluate``: the metrics of the sample file ``path``, summarised in
    ``<stem>.evaluate.json`` beside it (with ``config``, the inputs used), printed as a table; returns it."""
    path = Path(path)
    rows = read_rows(path, required=("output",))
    result = evaluate_rows(rows, specs, ctx)
    summary = finite({"input": str(path), "num_rows": len(rows), **result, "config": config})
    _write_summary(summary_path(path, "evaluate"), summary)
    print(format_table(summary))
    for name, state in result["metrics"].items():
        if not state["available"]:
            print(f"{name}: unavailable: {state['reason']}")
    return summary
