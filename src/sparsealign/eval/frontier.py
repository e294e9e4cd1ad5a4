"""The IMDB reward-vs-KL frontier (the SparsePO paper's IMDB figure, at laptop scale).

For every method and β, one run of the method's built-in IMDB recipe (``imdb/<method>``) with its β option set
and ``eval.generate=true``; the run's generation report (:func:`sparsealign.eval.report.evaluate_generations`)
gives the cell's point: the mean reward of the policy's samples on the held-out prompts and the Monte-Carlo
sequence KL to the reference, ``mean_i sum_t log pi(y_it) - log pi_ref(y_it)``, each with its standard error
of the mean ``std / sqrt(n)`` over the ``n`` samples.

Cells run one after another in one process, each in ``DIR/runs/<method>-beta<β>/``. What they share is made
once and reused from the cache: the SmolLM2 model, the sentiment reward, the sampled pairs (keyed by the model,
the ``pairs`` section and the reward, which are the same in every cell: only ``method.*``, ``output_dir``,
``reference.cache`` and the train/eval overrides given to every cell differ) and, for methods whose recipe
trains from a reference cache (FPO), one cache per method in ``DIR/reference-cache/`` shared by its βs.

A cell is *finished* when its marker ``DIR/cells/<cell>.json`` says so for the same requested config
(compared up to ``output_dir`` and the run-control keys) and its folder has ``report/summary.json``; a rerun
skips it. A cell started with the same config but not finished continues with ``train.resume=auto`` (from its
newest checkpoint, or from the start when it has none; a run whose training ended but whose report did not
resumes at its last step and only reports); a folder holding a run of another or an unknown config is moved
aside by ``train.overwrite=true`` (``train.run_folder``: nothing is deleted). A failed cell is logged and recorded with its error; the others continue. After
every cell the outputs are rewritten: ``frontier.csv``, ``frontier.json``, ``frontier.png`` and
``index.html`` (see :func:`write_outputs`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsealign.config import Config, to_dict
from sparsealign.errors import ConfigError
from sparsealign.io import atomic_write, inside

# ``sparsealign.methods`` and ``sparsealign.recipes.load`` (which import torch) are imported inside the
# functions that use them, so that the command line can read this module's settings for its help at once.

logger = logging.getLogger(__name__)

EXPERIMENT = "imdb-frontier"
RECIPE_TEMPLATE = "imdb/{method}"
"""Each cell's recipe: the method's built-in IMDB recipe."""
EXPERIMENT_FILE = Path(__file__).with_name("experiments") / f"{EXPERIMENT}.yaml"
"""The experiment's definition (the methods of the paper's figure): data beside the code, so that no module
outside ``sparsealign.methods`` lists method names."""


def _default_methods() -> tuple[str, ...]:
    import yaml

    return tuple(yaml.safe_load(EXPERIMENT_FILE.read_text(encoding="utf-8"))["methods"])


DEFAULT_METHODS = _default_methods()
"""The methods of the SparsePO paper's IMDB figure, from :data:`EXPERIMENT_FILE`."""
BETA_OPTION = "beta"
"""The option every frontier method has: the strength of its KL term (DPO family, SparsePO, MaPO, FPO) or,
for SimPO, the scale of its length-normalised reward."""

BETA_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Default βs: these multiples of the β of the method's own recipe (imdb/dpo 0.1, imdb/simpo 2.0, imdb/fpo
2.0, ...), since the methods' βs are on different scales."""
QUICK_BETA_FACTORS = (0.5, 2.0)
"""``--quick``'s βs: two multiples of the recipe's β, a curve of two points per method."""
QUICK_OVERRIDES = (
    "train.max_steps=10",
    "train.lr=1e-3",
    "train.schedule=constant",
    "train.warmup_steps=2",
    "train.save_every=5",
    "train.log_every=2",
    "eval.samples_per_prompt=1",
    "eval.max_batches=1",
)
"""``--quick``'s settings for every cell (the pairs, reward and model are the IMDB default's): 10 optimizer
steps of 8 pairs (about a fifth of the default's 48-step epoch) at a constant lr of 1e-3 after 2 warm-up steps,
so that the summed learning rate (9e-3) is near the default's (48 cosine steps from 5e-4: 12e-3) and the
policies move a comparable distance in a fifth of the steps; the report samples each of the 64 held-out prompts
once (not twice); the held-out loss at the end uses one batch (the frontier does not use it)."""
CELL_OVERRIDES = ("eval.generate=true", "train.keep_checkpoints=1", "train.progress=false")
"""Every cell: the generation report on; one checkpoint kept (enough to resume, little disk)."""
IGNORED_KEYS = frozenset({"output_dir", "train.resume", "train.overwrite", "train.progress", "train.tracker"})
"""Config keys whose difference does not make a finished cell stale."""

