"""The reward interface.

A reward model maps whole texts (prompt + continuation) to real numbers, larger meaning better. Every
reward in :mod:`sparsealign.rewards` follows :class:`RewardModel`; tests and user code can pass any object
with a ``name`` and a ``score`` method.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from sparsealign.errors import RewardError

__all__ = ["RewardError", "RewardModel", "reward_fingerprint"]


@runtime_checkable
class RewardModel(Protocol):
    """Scores texts; higher is better.

    ``name`` identifies the reward (it is part of cache keys). A reward may also expose ``fingerprint``, a
    string that changes whenever its scores could change (e.g. hyper-parameters of a fitted classifier);
    callers fall back to ``name`` when it is absent.
    """

    name: str

    def score(self, texts: list[str]) -> list[float]:
        """One real-valued reward per text, in order."""
        ...


def reward_fingerprint(reward: RewardModel) -> str:
    """The string that identifies ``reward``'s scores in cache keys."""
    return str(getattr(reward, "fingerprint", None) or reward.name)
