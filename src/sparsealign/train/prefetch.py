"""Collation off the step's critical path: the next optimizer step's micro-batches are collated (tokens
padded or packed, host-side counts taken) on a background thread while the current step computes.

The batches are the same as collating in line (the plan of which examples each step sees depends only on the
seed and the step), so a prefetched run equals an unprefetched one; torch's kernels release the GIL, so the
thread's Python work overlaps the step's compute.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(step)`` returns ``prepare(step)``, computed ahead while step ``step - 1`` ran when the steps are
    asked for in order, and starts ``prepare(step + 1)`` (if ``step + 1 < total``) before returning."""

    def __init__(self, prepare: Callable[[int], T], total: int) -> None:
        self._prepare = prepare
        self._total = total
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsealign-collate")
        self._pending: tuple[int, Future[T]] | None = None

    def get(self, step: int) -> T:
        if self._pending is not None and self._pending[0] == step:
            value = self._pending[1].result()  # an exception in prepare() is raised here, in the step
        else:
            value = self._prepare(step)
        self._pending = None
        if step + 1 < self._total:
            self._pending = (step + 1, self._pool.submit(self._prepare, step + 1))
        return value

    def close(self) -> None:
        """Stop the thread (waiting for a collation in progress: milliseconds)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = None