CSV_FIELDS = (
    "method",
    "beta",
    "status",
    "reward_mean",
    "reward_sem",
    "kl_mean",
    "kl_sem",
    "reference_reward_mean",
    "reference_reward_sem",
    "num_samples",
    "steps",
    "seconds",
    "run_dir",
    "error",
)


@dataclass(frozen=True)
class Cell:
    """One point of the frontier: ``method`` trained at ``beta`` from ``recipe`` with ``overrides``."""

    method: str
    beta: float
    recipe: str
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def name(self) -> str:
        return cell_name(self.method, self.beta)


@dataclass
class CellResult:
    """What one cell gave: ``status`` is ``finished`` (trained now), ``skipped`` (finished before) or
    ``failed`` (``error`` says why); ``summary`` is its ``report/summary.json``."""

    cell: Cell
    status: str
    summary: dict[str, Any] | None = None
    steps: int | None = None
    seconds: float | None = None
    error: str = ""
    row: dict[str, Any] = field(default_factory=dict)


def format_beta(beta: float) -> str:
    """β as written in a folder name and a label: the shortest exact form (``0.1``, ``2``, ``0.025``)."""
    text = repr(float(beta))
    return text[:-2] if text.endswith(".0") else text


def cell_name(method: str, beta: float) -> str:
    return f"{method}-beta{format_beta(beta)}"


def beta_option(method: str) -> str:
    """The option that :data:`BETA_OPTION` names, checked against the method's registry entry."""
    from sparsealign.methods import get_method

    options = get_method(method).option_names()
    if BETA_OPTION not in options:
        raise ConfigError(
            f"method '{method}' has no '{BETA_OPTION}' option (its options: {', '.join(options) or 'none'}), "
            "so it has no point on a reward-vs-KL frontier over β."
        )
    return BETA_OPTION


def parse_betas(specs: Iterable[str]) -> dict[str | None, list[float]]:
    """``["0.05,0.1", "simpo=1,2,4"]`` -> ``{None: [0.05, 0.1], "simpo": [1.0, 2.0, 4.0]}``: a bare list is
    every method's βs, ``METHOD=LIST`` one method's (it wins over the bare list)."""
    out: dict[str | None, list[float]] = {}
    for spec in specs:
        method, _, values = spec.rpartition("=")
        key = method.strip() or None
        try:
            betas = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--betas {spec!r}: βs are numbers, e.g. 0.05,0.1 or simpo=1,2,4.") from None
        if not betas or any(not math.isfinite(b) or b <= 0 for b in betas):
            raise ConfigError(
                f"--betas {spec!r}: give one or more positive βs, e.g. 0.05,0.1 or simpo=1,2,4."
            )
        out[key] = sorted(set(betas))
    return out


def recipe_for(method: str, template: str = RECIPE_TEMPLATE) -> str:
    return template.format(method=method)


