"""The reward interface, the on-disk cache folder, and atomic file writes.

A reward model maps whole texts (prompt + continuation) to real numbers, larger meaning better. Every
reward in :mod:`sparsealign.rewards` follows :class:`RewardModel`; tests and user code can pass any object
with a ``name`` and a ``score`` method.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from sparsealign.errors import UserError
from sparsealign.models.builtins import cache_root  # ``$SPARSEALIGN_CACHE`` or ``~/.cache/sparsealign``

__all__ = ["RewardError", "RewardModel", "atomic_write", "cache_root", "reward_fingerprint"]


class RewardError(UserError, RuntimeError):
    """A reward model that cannot be loaded or used (missing files, no network, bad label index)."""


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


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it over ``path`` (readers never see a
    partial file); on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
