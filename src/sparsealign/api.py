"""The Python front door: the same functions the command line calls (see ``docs/python.md``).

    from sparsealign import load_config, train

    result = train(load_config("smoke", ["train.max_steps=2"]), callbacks=[my_callback])

:func:`train` runs the training loop (``sparsealign.train.loop``) and then, when ``eval.generate`` is set and
there are held-out prompts, samples the reference and the trained policy and reports reward and KL
(``sparsealign.eval.report``), as ``sparsealign train`` does. :class:`Trainer` does the same in steps: build
once, then ``train()``, ``evaluate()`` and ``save()``. Callbacks: :mod:`sparsealign.train.callbacks`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sparsealign.config import Config
from sparsealign.eval.report import evaluate_generations
from sparsealign.recipes.load import load_config
from sparsealign.train.callbacks import Callback, Callbacks
from sparsealign.train.loop import RunResult, Session, build, evaluate, run, save_model
from sparsealign.train.model_card import write_model_card

__all__ = ["Callback", "RunResult", "Trainer", "load_config", "train"]


class Trainer:
    """One run, built once (models, data, optimizer; resumed when ``train.resume`` says so), stepped by you.

    ``train()`` trains to the end exactly as :func:`train` does (it may be called once); ``evaluate()``
    writes and returns the held-out loss at the current step, before or after training; ``save(path)``
    writes the policy (merged or as an adapter, per ``model.merge_final``) and the method's module there.
    """

    def __init__(self, config: Config, callbacks: Iterable[object] = ()):
        self.config = config
        self.callbacks = Callbacks(callbacks)  # checked before any expensive work
        self.session: Session = build(config)
        self.result: RunResult | None = None

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (including those before a resumption)."""
        return self.session.state.step

    def train(self) -> RunResult:
        """Train to the end (or until a callback stops it); then the generation report if ``eval.generate``."""
        if self.result is not None:
            raise RuntimeError("Trainer.train() runs once; build a new Trainer to train again.")
        result = run(self.session, self.callbacks)
        trained = result.trained
        cfg = self.config
        if cfg.eval.generate and trained is not None and trained.data.eval_prompts and not result.interrupted:
            result.report = evaluate_generations(
                trained.bundle,
                trained.data.reward,
                trained.data.eval_prompts,
                cfg.eval,
                cfg.train.seed,
                result.output_dir,
            )
            write_model_card(result.output_dir)  # again, now with the report's reward and KL
        self.result = result
        return result

    def evaluate(self) -> dict[str, float]:
        """The held-out ``eval/...`` metrics at the current step, also written to ``metrics.jsonl`` and
        passed to the callbacks' ``on_evaluate``; ``{}`` without held-out pairs."""
        return evaluate(self.session, self.callbacks)

    def save(self, path: str | Path) -> Path:
        """Write the current policy (and the method's module, if any) to ``path``, as ``final/`` is written;
        only the main process writes. Returns the folder."""
        s = self.session
        folder = Path(path)
        if s.accelerator.is_main_process:
            folder = save_model(s, folder)
            self.callbacks.on_save(s.state.step, folder)
        s.accelerator.wait_for_everyone()
        return folder


def train(config: Config, callbacks: Iterable[object] = ()) -> RunResult:
    """Train with ``config``, write the run folder, evaluate generations if asked; return the summary.
    ``callbacks``: objects with some of ``on_log``, ``on_evaluate``, ``on_save``, ``on_step_end``."""
    return Trainer(config, callbacks).train()