def expand_grid(
    methods: Sequence[str],
    out_dir: str | Path,
    betas: dict[str | None, list[float]] | None = None,
    quick: bool = False,
    overrides: Sequence[str] = (),
    template: str = RECIPE_TEMPLATE,
) -> list[Cell]:
    """The cells, method by method in the given order and by increasing β.

    A method's βs: its own ``betas[method]``, else ``betas[None]``, else the multiples
    :data:`BETA_FACTORS` (:data:`QUICK_BETA_FACTORS` with ``quick``) of its recipe's β. Each cell's
    overrides, in order (a later one wins): :data:`QUICK_OVERRIDES` with ``quick``, :data:`CELL_OVERRIDES`,
    the user's ``overrides``, the shared reference cache when the recipe uses one, the β option and
    ``output_dir=DIR/runs/<method>-beta<β>``. A method name is part of file names inside ``DIR``, so one
    that could lead outside it (``/``, ``..``, a symbolic link to elsewhere) is a :class:`ConfigError`
    (:func:`sparsealign.io.inside`)."""
    from sparsealign.recipes.load import load_config

    betas = betas or {}
    unknown = [m for m in betas if m is not None and m not in methods]
    if unknown:
        raise ConfigError(f"--betas names {', '.join(unknown)}, which --methods does not include.")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {','.join(methods)}.")
    out = Path(out_dir)
    for method in methods:  # part of every cell's folder and marker name: refused before anything is loaded
        inside(out / "runs", method, "method name (--methods)", error=ConfigError)
    base = [*(QUICK_OVERRIDES if quick else ()), *CELL_OVERRIDES, *overrides]
    cells = []
    for method in methods:
        key = beta_option(method)
        recipe = recipe_for(method, template)
        config = load_config(recipe, [*base])  # the recipe as every cell of this method sees it
        chosen = betas.get(method) or betas.get(None)
        if not chosen:
            factors = QUICK_BETA_FACTORS if quick else BETA_FACTORS
            own = float(getattr(config.method, key))
            chosen = sorted({round(own * f, 10) for f in factors})
        shared = []
        if config.reference.cache is not None and not any(
            o.startswith("reference.cache=") for o in overrides
        ):
            name = f"{method}-{reference_key(config)}"
            cache = inside(out / "reference-cache", name, "reference cache name", error=ConfigError)
            shared = [f"reference.cache={cache}"]
        for beta in chosen:
            run_dir = inside(out / "runs", cell_name(method, beta), "cell name", error=ConfigError)
            cell_overrides = (*base, *shared, f"method.{key}={beta!r}", f"output_dir={run_dir}")
            cells.append(Cell(method, float(beta), recipe, cell_overrides, run_dir))
    return cells


def reference_key(config: Config) -> str:
    """A short hash of what a reference cache's contents depend on (model, data, pairs, reward, SAE), so
    that runs with other such settings get their own cache folder."""
    tree = to_dict(config)
    parts = {k: tree[k] for k in ("model", "data", "pairs", "reward", "sae")}
    parts["reference"] = {k: v for k, v in tree["reference"].items() if k != "cache"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def unbuilt_saes(cells: Sequence[Cell]) -> dict[str, list[str]]:
    """The built-in SAEs that the cells name (FPO's ``sae.path``) and that are not built yet, each with the
    methods that need it: the first such cell trains it (about 16 minutes on 2 cores for
    ``smollm2-135m-instruct-imdb``)."""
    from sparsealign.errors import SAEError
    from sparsealign.recipes.load import load_config
    from sparsealign.sae.builtins import BUILTIN_SAES, resolve_builtin_sae

    missing: dict[str, list[str]] = {}
    for cell in cells:
        path = load_config(cell.recipe, list(cell.overrides)).sae.path
        if path not in BUILTIN_SAES or cell.method in missing.get(path, []):
            continue
        try:
            resolve_builtin_sae(path)
        except SAEError:
            missing.setdefault(path, []).append(cell.method)
    return missing


# ------------------------------------------------------------------------------------------ cell states


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree flattened to dotted keys (JSON values: tuples become lists), without
    :data:`IGNORED_KEYS`."""
    flat = _flatten(json.loads(json.dumps(tree, default=str)))
    return {k: v for k, v in flat.items() if k not in IGNORED_KEYS}


def marker_path(cell: Cell) -> Path:
    """``DIR/cells/<cell>.json``: the cell's requested config and whether it finished (outside the run
    folder, which ``train.overwrite`` may move aside)."""
    return inside(cell.run_dir.parent.parent / "cells", f"{cell.name}.json", "cell marker", error=ConfigError)


def holds_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` has anything a fresh run would refuse to write over (see ``train.run_folder``)."""
    if not run_dir.is_dir():
        return False
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "final", "checkpoints", "report"))


def cell_state(cell: Cell, config: Config) -> str:
    """``finished``: this config's report is there; ``resume``: this config's unfinished run; ``stale``: a
    run of another (or an unknown) config, moved aside before training; ``new``: nothing there yet.

    "This config" is what the cell's marker (:func:`marker_path`) recorded when the run started: the
    requested config, compared up to :data:`IGNORED_KEYS` (the run's own ``config.yaml`` holds values the
    loop resolves, such as ``train.precision``, so it is not compared)."""
    marker = _read_json(marker_path(cell)) or {}
    matches = marker.get("config") == comparable(to_dict(config))
    if (
        matches
        and marker.get("status") == "finished"
        and (cell.run_dir / "report" / "summary.json").is_file()
    ):
        return "finished"
    if not holds_results(cell.run_dir):
        return "new"
    return "resume" if matches else "stale"


