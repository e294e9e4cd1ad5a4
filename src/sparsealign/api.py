"""The Python front door: the same functions the command line calls.

    from sparsealign.api import load_config, train

    result = train(load_config("smoke", ["train.max_steps=2"]))

:func:`train` runs the training loop (``sparsealign.train.loop``) and then, when ``eval.generate`` is set and
there are held-out prompts, samples the reference and the trained policy and reports reward and KL
(``sparsealign.eval.report``), as ``sparsealign train`` does.
"""

from __future__ import annotations

from sparsealign.config import Config
from sparsealign.eval.report import evaluate_generations
from sparsealign.recipes.load import load_config
from sparsealign.train.loop import RunResult
from sparsealign.train.loop import train as train_loop

__all__ = ["RunResult", "load_config", "train"]


def train(config: Config) -> RunResult:
    """Train with ``config``, write the run folder, evaluate generations if asked; return the summary."""
    result = train_loop(config)
    trained = result.trained
    if config.eval.generate and trained is not None and trained.data.eval_prompts and not result.interrupted:
        result.report = evaluate_generations(
            trained.bundle,
            trained.data.reward,
            trained.data.eval_prompts,
            config.eval,
            config.train.seed,
            result.output_dir,
        )
    return result
