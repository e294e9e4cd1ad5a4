"""The frontier's figure and page: mean reward against sequence KL, one curve per method ordered by β.

:func:`frontier_figure` draws each method's finished cells as one error-bar curve (points joined in order of
β, error bars of one standard error of the mean in both axes, each point labelled with its β) and the
reference as a star at KL 0; :func:`plot_frontier` writes it as a PNG with matplotlib's Agg canvas (no
pyplot, no display). :func:`write_page` writes ``index.html``: one self-contained file, the PNG inlined
as a ``data:`` URI, the table of cells, and a link to each run's own report page when it has one.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsealign.io import atomic_write

REPORT_PAGE = Path("report") / "index.html"
"""A run's report page (``sparsealign report RUN``), linked from the table when present."""


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The finished rows of each method (in first-seen method order), sorted by β."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "failed" or not _finite(row.get("reward_mean"), row.get("kl_mean")):
            continue
        out.setdefault(row["method"], []).append(row)
    return {method: sorted(points, key=lambda r: r["beta"]) for method, points in out.items()}


def _beta_label(beta: float) -> str:
    text = repr(float(beta))
    return "β=" + (text[:-2] if text.endswith(".0") else text)


def frontier_figure(
    rows: Sequence[dict[str, Any]], title: str = "IMDB: reward vs KL to the reference"
) -> Any:
    """A matplotlib ``Figure`` of the frontier: per method one ``errorbar`` container (in ``ax.containers``,
    labelled with the method) whose line joins the points by increasing β; the reference as a star."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>"
    for i, (method, points) in enumerate(curves(rows).items()):
        kl = [p["kl_mean"] for p in points]
        reward = [p["reward_mean"] for p in points]
        xerr = [p.get("kl_sem") if _finite(p.get("kl_sem")) else 0.0 for p in points]
        yerr = [p.get("reward_sem") if _finite(p.get("reward_sem")) else 0.0 for p in points]
        container = ax.errorbar(
            kl, reward, xerr=xerr, yerr=yerr, marker=markers[i % len(markers)], capsize=3, label=method
        )
        color = container.lines[0].get_color()
        for p in points:
            ax.annotate(
                _beta_label(p["beta"]),
                (p["kl_mean"], p["reward_mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
    reference = next(
        (r for r in rows if r.get("status") != "failed" and _finite(r.get("reference_reward_mean"))), None
    )
    if reference is not None:
        sem = reference.get("reference_reward_sem")
        ax.errorbar(
            [0.0],
            [reference["reference_reward_mean"]],
            yerr=[sem if _finite(sem) else 0.0],
            marker="*",
            markersize=12,
            color="black",
            linestyle="none",
            capsize=3,
            label="reference",
        )
    ax.set_xlabel("sequence KL(policy ‖ reference), nats (mean ± sem)")
    ax.set_ylabel("reward: sentiment log-odds (mean ± sem)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.containers:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_frontier(
    rows: Sequence[dict[str, Any]], path: str | Path
) -> dict[str, list[tuple[float, float, float]]]:
    """Write the frontier PNG to ``path`` (atomically); return what was drawn: for each method its
    ``(beta, kl_mean, reward_mean)`` points in curve order."""
    fig = frontier_figure(rows)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return {m: [(p["beta"], p["kl_mean"], p["reward_mean"]) for p in pts] for m, pts in curves(rows).items()}


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _table(rows: Sequence[dict[str, Any]], out_dir: Path) -> str:
    head = ("method", "β", "status", "reward", "KL", "samples", "steps", "seconds", "run")
    lines = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        run = str(row.get("run_dir") or "")
        report = out_dir / run / REPORT_PAGE
        link = (
            f'<a href="{html.escape((Path(run) / REPORT_PAGE).as_posix())}">report</a>'
            if report.is_file()
            else ""
        )
        reward = kl = ""
        if row.get("reward_mean") is not None:
            reward = f"{_cell(row['reward_mean'])} ± {_cell(row.get('reward_sem'))}"
            kl = f"{_cell(row['kl_mean'])} ± {_cell(row.get('kl_sem'))}"
        status = html.escape(str(row.get("status", "")))
        if row.get("error"):
            status += f'<div class="error">{html.escape(str(row["error"]))}</div>'
        cells = (
            html.escape(str(row["method"])),
            _cell(row["beta"], 4).rstrip("0").rstrip("."),
            status,
            reward,
            kl,
            _cell(row.get("num_samples")),
            _cell(row.get("steps")),
            _cell(row.get("seconds"), 0),
            f"<code>{html.escape(run)}</code> {link}",
        )
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.error { color: #a00; font-size: 0.85em; max-width: 40em; }
code { font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def write_page(
    path: str | Path,
    rows: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    png: Path | None,
    out_dir: Path,
) -> None:
    """``index.html``: the settings, the plot (inlined), the reference's reward and the table of cells."""
    done = sum(r.get("status") != "failed" for r in rows)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>IMDB reward-vs-KL frontier</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>IMDB reward-vs-KL frontier</h1>",
        f"<p>{done} of {len(rows)} cells with a result. Each point: one run of the method's IMDB recipe at "
        "one β; the mean reward (sentiment log-odds) and the sequence KL to the reference of the policy's "
        "samples on the held-out prompts, with one standard error of the mean.</p>",
    ]
    if settings:
        items = "".join(
            f"<li><b>{html.escape(str(k))}</b>: <code>{html.escape(str(v))}</code></li>"
            for k, v in settings.items()
        )
        parts.append(f"<ul>{items}</ul>")
    if png is not None:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f'<img alt="reward vs KL frontier" src="data:image/png;base64,{data}">')
    parts.append(_table(rows, out_dir))
    parts.append("</body></html>")
    with atomic_write(path) as handle:
        handle.write("\n".join(parts) + "\n")