def write_marker(cell: Cell, requested: dict[str, Any], status: str, **extra: Any) -> None:
    """Record the cell's ``requested`` config (:func:`comparable`) and its ``status`` in its marker."""
    record = {"method": cell.method, "beta": cell.beta, "status": status, **extra, "config": requested}
    with atomic_write(marker_path(cell)) as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_result(cell: Cell) -> CellResult:
    """A finished cell read back: its report, and the steps and seconds its marker recorded."""
    summary = _read_json(cell.run_dir / "report" / "summary.json")
    marker = _read_json(marker_path(cell)) or {}
    return CellResult(cell, "skipped", summary, marker.get("steps"), marker.get("seconds"))


# ------------------------------------------------------------------------------------------- running


class Interrupted(Exception):
    """A cell was interrupted (Ctrl-C, SIGTERM): the experiment stops; rerunning it continues."""


TrainFn = Callable[[Config], Any]
"""``sparsealign.api.train``: a config in, a ``RunResult`` (``steps``, ``interrupted``, ``report``) out."""


def run_cell(cell: Cell, train: TrainFn) -> CellResult:
    """Run one cell (or read it back when finished). Errors are caught and returned as a ``failed`` result
    (logged with their traceback); an interruption raises :class:`Interrupted`."""
    from sparsealign.recipes.load import load_config

    started = time.perf_counter()
    try:
        config = load_config(cell.recipe, list(cell.overrides))
        state = cell_state(cell, config)
        if state == "finished":
            logger.info("%s: finished before, skipped (%s)", cell.name, cell.run_dir)
            return finished_result(cell)
        requested = comparable(to_dict(config))  # before training, which resolves some values in place
        write_marker(cell, requested, "started")
        control = {"resume": ["train.resume=auto"], "stale": ["train.overwrite=true"]}.get(state, [])
        if control:
            config = load_config(cell.recipe, [*cell.overrides, *control])
            what = "continuing it" if state == "resume" else "moving the old run aside"
            logger.info("%s: %s holds an unfinished or other run; %s", cell.name, cell.run_dir, what)
        logger.info("%s: training (%s)", cell.name, cell.run_dir)
        result = train(config)
        if getattr(result, "interrupted", False):
            raise Interrupted(f"{cell.name} was interrupted at step {result.steps}")
        summary = getattr(result, "report", None) or _read_json(cell.run_dir / "report" / "summary.json")
        if summary is None:
            raise RuntimeError(
                "the run wrote no generation report (report/summary.json): no held-out prompts?"
            )
        seconds = time.perf_counter() - started
        write_marker(cell, requested, "finished", steps=result.steps, seconds=round(seconds, 1))
        logger.info("%s: done in %.0f s", cell.name, seconds)
        return CellResult(cell, "finished", summary, result.steps, round(seconds, 1))
    except KeyboardInterrupt:
        raise Interrupted(f"{cell.name} was interrupted") from None
    except Interrupted:
        raise
    except Exception as error:  # noqa: BLE001 - one failed cell must not stop the others
        logger.error("%s failed:\n%s", cell.name, traceback.format_exc())
        message = " ".join(str(error).split()) or type(error).__name__
        return CellResult(
            cell,
            "failed",
            seconds=round(time.perf_counter() - started, 1),
            error=f"{type(error).__name__}: {message}",
        )


def result_row(result: CellResult, out_dir: Path) -> dict[str, Any]:
    """A row of ``frontier.csv``: the policy's reward and KL (mean, sem), the reference's reward, the
    number of scored samples, steps, wall seconds, the run folder (relative to ``out_dir``) and the error."""
    cell = result.cell
    try:
        run_dir = str(cell.run_dir.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        run_dir = str(cell.run_dir)
    row: dict[str, Any] = {k: None for k in CSV_FIELDS}
    row.update(method=cell.method, beta=cell.beta, status=result.status, run_dir=run_dir, error=result.error)
    row.update(steps=result.steps, seconds=result.seconds)
    summary = result.summary or {}
    policy, reference = summary.get("policy") or {}, summary.get("reference") or {}
    if result.status != "failed" and not policy:
        row.update(status="failed", error="report/summary.json has no 'policy' entry")
    row.update(
        reward_mean=policy.get("reward_mean"),
        reward_sem=policy.get("reward_sem"),
        kl_mean=policy.get("kl_mean"),
        kl_sem=policy.get("kl_sem"),
        num_samples=policy.get("num_samples"),
        reference_reward_mean=reference.get("reward_mean"),
        reference_reward_sem=reference.get("reward_sem"),
    )
    return row


@dataclass
class Experiment:
    """A frontier experiment: its cells and where it writes. ``settings`` is recorded in ``frontier.json``
    and shown on the page (the command, ``quick``, the overrides)."""

    cells: list[Cell]
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)


