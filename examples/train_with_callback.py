"""Train the smoke recipe from Python with a callback that records the losses (notebook-style: each ``# %%``
cell runs on its own in Jupyter or VS Code).

    python examples/train_with_callback.py [OUTPUT_DIR]

See docs/python.md for the API: ``load_config``, ``train``, ``Trainer`` and callbacks.
"""

# %% Load a recipe: a built-in name or a path, plus ``key=value`` overrides as on the command line.
from __future__ import annotations

import json
import sys

from sparsealign import load_config, train

output_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/smoke-api"
config = load_config("smoke", ["train.max_steps=3", f"output_dir={output_dir}", "train.progress=false"])


# %% A callback is any object with some of on_log, on_evaluate, on_save, on_step_end.
class LossRecorder:
    """Keeps the training loss of every logged step; returning True from a method would stop training."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, step: int, metrics: dict) -> None:
        self.losses[step] = metrics["loss"]  # ``metrics`` is the line written to metrics.jsonl


recorder = LossRecorder()

# %% Train: the same run folder and summary as ``sparsealign train smoke train.max_steps=3``.
result = train(config, callbacks=[recorder])
print(f"{result.steps} steps in {result.output_dir}")

# %% The recorded losses, one per logged step.
print(json.dumps({"losses": recorder.losses}))
