"""pass@k of code samples: each sample runs with its task's tests in :mod:`sparsealign.eval.sandbox`.

The estimator is the unbiased one of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
section 2.1): with ``n`` samples of a task of which ``c`` pass,

    pass@k = E_tasks[ 1 - C(n - c, k) / C(n, k) ],

computed per task in the numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (1 when
``n - c < k``: every draw of ``k`` contains a passing sample). It is defined only for ``k <= n``: a ``k`` for
which some task has fewer than ``k`` samples is reported as not computable (``null``, with the reason), never
estimated from the tasks that happen to have enough.

Rows (JSONL, one per sample, several per task) come in three layouts, detected row by row:

- **plain**: ``task_id``, ``output`` (the program) and ``tests`` (a string or a list of assertion strings),
  run as the program followed by the tests;
- **MBPP** (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``, ``challenge_test_list``: the
  schema of ``google-research/mbpp``'s ``mbpp.jsonl`` and of the ``mbpp`` dataset on the Hugging Face hub)
  plus ``output``: the output, then ``test_setup_code``, then the asserts of ``test_list``;
  ``challenge_test_list`` is not run (as in the MBPP paper's pass@k and the bigcode harness);
- **HumanEval** (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``: the schema of
  ``openai/human-eval``'s ``HumanEval.jsonl.gz``) plus ``output``: the prompt followed by the output (the
  output alone when it already defines ``entry_point``), then ``test``, then ``check(entry_point)``, as the
  human-eval harness runs it.

A sample's index is its position among its task's rows in the file. The rows must share one temperature
(pass@k is defined at one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsealign.errors import DataError
from sparsealign.eval.samples import append_rows, iter_rows, write_rows
from sparsealign.eval.sandbox import STATUSES, Limits, Outcome, network_isolation, run_programs

__all__ = [
    "LAYOUTS",
    "CodeSample",
    "build_program",
    "detect_layout",
    "evaluate_passk",
    "load_code_samples",
    "pass_at_k",
    "results_path",
    "summarize",
]

logger = logging.getLogger(__name__)

LAYOUTS = {
    "plain": "task_id, output, tests: the output followed by the tests",
    "mbpp": "MBPP's test_list and test_setup_code: the output, the setup code, the asserts",
    "humaneval": "HumanEval's prompt, test and entry_point: prompt + output, test, check(entry_point)",
}


def pass_at_k(n: int, c: int, k: int) -> float | None:
    """The unbiased pass@k of one task with ``n`` samples of which ``c`` pass (Chen et al. 2021):
    ``1 - C(n - c, k) / C(n, k)``, as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``; ``None`` when ``n < k``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if n < k:
        return None
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class CodeSample:
    """One sample to run: its task, its index among the task's samples, and the program (output + tests)."""

    task_id: str | int
    index: int
    program: str
    layout: str


def detect_layout(row: dict[str, Any]) -> str | None:
    """``plain`` (a ``tests`` column), ``mbpp`` (``test_list``), ``humaneval`` (``test`` and ``entry_point``),
    or ``None``."""
    if "tests" in row:
        return "plain"
    if "test_list" in row:
        return "mbpp"
    if "test" in row and "entry_point" in row:
        return "humaneval"
    return None


