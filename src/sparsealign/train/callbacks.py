"""Callbacks: user objects the training loop calls at fixed points, and how one stops training.

A callback is any object with some of these methods (a missing one is skipped; :class:`Callback` is the
protocol, for type checkers and documentation — there is nothing to subclass):

``on_log(step, metrics)``
    after a training log line is written; ``metrics`` is the dict written to ``metrics.jsonl`` (``step``,
    ``loss``, the method's metrics, ``lr``, ``grad_norm``, ``tokens_per_s``, ``epoch``, ``time``,
    ``elapsed_s``). Main process only.
``on_evaluate(step, metrics)``
    after a held-out evaluation is written (the ``eval/...`` line of ``metrics.jsonl``). Main process only.
``on_save(step, path)``
    after a checkpoint (``checkpoints/step-N``) or the final model (``final``) is written. Main process only.
``on_step_end(step)``
    after every optimizer step, once its logging, evaluation and checkpoint are done. Every process.

**Stopping.** A method that returns ``True`` asks training to stop after the current step. The processes
agree (any one asking stops all), and the run ends as Ctrl-C ends it: a checkpoint at that step, no
``final/`` and no final evaluation, ``RunResult.interrupted`` is True, and ``train.resume=auto`` continues.
Any other return value (``None`` included) means carry on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from sparsealign.errors import TrainingError

__all__ = ["HOOKS", "Callback", "Callbacks"]

HOOKS = ("on_log", "on_evaluate", "on_save", "on_step_end")


class Callback(Protocol):
    """What the loop may call; implement any subset. Return ``True`` to stop training after this step."""

    def on_log(self, step: int, metrics: dict[str, Any]) -> bool | None: ...

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> bool | None: ...

    def on_save(self, step: int, path: Path) -> bool | None: ...

    def on_step_end(self, step: int) -> bool | None: ...


class Callbacks:
    """The run's callbacks, called in the order given; remembers whether any asked to stop."""

    def __init__(self, callbacks: Iterable[object] = ()):
        self.items = list(callbacks)
        for item in self.items:
            if not any(callable(getattr(item, hook, None)) for hook in HOOKS):
                raise TrainingError(
                    f"{item!r} is not a callback: it has none of the methods {', '.join(HOOKS)}."
                )
        self.should_stop = False

    def __bool__(self) -> bool:
        return bool(self.items)

    def _call(self, hook: str, *args: Any) -> None:
        for item in self.items:
            method = getattr(item, hook, None)
            if method is not None and method(*args) is True:
                self.should_stop = True

    def on_log(self, step: int, metrics: dict[str, Any]) -> None:
        self._call("on_log", step, metrics)

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        self._call("on_evaluate", step, metrics)

    def on_save(self, step: int, path: Path) -> None:
        self._call("on_save", step, path)

    def on_step_end(self, step: int) -> None:
        self._call("on_step_end", step)
