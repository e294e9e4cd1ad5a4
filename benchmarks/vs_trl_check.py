"""The equality check of ``vs_trl.py``: both tools must see the same tokens and compute the same numbers.

A *probe* is what one tool computed on the benchmark's pairs, in file order, before its first training
step (plain JSON values, so that it crosses the subprocess boundary):

``rows``
    one entry per sequence, the chosen rows of every pair then the rejected rows (the concatenated batch):
    ``{"ids": [...], "response": [...]}``, the sequence's non-padding token ids and the positions in it of
    the response tokens that are scored (the response mask, as positions).
``policy_logps``, ``reference_logps``
    per sequence, ``sum_t log p(y_t | x, y_<t)`` over the scored response tokens, under the policy and under
    the reference (live model or precomputed: the cache is what is checked then).
``loss``
    the DPO loss of the whole batch, ``mean_i -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
    (Rafailov et al. 2023, eq. 7). Before the first step the policy is the reference, so this is ln 2 in
    any correct code: the log-probs carry the check, and :func:`loss_gap` compares the losses the two tools
    log over the timed steps (their optimizers then have to agree as well).

:func:`compare_probes` lists every difference; :func:`require_equal` raises :class:`ProbeMismatch` when
there is one, and the benchmark then reports no speed.
"""

from __future__ import annotations

import math
from typing import Any

TOLERANCES = {
    # precision: (log-prob rtol, log-prob atol, loss rtol, loss atol); |a - b| <= atol + rtol * |b|
    "fp32": (1e-5, 1e-5, 1e-5, 1e-6),
    "bf16-mixed": (2e-2, 1e-2, 5e-2, 5e-2),
}
"""Tolerances of :func:`compare_probes`. In fp32 the per-sequence log-probs must agree to 1e-5 relative to
their size: a sum of about a hundred float32 log-probs of size 5 carries rounding of a few 1e-5 absolute, so
a purely absolute 1e-5 would fail on correct code. Under bf16 autocast (8 bits of mantissa, different
kernels in each tool) only a coarse check is possible; token ids are compared exactly in both."""


class ProbeMismatch(RuntimeError):
    """The two tools did not see the same tokens or did not compute the same log-probs or loss."""


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def _compare_numbers(name: str, a: list[float], b: list[float], rtol: float, atol: float) -> list[str]:
    if len(a) != len(b):
        return [f"{name}: {len(a)} values vs {len(b)}"]
    return [
        f"{name}[{i}]: {x!r} vs {y!r} (|diff| {abs(x - y):.3g} > {atol} + {rtol} x |{y:.6g}|)"
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if not _close(x, y, rtol, atol)
    ]


def compare_probes(
    a: dict[str, Any], b: dict[str, Any], precision: str = "fp32", limit: int = 8
) -> list[str]:
    """Every difference between two probes (at most ``limit`` per kind): token ids and response positions
    exactly, log-probs and the loss to the precision's :data:`TOLERANCES`. An empty list means they agree."""
    logp_rtol, logp_atol, loss_rtol, loss_atol = TOLERANCES[precision]
    problems: list[str] = []
    rows_a, rows_b = a["rows"], b["rows"]
    if len(rows_a) != len(rows_b):
        problems.append(f"rows: {len(rows_a)} sequences vs {len(rows_b)}")
    else:
        ids = [i for i, (x, y) in enumerate(zip(rows_a, rows_b, strict=True)) if x["ids"] != y["ids"]]
        masks = [
            i for i, (x, y) in enumerate(zip(rows_a, rows_b, strict=True)) if x["response"] != y["response"]
        ]
        problems += [f"rows[{i}]: token ids differ" for i in ids[:limit]]
        problems += [f"rows[{i}]: response positions differ" for i in masks[:limit]]
    for key in ("policy_logps", "reference_logps"):
        problems += _compare_numbers(key, a[key], b[key], logp_rtol, logp_atol)[:limit]
    problems += _compare_numbers("loss", [a["loss"]], [b["loss"]], loss_rtol, loss_atol)
    return problems


def require_equal(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("a", "b"), precision: str = "fp32"
) -> None:
    """Raise :class:`ProbeMismatch` naming every difference unless the probes agree."""
    problems = compare_probes(a, b, precision)
    if problems:
        raise ProbeMismatch(
            f"{names[0]} and {names[1]} do not compute the same thing; no speed is reported:\n  "
            + "\n  ".join(problems)
        )


def non_padding_tokens(probe: dict[str, Any]) -> int:
    """Real tokens of one batch of all the probe's pairs (prompt included, both responses)."""
    return sum(len(row["ids"]) for row in probe["rows"])


def loss_gap(a: dict[str, float], b: dict[str, float]) -> tuple[int, float]:
    """Steps logged by both tools (``{step: loss}``) and the largest ``|loss_a - loss_b|`` over them."""
    common = sorted(set(a) & set(b), key=int)
    return len(common), max((abs(a[k] - b[k]) for k in common), default=0.0)
