"""The Python front door: the same functions the command line calls (see ``docs/python.md``).

    from sparsealign import load_config, train

    result = train(load_config("smoke", ["train.max_steps=2"]), callbacks=[my_callback])

:func:`train` runs the training loop (``sparsealign.train.loop``) and then, when ``eval.generate`` is set and
there are held-out prompts, samples the reference and the trained policy and reports KL, lengths and the
reward (``sparsealign.eval.report``), and writes the run's HTML page ``report/index.html``
(``sparsealign.eval.run_report``), as ``sparsealign train`` does. :class:`Trainer` does the same in steps: build
once, then ``train()``, ``evaluate()`` and ``save()``. Callbacks: :mod:`sparsealign.train.callbacks`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

from sparsealign.config import Config, RewardConfig
from sparsealign.eval.report import evaluate_generations
from sparsealign.eval.run_report import write_run_report
from sparsealign.recipes.load import load_config
from sparsealign.train.callbacks import Callback, Callbacks
from sparsealign.train.loop import RunResult, Session, build, evaluate, run, save_model
from sparsealign.train.model_card import write_model_card

__all__ = ["Callback", "RunResult", "Trainer", "load_config", "train"]

logger = logging.getLogger(__name__)

_DEFAULT_REWARD = next(f.default for f in dataclasses.fields(RewardConfig) if f.name == "name")


def report_reward(config: Config, reward: object) -> object | None:
    """The reward the generation report scores with, or None: a named source's (it built its pairs with it),
    else only a ``reward.name`` other than the schema's default, which is the IMDB source's classifier and
    says nothing about a user's data."""
    name = config.reward.name
    if not name or (config.data.source is None and name == _DEFAULT_REWARD):
        return None
    return reward


def _no_held_out_prompts(config: Config) -> str:
    d = config.data
    if d.dataset is not None:
        how = "set data.eval_split to a held-out split of the dataset, or data.eval_fraction > 0"
    elif d.path is not None:
        how = "set data.eval_fraction > 0 (a fraction of the file's pairs is held out)"
    else:
        how = "the data source returned none; give it eval_prompts"
    return f"eval.generate=true but there are no held-out prompts, so no generation report: {how}."


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
        if cfg.eval.generate and trained is not None and not result.interrupted:
            if trained.data.eval_prompts:
                result.report = evaluate_generations(
                    trained.bundle,
                    report_reward(cfg, trained.data.reward),
                    trained.data.eval_prompts,
                    cfg.eval,
                    cfg.train.seed,
                    result.output_dir,
                )
                write_model_card(result.output_dir)  # again, now with the report's reward and KL
            else:
                logger.warning(_no_held_out_prompts(cfg))
        if self.session.accelerator.is_main_process and not result.interrupted:
            try:
                result.written["report"] = write_run_report(result.output_dir)
                logger.info("run report: %s", result.written["report"])
            except Exception as error:  # the run is done and saved; a page that fails must not undo that
                logger.warning(
                    "Could not write the run report (%s); write it with: sparsealign report %s",
                    error,
                    result.output_dir,
                )
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