def _strings(value: Any, what: str) -> str:
    """A string, or a list of strings joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return "\n".join(value)
    raise ValueError(f"`{what}` must be a string or a list of strings, not {type(value).__name__}")


def build_program(row: dict[str, Any], layout: str) -> str:
    """The program that tests a row's ``output`` in its ``layout`` (see the module docstring); a
    ``ValueError`` says what is missing or malformed."""
    output = row.get("output")
    if not isinstance(output, str):
        raise ValueError("`output` (the program) must be a string")
    if layout == "plain":
        return f"{output}\n\n{_strings(row['tests'], 'tests')}\n"
    if layout == "mbpp":
        setup = row.get("test_setup_code") or ""
        return (
            f"{output}\n\n{_strings(setup, 'test_setup_code')}\n{_strings(row['test_list'], 'test_list')}\n"
        )
    if layout == "humaneval":
        entry_point, test, prompt = row["entry_point"], row["test"], row.get("prompt")
        if not isinstance(entry_point, str) or not entry_point.isidentifier():
            raise ValueError(f"`entry_point` must be a function name, not {entry_point!r}")
        if not isinstance(test, str):
            raise ValueError("`test` must be a string defining check(candidate)")
        defines = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", output, re.MULTILINE)
        if defines:
            body = output
        elif isinstance(prompt, str):
            body = prompt + output
        else:
            raise ValueError(
                f"the output does not define {entry_point}() and there is no `prompt` to complete"
            )
        return f"{body}\n\n{test}\n\ncheck({entry_point})\n"
    raise ValueError(f"unknown layout {layout!r}")


def load_code_samples(path: str | Path) -> list[CodeSample]:
    """Every row of a samples file as a :class:`CodeSample`, its layout detected and logged; a row that
    cannot be used is a :class:`~sparsealign.errors.DataError` naming the file, the line and the fix."""
    path = Path(path)
    samples: list[CodeSample] = []
    per_task: Counter = Counter()
    layouts: Counter = Counter()
    temperatures: set = set()
    for number, row in iter_rows(path):
        where = f"{path}, line {number}"
        task_id = row.get("task_id")
        if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
            raise DataError(f"{where}: needs a `task_id` (a string or an integer) to group samples by task")
        layout = detect_layout(row)
        if layout is None:
            raise DataError(
                f"{where}: no tests: give `tests` (assertions), MBPP's `test_list` or HumanEval's `test` and "
                f"`entry_point` (the row has: {', '.join(row)})"
            )
        try:
            program = build_program(row, layout)
        except ValueError as error:
            raise DataError(f"{where} ({layout} layout): {error}") from None
        if "temperature" in row:
            temperatures.add(row["temperature"])
        samples.append(CodeSample(task_id, per_task[task_id], program, layout))
        per_task[task_id] += 1
        layouts[layout] += 1
    if not samples:
        raise DataError(f"{path}: no samples")
    if len(temperatures) > 1:
        raise DataError(
            f"{path}: samples at {len(temperatures)} temperatures ({', '.join(map(str, sorted(temperatures)))}); "
            "pass@k is defined at one: keep one temperature's rows"
        )
    for layout, count in layouts.items():
        logger.info("%s: %d row(s) in the %s layout (%s)", path, count, layout, LAYOUTS[layout])
    return samples


def results_path(out: str | Path) -> Path:
    """The per-sample sidecar of ``--out``: ``<stem>.samples.jsonl`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.samples.jsonl")


def _sha(program: str) -> str:
    return hashlib.sha256(program.encode()).hexdigest()[:16]


def _record(sample: CodeSample, outcome: Outcome, limits: Limits) -> dict[str, Any]:
    return {
        "task_id": sample.task_id,
        "sample": sample.index,
        "passed": outcome.passed,
        "status": outcome.status,
        "reason": outcome.reason,
        "program_sha256": _sha(sample.program),
        "timeout_s": limits.timeout,
        "memory_mb": limits.memory_mb,
    }


def _previous_results(path: Path, limits: Limits) -> dict[tuple, dict[str, Any]]:
    """Results a previous run wrote to the sidecar for the same program under the same limits, by
    ``(task_id, sample, program_sha256)``; a partial or unreadable line (an interrupted run) is skipped."""
    found: dict[tuple, dict[str, Any]] = {}
    if not path.is_file():
        return found
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
                key = (row["task_id"], row["sample"], row["program_sha256"])
                same = row["timeout_s"] == limits.timeout and row["memory_mb"] == limits.memory_mb
            except (ValueError, KeyError, TypeError):
                continue
            if same and row.get("status") in STATUSES:
                found[key] = row
    return found


def summarize(
    samples: Sequence[CodeSample], records: Sequence[dict[str, Any]], ks: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-task rows (``task_id``, ``n``, ``c``, ``pass@K``) and the summary: ``pass@K`` (the mean over tasks,
    ``None`` when some task has fewer than K samples, with the reason under ``not_computable``), ``tasks``,
    ``samples``, and the number of samples of each status."""
    n: Counter = Counter()
    c: Counter = Counter()
    for sample, record in zip(samples, records, strict=True):
        n[sample.task_id] += 1
        c[sample.task_id] += bool(record["passed"])
    per_task = []
    for task_id in n:
        row: dict[str, Any] = {"task_id": task_id, "n": n[task_id], "c": c[task_id]}
        row.update({f"pass@{k}": pass_at_k(n[task_id], c[task_id], k) for k in ks})
        per_task.append(row)
    summary: dict[str, Any] = {}
    not_computable: dict[str, str] = {}
    for k in ks:
        values = [row[f"pass@{k}"] for row in per_task]
        if any(value is None for value in values):
            short = sum(value is None for value in values)
            not_computable[f"pass@{k}"] = (
                f"{short} of {len(values)} task(s) have fewer than {k} samples (fewest: {min(n.values())})"
            )
            summary[f"pass@{k}"] = None
        else:
            summary[f"pass@{k}"] = sum(values) / len(values)
    if not_computable:
        summary["not_computable"] = not_computable
    statuses = Counter(record["status"] for record in records)
    summary.update({"tasks": len(per_task), "samples": len(records)})
    summary.update({status: statuses.get(status, 0) for status in STATUSES})
    return per_task, summary


def evaluate_passk(
    samples_path: str | Path, out: str | Path, ks: Sequence[int], limits: Limits, workers: int = 1
) -> dict[str, Any]:
    """Run every sample of ``samples_path`` in the sandbox and write the results: ``out`` gets one line per
    task and the summary (see :func:`summarize`) as its last line; :func:`results_path` gets one line per
    sample (``task_id``, ``sample``, ``passed``, ``status``, ``reason``). Results already in that sidecar for
    the same program and limits (an interrupted run) are reused. Returns the summary."""
    samples = load_code_samples(samples_path)
    sidecar = results_path(out)
    previous = _previous_results(sidecar, limits)
    records: list[dict[str, Any] | None] = [
        previous.get((sample.task_id, sample.index, _sha(sample.program))) for sample in samples
    ]
    todo = [index for index, record in enumerate(records) if record is None]
    if len(todo) < len(samples):
        logger.info("%s: %d sample result(s) reused", sidecar, len(samples) - len(todo))
    isolated = bool(network_isolation())
    logger.info(
        "running %d program(s), %d at a time (timeout %g s, memory %d MB, network namespace: %s)",
        len(todo),
        workers,
        limits.timeout,
        limits.memory_mb,
        "yes" if isolated else "no, audit hook only",
    )

    progress = _progress(len(todo))

    def keep(position: int, outcome: Outcome) -> None:
        index = todo[position]
        records[index] = _record(samples[index], outcome, limits)
        append_rows(sidecar, [records[index]])
        progress.update(1)

    try:
        run_programs((samples[index].program for index in todo), limits, workers, keep)
    finally:
        progress.close()
    done = [record for record in records if record is not None]
    write_rows(sidecar, done)  # in sample order, without stale lines of earlier runs
    per_task, summary = summarize(samples, done, ks)
    for key, reason in summary.get("not_computable", {}).items():
        logger.warning("%s is not computable: %s", key, reason)
    summary.update(
        {
            "layouts": dict(Counter(sample.layout for sample in samples)),
            "timeout_s": limits.timeout,
            "memory_mb": limits.memory_mb,
            "network_namespace": isolated,
            "results": str(sidecar),
        }
    )
    write_rows(out, [*per_task, summary])
    return summary


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="passk", unit="program", disable=total == 0)
