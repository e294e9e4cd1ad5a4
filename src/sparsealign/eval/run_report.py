"""``sparsealign report RUN``: one self-contained HTML page about a run folder, ``RUN/report/index.html``.

Sections (each an ``<section id=...>``, in this order, see :data:`SECTIONS`): an overview (method, model,
data, steps, the last value of every metric, and what is missing), the resolved ``config.yaml``, the
training and held-out curves of ``metrics.jsonl`` (figures of :mod:`sparsealign.eval.plots`), the evaluation
tables (``report/summary.json`` of the generation report and every other ``report/*.json`` summary, e.g.
those of ``score``, ``evaluate``, ``judge`` or ``passk``), sample generations (``report/samples.jsonl``, a
few per model) and the token-mask page of SparsePO/MaPO runs (``report/masks.html``, linked when present).

The page needs no server, no network and no JavaScript: figures are PNGs inlined as ``data:`` URIs, the
style sheet is inline, every text from the run is HTML-escaped. A missing or unreadable file is stated on
the page, never an exception: the page always gets written.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sparsealign.errors import DataError, UserError
from sparsealign.eval import plots
from sparsealign.eval.samples import iter_rows
from sparsealign.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["SECTIONS", "build_page", "read_metrics", "write_run_report"]

SECTIONS = (
    ("overview", "Overview"),
    ("config", "Configuration"),
    ("curves", "Training and evaluation curves"),
    ("evaluation", "Evaluation"),
    ("samples", "Sample generations"),
    ("masks", "Token masks"),
)
"""``(id, heading)`` of the page's sections, in page order."""

GENERATION_SUMMARY = "summary.json"
SAMPLES_FILE = "samples.jsonl"
MASKS_PAGE = "masks.html"
PAGE = "index.html"
MAX_JSON_ROWS = 80
FOLD_AFTER = 12  # the last-values table is folded (click to open) when it has more rows

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1320px;
  padding:0 24px 48px;color:#1d2330;background:#fff;line-height:1.45}