def run_experiment(experiment: Experiment, train: TrainFn, plot: bool = True) -> list[dict[str, Any]]:
    """Run (or skip) every cell in order, rewriting the outputs after each; return the rows. An
    interruption writes the outputs of the cells done so far, then raises :class:`Interrupted`."""
    out = experiment.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = len(experiment.cells)
    for index, cell in enumerate(experiment.cells, 1):
        logger.info("cell %d/%d: %s", index, total, cell.name)
        try:
            result = run_cell(cell, train)
        except Interrupted:
            write_outputs(out, rows, experiment.settings, plot)
            raise
        rows.append(result_row(result, out))
        write_outputs(out, rows, experiment.settings, plot)
    return rows


# ------------------------------------------------------------------------------------------- outputs


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})


def read_csv(path: Path) -> list[dict[str, Any]]:
    """``frontier.csv`` back as rows (numbers as floats, ``steps`` as int, empty cells as None)."""
    numeric = {"beta", "reward_mean", "reward_sem", "kl_mean", "kl_sem", "reference_reward_mean"}
    numeric |= {"reference_reward_sem", "seconds"}
    rows = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value == "":
                    row[key] = None if key != "error" else ""
                elif key in numeric:
                    row[key] = float(value)
                elif key in ("steps", "num_samples"):
                    row[key] = int(value)
                else:
                    row[key] = value
            rows.append(row)
    return rows


def reference_point(rows: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """The reference's reward (KL 0 by definition): the first finished row's (every cell samples the same
    reference on the same prompts with the same seed, so they agree)."""
    for row in rows:
        if row.get("status") != "failed" and row.get("reference_reward_mean") is not None:
            return {"reward_mean": row["reference_reward_mean"], "reward_sem": row["reference_reward_sem"]}
    return None


def write_outputs(
    out_dir: Path, rows: Sequence[dict[str, Any]], settings: dict[str, Any], plot: bool = True
) -> None:
    """``frontier.csv`` (one row per cell), ``frontier.json`` (settings, reference, rows), ``frontier.png``
    (:func:`sparsealign.eval.frontier_plot.plot_frontier`) and ``index.html`` (the plot inlined, the table,
    links to each run's report page when it has one)."""
    from sparsealign.eval.frontier_plot import plot_frontier, write_page

    write_csv(out_dir / "frontier.csv", rows)
    payload = {
        "experiment": EXPERIMENT,
        "settings": settings,
        "reference": reference_point(rows),
        "cells": rows,
    }
    with atomic_write(out_dir / "frontier.json") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    png = out_dir / "frontier.png"
    if plot:
        plot_frontier(rows, png)
    write_page(out_dir / "index.html", rows, settings, png if png.is_file() else None, out_dir)


def summarize(rows: Sequence[dict[str, Any]]) -> str:
    """The frontier as a text table (printed at the end)."""
    head = f"{'method':10}{'beta':>8}{'reward':>16}{'KL':>16}{'steps':>7}{'seconds':>9}  status"
    lines = [head]
    for row in rows:
        if row.get("reward_mean") is not None:
            reward = f"{row['reward_mean']:.2f} ± {row['reward_sem']:.2f}"
            kl = f"{row['kl_mean']:.2f} ± {row['kl_sem']:.2f}"
        else:
            reward = kl = "-"
        steps = "" if row.get("steps") is None else str(row["steps"])
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f}"
        status = row["status"] + (f": {row['error']}" if row.get("error") else "")
        lines.append(
            f"{row['method']:10}{format_beta(row['beta']):>8}{reward:>16}{kl:>16}{steps:>7}{seconds:>9}  {status}"
        )
    ref = reference_point(rows)
    if ref:
        lines.append(f"reference reward {ref['reward_mean']:.2f} ± {ref['reward_sem']:.2f} (KL 0)")
    return "\n".join(lines)


__all__ = [
    "BETA_FACTORS",
    "CSV_FIELDS",
    "DEFAULT_METHODS",
    "QUICK_BETA_FACTORS",
    "QUICK_OVERRIDES",
    "Cell",
    "CellResult",
    "Experiment",
    "Interrupted",
    "beta_option",
    "cell_state",
    "expand_grid",
    "parse_betas",
    "read_csv",
    "result_row",
    "run_cell",
    "run_experiment",
    "summarize",
    "unbuilt_saes",
    "write_outputs",
]
