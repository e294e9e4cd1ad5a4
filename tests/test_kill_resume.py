"""SIGKILL at any moment loses at most one checkpoint interval: a smoke run killed between checkpoints or in
the middle of a checkpoint write resumes with ``train.resume=auto`` to the uninterrupted run's losses (1e-6);
the half-written checkpoint is ignored with a note. ``train.keep_checkpoints`` deletes only after the new
checkpoint is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import sparsealign.train.checkpoint as checkpoint_module
from sparsealign.recipes.load import load_config
from sparsealign.train.checkpoint import incomplete_checkpoints, list_checkpoints
from sparsealign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"
COMMON = ("train.save_every=2", "train.max_steps=8", "train.eval_every=0", "train.progress=false")

# Runs the command line; with PAUSE_STEP set, the checkpoint writer stops for good inside the write of
# checkpoints/step-<PAUSE_STEP> (weights written, state.json not yet) after touching PAUSE_MARKER; STEP_SLEEP
# slows each forward so that a kill after a given step lands before the run ends.
DRIVER = """
import os, sys, time
from pathlib import Path
import sparsealign.train.checkpoint as ck
real = ck.save_file
def save_file(tensors, path, *args, **kwargs):
    real(tensors, path, *args, **kwargs)
    if os.environ.get("PAUSE_STEP") and f".step-{os.environ['PAUSE_STEP']}.tmp-" in str(path):
        Path(os.environ["PAUSE_MARKER"]).write_text(str(path))
        time.sleep(600)
ck.save_file = save_file
import sparsealign.train.loop as loop
real_loss = loop.compute_loss
def compute_loss(*args, **kwargs):
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    return real_loss(*args, **kwargs)
loop.compute_loss = compute_loss
from sparsealign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def config(out: Path, *overrides: str):
    base = [f"output_dir={out}", f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}", *COMMON]
    return load_config(SMOKE, base + list(overrides))


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"one training line per step, in order: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def start(out: Path, **env: str) -> subprocess.Popen:
    args = ["train", str(SMOKE), f"output_dir={out}", f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}"]
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args, *COMMON],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("whole") / "run"
    train(config(out))
    found = losses(out)
    assert sorted(found) == list(range(1, 9))
    return found


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, uninterrupted, caplog):
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = start(out, PAUSE_STEP="4", PAUSE_MARKER=str(marker))
    wait_for(proc, marker.exists, "pause inside the step-4 write")
    kill(proc)
    partial = incomplete_checkpoints(out)
    assert [p.name.split(".tmp-")[0] for p in partial] == [".step-4"]
    assert (partial[0] / "trainable.safetensors").is_file() and not (partial[0] / "state.json").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-2"], "the newest complete checkpoint is usable"
    assert (out / ".lock").exists(), "the killed run's lock is left behind"

    caplog.set_level("INFO", logger="sparsealign.train")
    result = train(config(out, "train.resume=auto"))
    assert result.steps == 8
    assert f"ignoring and deleting the incomplete checkpoint {partial[0]}" in caplog.text
    assert (
        "taking over a stale lock" in caplog.text
        and f"resumed from {out / 'checkpoints/step-2'} at step 2" in caplog.text
    )
    assert not partial[0].exists()
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), step


@pytest.mark.parametrize("after_step", [3, 6])
def test_kill_between_checkpoints_resumes_to_the_same_losses(tmp_path, uninterrupted, after_step):
    out = tmp_path / "run"
    proc = start(out, STEP_SLEEP="0.3")
    metrics = out / "metrics.jsonl"
    wait_for(proc, lambda: metrics.is_file() and max(losses(out), default=0) >= after_step, "metrics line")
    kill(proc)
    complete = list_checkpoints(out)
    assert complete, "a checkpoint of step 2 at least"
    resumed_from = int(complete[-1].name.split("-")[1])
    result = train(config(out, "train.resume=auto"))
    assert result.steps == 8 and resumed_from >= 2
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), step


def test_keep_checkpoints_deletes_old_ones_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "run"
    deletions: list[tuple[str, list[str]]] = []

    def rmtree(path, ignore_errors=False):
        deletions.append((Path(path).name, [p.name for p in list_checkpoints(out)]))
        import shutil

        shutil.rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint_module, "shutil", SimpleNamespace(rmtree=rmtree))
    train(config(out, "train.save_every=1", "train.max_steps=4", "train.keep_checkpoints=2"))
    # each deletion happens when the new checkpoint is already complete (listed with its state.json)
    assert deletions == [
        ("step-1", ["step-1", "step-2", "step-3"]),
        ("step-2", ["step-2", "step-3", "step-4"]),
    ]
    assert [p.name for p in list_checkpoints(out)] == ["step-3", "step-4"]