h1{margin:24px 0 4px;font-size:1.7em} h2{border-bottom:2px solid #e3e7ee;padding-bottom:4px;margin-top:36px}
h3{margin:18px 0 6px;font-size:1.05em}
nav{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #e3e7ee;z-index:1}
nav a{margin-right:16px;color:#2456a6;text-decoration:none} nav a:hover{text-decoration:underline}
.muted{color:#5d6677} .note{background:#fff7e0;border-left:4px solid #f0b400;padding:8px 12px;margin:8px 0}
pre{background:#f6f8fb;border:1px solid #e3e7ee;padding:10px;overflow:auto;font-size:.85em}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.9em}
th,td{border:1px solid #e3e7ee;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f5f9} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:12px}
figure{margin:0;border:1px solid #e3e7ee;padding:6px;background:#fff}
figure img{width:100%;height:auto;display:block} figcaption{font-size:.8em;color:#5d6677;padding-top:4px}
.sample{white-space:pre-wrap;word-break:break-word;max-width:820px;font-size:.9em}
.prompt{background:#f6f8fb} summary{cursor:pointer;color:#2456a6}
"""


# --------------------------------------------------------------------------------------------------
# Reading the run folder (tolerant: problems become notes)


def read_metrics(path: Path) -> tuple[plots.Series, list[str]]:
    """The numeric series of ``metrics.jsonl`` (``key -> [(step, value)]``) and notes about lines that
    could not be read (counted, with the first line number)."""
    series: plots.Series = {}
    bad: list[int] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = float(row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad.append(number)
                continue
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    series.setdefault(key, []).append((step, float(value)))
    notes = []
    if bad:
        notes.append(f"{path.name}: {len(bad)} line(s) skipped as unreadable (first: line {bad[0]}).")
    return series, notes


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path.name}: not readable as JSON ({error})."


def _read_config(run: Path) -> tuple[str | None, dict[str, Any]]:
    path = run / "config.yaml"
    if not path.is_file():
        return None, {}
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        tree = None
    return text, tree if isinstance(tree, dict) else {}


# --------------------------------------------------------------------------------------------------
# HTML helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _code(text: str) -> str:
    return f"<code>{_e(text)}</code>"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude and (magnitude < 1e-3 or magnitude >= 1e6):
        return f"{value:.3e}"
    return f"{value:.4g}" if magnitude < 1 else f"{value:,.4f}".rstrip("0").rstrip(".")


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header or [])
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            cells.append(f'<td class="num">{_number(cell)}</td>' if numeric else f"<td>{_e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


# --------------------------------------------------------------------------------------------------
# Sections


class _Page:
    """What the sections read, loaded once, and the notes they add about missing or broken inputs."""

    def __init__(self, run: Path, samples_per_model: int):
        self.run = run
        self.report = run / "report"
        self.samples_per_model = samples_per_model
        self.notes: list[str] = []
        self.config_text, self.config = _read_config(run)
        self.series: plots.Series = {}
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            self.series, notes = read_metrics(metrics)
            self.notes += notes

    def section(self, key: str) -> str:
        return getattr(self, f"_{key}")()

    def _get(self, *path: str) -> Any:
        node: Any = self.config
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    # overview -------------------------------------------------------------------------------------
    def _overview(self) -> str:
        data = self._get("data") or {}
        source = next((f"{k}={data[k]}" for k in ("path", "dataset", "source") if data.get(k)), "?")
        steps = max((s for s, _ in self.series.get("step", [])), default=None)
        elapsed = max((v for _, v in self.series.get("elapsed_s", [])), default=None)
        facts = [
            ["run folder", str(self.run)],
            ["method", self._get("method", "name") or "?"],
            ["model", self._get("model", "name") or "?"],
            ["data", source],
            ["steps logged", int(steps) if steps is not None else "none yet"],
            ["elapsed", f"{elapsed:,.1f} s" if elapsed is not None else "?"],
        ]
        out = [_table(None, facts)]
        last = {key: points[-1][1] for key, points in self.series.items() if key not in plots.NOT_PLOTTED}
        bases = sorted({k.removeprefix("eval/") for k in last})
        if bases:
            rows = [[k, last.get(k, ""), last.get(f"eval/{k}", "")] for k in bases]
            opened = " open" if len(rows) <= FOLD_AFTER else ""
            out.append(
                f"<details{opened}><summary>Last logged values ({len(rows)} metrics)"
                f"</summary>{_table(['metric', 'train', 'eval'], rows)}</details>"
            )
        return "".join(out)

    # config ---------------------------------------------------------------------------------------
    def _config(self) -> str:
        if self.config_text is None:
            self.notes.append("config.yaml is missing: this folder may not be a sparsealign run.")
            return _note(f"No config.yaml in {self.run}.")
        lines = self.config_text.count("\n") + 1
        return (
            f"<details><summary>The resolved configuration, {_code('config.yaml')} ({lines} lines): "
            f"click to show</summary><pre>{_e(self.config_text)}</pre></details>"
        )

    # curves ---------------------------------------------------------------------------------------
    def _curves(self) -> str:
        if not (self.run / "metrics.jsonl").is_file():
            self.notes.append("metrics.jsonl is missing: no step has been logged yet.")
            return _note("No metrics.jsonl yet: curves appear once the run has logged a step.")
        specs = plots.figure_specs(self.series)
        if not specs:
            self.notes.append("metrics.jsonl has no numeric metrics yet.")
            return _note("metrics.jsonl has no numeric metrics yet.")
        figures = []
        for spec in specs:
            caption = ", ".join(
                key + (" (+ eval)" if f"eval/{key}" in self.series else "") for key in spec.keys
            )
            figures.append(_img(plots.metric_figure_png(spec, self.series), spec.title, caption))
        intro = (
            "<p class=muted>Training curves are solid, held-out (<code>eval/…</code>) curves dashed with "
            f"markers; curves of {plots.SMOOTH_FROM} or more points are drawn faintly with a moving average.</p>"
        )
        return intro + f'<div class="figures">{"".join(figures)}</div>'

    # evaluation -----------------------------------------------------------------------------------
    def _evaluation(self) -> str:
        out = ["<h3>Generation report</h3>"]
        summary_path = self.report / GENERATION_SUMMARY
        if summary_path.is_file():
            summary, problem = _read_json(summary_path)
            if problem or not isinstance(summary, dict):
                self.notes.append(problem or f"{GENERATION_SUMMARY}: not a JSON object.")
                out.append(_note(problem or f"{GENERATION_SUMMARY} is not a JSON object."))
            else:
                out.append(_generation_table(summary))
        rows, _ = self.sample_rows()
        columns = _distributions(rows)
        if columns:
            caption = "Per-sample " + ", ".join(columns) + " of report/samples.jsonl, by model"
            out.append(
                f'<div class="figures">{_img(plots.distribution_png(columns), "Distributions", caption)}</div>'
            )
        else:
            self.notes.append("report/summary.json is missing: no generation report.")
            out.append(
                _note(
                    "No generation report (report/summary.json): train with eval.generate=true to sample "
                    "the held-out prompts from the reference and the policy after training."
                )
            )
        others = sorted(p for p in self.report.glob("*.json") if p.name != GENERATION_SUMMARY)
        for path in others:
            value, problem = _read_json(path)
            out.append(f"<h3>{_e(path.name)}</h3>")
            out.append(_note(problem) if problem else _json_table(value))
        if not others:
            out.append(
                "<p class=muted>No other summaries in report/ (<code>sparsealign score</code>, "
                "<code>evaluate</code>, <code>judge</code> and <code>passk</code> write theirs as "
                "<code>*.json</code>; copy or write them into report/ to show them here).</p>"
            )
        return "".join(out)

    # samples --------------------------------------------------------------------------------------
    def sample_rows(self) -> tuple[list[dict[str, Any]], str | None]:
        """The rows of report/samples.jsonl (up to a malformed line) and the problem met, if any."""
        if not hasattr(self, "_sample_rows"):
            rows: list[dict[str, Any]] = []
            problem = None
            path = self.report / SAMPLES_FILE
            if path.is_file():
                try:
                    for _, row in iter_rows(path):
                        rows.append(row)
                except DataError as error:
                    problem = f"{error}; showing the rows before it."
            self._sample_rows = (rows, problem)
        return self._sample_rows

    def _samples(self) -> str:
        if not (self.report / SAMPLES_FILE).is_file():
            return _note("No sample generations (report/samples.jsonl): train with eval.generate=true.")
        rows, problem = self.sample_rows()
        return (_note(problem) if problem else "") + _samples_html(rows, self.samples_per_model)

    # masks ----------------------------------------------------------------------------------------
    def _masks(self) -> str:
        if (self.report / MASKS_PAGE).is_file():
            return (
                f'<p><a href="{MASKS_PAGE}">Open the token-mask page</a> (report/{MASKS_PAGE}): reward and '
                "KL mask values of every response token of held-out pairs.</p>"
            )
        method = self._get("method", "name")
        has_masks = _has_token_masks(method)
        if has_masks:
            command = f"sparsealign masks {self.run}"
            return _note(
                f"No token-mask page yet. Create it with: {command} (then rerun sparsealign report)."
            )
        return f"<p class=muted>Method {_code(method or '?')} has no token masks (SparsePO and MaPO do).</p>"


def _distributions(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``column -> model -> values`` for the numeric sample columns ``length``, ``reward``, ``kl``; the KL
    column only for models other than the reference (whose KL to itself is 0)."""
    columns: dict[str, dict[str, list[float]]] = {}
    for name in ("length", "reward", "kl"):
        per_model: dict[str, list[float]] = {}
        for row in rows:
            value, model = row.get(name), str(row.get("model", "?"))
            if name == "kl" and model == "reference":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                per_model.setdefault(model, []).append(float(value))
        if per_model:
            columns[name] = per_model
    return columns


def _has_token_masks(method: str | None) -> bool:
    if not method:
        return False
    try:
        from sparsealign.eval.masks_page import has_token_masks
        from sparsealign.methods import get_method

        return has_token_masks(get_method(method))
    except (UserError, ImportError, ValueError):
        return False


GENERATION_COLUMNS = (
    ("reward", "reward_mean", "reward_sem"),
    ("KL to reference", "kl_mean", "kl_sem"),
    ("length (tokens)", "length_mean", None),
    ("reward > 0", "positive_fraction", None),
    ("samples", "num_samples", None),
    ("prompts", "num_prompts", None),
)


def _generation_table(summary: dict[str, Any]) -> str:
    models = [m for m in ("reference", "policy") if isinstance(summary.get(m), dict)]
    columns = [c for c in GENERATION_COLUMNS if any(c[1] in summary[m] for m in models)]
    rows = []
    for model in models:
        stats = summary[model]
        row: list[Any] = [model]
        for _, mean, sem in columns:
            value = stats.get(mean, "")
            if sem and isinstance(stats.get(sem), (int, float)) and isinstance(value, (int, float)):
                row.append(f"{_number(value)} ± {_number(stats[sem])}")
            else:
                row.append(value)
        rows.append(row)
    out = [_table(["model"] + [c[0] for c in columns], rows)] if models else []
    if isinstance(summary.get("reward_delta"), (int, float)):
        out.append(f"<p>Reward delta (policy − reference): <b>{_number(summary['reward_delta'])}</b></p>")
    settings = summary.get("config")
    if isinstance(settings, dict):
        text = ", ".join(f"{k}={v}" for k, v in settings.items())
        out.append(f"<p class=muted>Settings: {_e(text)}</p>")
    return "".join(out) or _note("summary.json has no reference/policy statistics.")


def _flatten(value: Any, prefix: str = "") -> list[list[Any]]:
    if isinstance(value, dict):
        rows = []
        for key, inner in value.items():
            rows += _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(value, list):
        text = json.dumps(value, ensure_ascii=False)
        return [[prefix, text if len(text) <= 200 else text[:200] + "…"]]
    return [[prefix, value]]


def _json_table(value: Any) -> str:
    rows = _flatten(value)
    shown = rows[:MAX_JSON_ROWS]
    more = f"<p class=muted>… and {len(rows) - len(shown)} more.</p>" if len(rows) > len(shown) else ""
    return _table(["key", "value"], shown) + more


def _samples_html(rows: list[dict[str, Any]], per_model: int) -> str:
    """The first ``per_model`` prompts, each with the first sample of every model, as a table."""
    by_prompt: dict[str, dict[str, dict[str, Any]]] = {}
    models: list[str] = []
    for row in rows:
        prompt, model = str(row.get("prompt", "")), str(row.get("model", "?"))
        if model not in models:
            models.append(model)
        by_prompt.setdefault(prompt, {}).setdefault(model, row)
    if not by_prompt:
        return _note("report/samples.jsonl has no rows.")
    numbers = [k for k in ("reward", "kl", "length") if any(k in r for r in rows)]
    header = "".join(f"<th>{_e(k)}</th>" for k in ["model", "generation", *numbers])
    blocks = []
    for prompt, per in list(by_prompt.items())[:per_model]:
        lines = [
            f'<tr class="prompt"><td>prompt</td><td colspan="{1 + len(numbers)}" class="sample">{_e(prompt)}</td></tr>'
        ]
        for model in models:
            row = per.get(model)
            if row is None:
                continue
            text = row.get("text", row.get("output", ""))
            cells = "".join(f'<td class="num">{_number(row.get(k, ""))}</td>' for k in numbers)
            lines.append(f'<tr><td>{_e(model)}</td><td class="sample">{_e(text)}</td>{cells}</tr>')
        blocks.append("".join(lines))
    intro = (
        f"<p class=muted>{len(by_prompt)} prompts, models: {_e(', '.join(models))}; the first sample of the "
        f"first {min(per_model, len(by_prompt))} prompts.</p>"
    )
    return intro + f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(blocks)}</tbody></table>"


# --------------------------------------------------------------------------------------------------
# The page


def build_page(run: str | Path, samples_per_model: int = 4) -> str:
    """The report page of the run folder ``run`` as one HTML string (see the module docstring)."""
    run = Path(run)
    page = _Page(run, samples_per_model)
    bodies = []
    for key, heading in SECTIONS[1:]:
        bodies.append((key, heading, _guarded(page.section, key, page.notes)))
    overview = _guarded(page.section, "overview", page.notes)  # last: it lists the notes of the others
    if page.notes:
        overview += "<h3>Missing or unreadable</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in page.notes)
        overview += "</ul>"
    bodies.insert(0, ("overview", SECTIONS[0][1], overview))
    nav = "".join(f'<a href="#{key}">{_e(heading)}</a>' for key, heading in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{_e(h)}</h2>{body}</section>' for key, h, body in bodies)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"sparsealign run report: {run.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=muted>Written {stamp} by <code>sparsealign report</code>.</p>"
        f"<nav>{nav}</nav>{sections}</body></html>\n"
    )


def _guarded(render: Callable[[str], str], key: str, notes: list[str]) -> str:
    """A section's HTML, or a note when rendering it failed (the rest of the page is still written)."""
    try:
        return render(key)
    except Exception as error:  # a report page shows what it can; the error is logged and shown
        logger.warning("run report: the %s section failed: %s", key, error, exc_info=True)
        notes.append(f"The {key} section could not be rendered: {type(error).__name__}: {error}")
        return _note(f"This section could not be rendered: {type(error).__name__}: {error}")


def write_run_report(run: str | Path, samples_per_model: int = 4) -> Path:
    """Write ``run/report/index.html`` (atomically) and return its path. ``run`` must be a folder."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder (expected config.yaml, metrics.jsonl, report/ inside).")
    path = run / "report" / PAGE
    with atomic_write(path) as handle:
        handle.write(build_page(run, samples_per_model))
    return path
