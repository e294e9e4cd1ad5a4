"""Counting pairwise judgments: wins, ties, failures, the win rate and its Wilson interval.

``win_rate = candidate_wins / (candidate_wins + baseline_wins)``: the candidate's share of the decided
comparisons (ties and failed comparisons count for neither side). Its 95% interval is Wilson's score
interval (Wilson 1927) for ``k`` wins in ``n`` decided comparisons, with ``p = k / n`` and ``z = 1.95996``:

    (p + z²/2n ± z·sqrt(p(1 − p)/n + z²/4n²)) / (1 + z²/n)

computed by ``scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")``. Unlike the normal
approximation it stays inside [0, 1] and is sensible for small ``n`` and for ``p`` near 0 or 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

__all__ = ["OUTCOMES", "count_outcomes", "wilson_interval"]

OUTCOMES = ("candidate", "baseline", "tie", "failed")
"""The outcome of one comparison."""


def wilson_interval(wins: int, decided: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson's score interval for a proportion of ``wins`` out of ``decided``; ``None`` when nothing was
    decided."""
    if decided == 0:
        return None
    from scipy.stats import binomtest

    interval = binomtest(wins, decided).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def count_outcomes(outcomes: Iterable[str]) -> dict[str, object]:
    """``candidate_wins``, ``baseline_wins``, ``ties``, ``failed``, ``total``, ``decided``, ``win_rate``
    (``None`` when nothing was decided) and ``win_rate_ci95`` (``[low, high]`` or ``None``)."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcome(s) {sorted(unknown)}; expected {OUTCOMES}")
    wins, losses = counts["candidate"], counts["baseline"]
    decided = wins + losses
    interval = wilson_interval(wins, decided)
    return {
        "candidate_wins": wins,
        "baseline_wins": losses,
        "ties": counts["tie"],
        "failed": counts["failed"],
        "total": sum(counts.values()),
        "decided": decided,
        "win_rate": wins / decided if decided else None,
        "win_rate_ci95": list(interval) if interval else None,
    }
