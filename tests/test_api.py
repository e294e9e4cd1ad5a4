"""The Python API (docs/python.md): the example script, callbacks, stopping, Trainer, light imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsealign import Trainer, load_config, train
from sparsealign.errors import TrainingError

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def smoke(tmp_path: Path, *overrides: str):
    base = [
        f"output_dir={tmp_path}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
    ]
    return load_config(ROOT / "configs/smoke.yaml", base + list(overrides))


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


class Recorder:
    """Records every call; ``stop_at``: return True from on_step_end at that step."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def on_log(self, step, metrics):
        self.calls.append(("log", step, metrics))

    def on_evaluate(self, step, metrics):
        self.calls.append(("evaluate", step, metrics))

    def on_save(self, step, path):
        self.calls.append(("save", step, Path(path)))

    def on_step_end(self, step):
        self.calls.append(("step_end", step))
        return step == self.stop_at


def test_example_trains_smoke_and_records_the_losses(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/train_with_callback.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    losses = json.loads(out.stdout.strip().splitlines()[-1])["losses"]
    logged = {str(m["step"]): m["loss"] for m in read_metrics(tmp_path) if "loss" in m}
    assert losses == logged
    assert list(losses) == ["1", "2", "3"]


def test_callbacks_get_the_metrics_lines_and_the_saved_paths(tmp_path):
    recorder = Recorder()
    result = train(
        smoke(tmp_path, "train.max_steps=4", "train.save_every=2", "train.eval_every=2"), [recorder]
    )
    assert result.steps == 4 and not result.interrupted
    lines = read_metrics(tmp_path)
    # every line of metrics.jsonl reached on_log (training) or on_evaluate (eval/...), equal and in order
    written = [c for c in recorder.calls if c[0] in ("log", "evaluate")]
    assert [c[2] for c in written] == lines
    assert [c[0] for c in written] == ["evaluate" if "eval/loss" in line else "log" for line in lines]
    assert all(c[1] == c[2]["step"] for c in written)
    saves = [c[1:] for c in recorder.calls if c[0] == "save"]
    assert saves == [
        (2, tmp_path / "checkpoints/step-2"),
        (4, tmp_path / "checkpoints/step-4"),
        (4, tmp_path / "final"),
    ]
    assert [c[1] for c in recorder.calls if c[0] == "step_end"] == [1, 2, 3, 4]
    # order within a step: log, evaluate, save, then step_end
    step2 = [c[0] for c in recorder.calls if c[1] == 2]
    assert step2 == ["log", "evaluate", "save", "step_end"]


def test_a_callback_stops_training_with_a_checkpoint(tmp_path):
    result = train(
        smoke(tmp_path, "train.max_steps=10", "train.save_every=0", "train.eval_every=0"), [Recorder(2)]
    )
    assert result.steps == 2 and result.interrupted
    assert (tmp_path / "checkpoints/step-2").is_dir()
    assert not (tmp_path / "final").exists()
    assert max(m["step"] for m in read_metrics(tmp_path)) == 2
    # and train.resume=auto continues from there to the end
    resumed = train(smoke(tmp_path, "train.max_steps=4", "train.eval_every=0", "train.resume=auto"))
    assert resumed.steps == 4 and not resumed.interrupted


def test_trainer_evaluates_trains_and_saves(tmp_path):
    recorder = Recorder()
    trainer = Trainer(
        smoke(tmp_path, "train.max_steps=2", "train.save_every=0", "train.eval_every=0"), [recorder]
    )
    assert trainer.step == 0
    before = trainer.evaluate()
    assert set(before) >= {"eval/loss", "eval/rewards/accuracies"}
    result = trainer.train()
    assert result.steps == trainer.step == 2
    after = trainer.evaluate()
    assert after["eval/loss"] != before["eval/loss"]
    evals = [m for m in read_metrics(tmp_path) if "eval/loss" in m]
    assert [(m["step"], m["eval/loss"]) for m in evals] == [
        (0, pytest.approx(before["eval/loss"])),
        (2, pytest.approx(result.eval_metrics["eval/loss"])),
        (2, pytest.approx(after["eval/loss"])),
    ]
    folder = trainer.save(tmp_path / "mine")
    assert (folder / "config.json").is_file()
    assert ("save", 2, folder) in recorder.calls
    with pytest.raises(RuntimeError, match="runs once"):
        trainer.train()


def test_an_object_without_hooks_is_refused_before_building():
    with pytest.raises(TrainingError, match="not a callback"):
        Trainer(load_config("smoke"), [object()])


IMPORTS = {
    "light": "import sys, sparsealign; assert 'torch' not in sys.modules, 'torch imported'",
    "api first": (
        "from sparsealign import train, load_config, Config; import sparsealign.train.loop as loop;"
        "from sparsealign import train as again; assert again is train and callable(train);"
        "assert loop.run and sparsealign.train.loop is loop"
    ),
    "loop first": (
        "import sparsealign.train.loop as loop; from sparsealign import train, load_config, Config;"
        "import sparsealign, inspect; assert callable(train) and sparsealign.train.loop is loop;"
        "from sparsealign.api import train as api_train;"
        "assert list(inspect.signature(train).parameters) == ['config', 'callbacks']"
    ),
}


@pytest.mark.parametrize("code", IMPORTS.values(), ids=IMPORTS.keys())
def test_imports(code):
    out = subprocess.run(
        [sys.executable, "-c", "import sparsealign\n" + code], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_calling_the_train_package_calls_the_api(monkeypatch):
    import sparsealign.api

    seen = []
    monkeypatch.setattr(sparsealign.api, "train", lambda config, callbacks: seen.append((config, callbacks)))
    train("cfg", ["cb"])
    assert seen == [("cfg", ["cb"])]
