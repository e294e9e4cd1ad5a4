"""Preflight: each refusal is one line (exit 2 on the command line) before any model or data loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparsealign.train.loop as loop
import sparsealign.train.preflight as preflight
from sparsealign.errors import CheckpointError, DataError, ModelError, RunFolderError
from sparsealign.recipes.load import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"
DATA = ROOT / "configs/smoke_pairs.jsonl"


def smoke(out: Path, *overrides: str):
    base = [f"output_dir={out}", f"data.path={DATA}", "train.progress=false", "train.eval_every=0"]
    return load_config(SMOKE, base + list(overrides))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if training gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the preflight refusal")

    monkeypatch.setattr(loop, "load_bundle", refuse)


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(
        {"a": torch.zeros(10, 100), "b": torch.zeros(50, dtype=torch.bfloat16)}, str(folder / "m.safetensors")
    )
    return folder


def test_parameters_and_the_size_estimate_come_from_the_headers(tmp_path):
    folder = model_folder(tmp_path)
    assert preflight.safetensors_parameters(folder) == (1050, 1000 * 4 + 50 * 2)
    cfg = smoke(tmp_path / "run", f"model.name={folder}", "train.max_steps=10", "train.save_every=4")
    assert preflight.checkpoints_written(cfg) == 3  # steps 4, 8 and the last
    assert preflight.estimate_bytes(cfg, folder) == 3 * 1050 * 12 + 4100
    cfg.train.keep_checkpoints = 1
    assert preflight.estimate_bytes(cfg, folder) == 1050 * 12 + 4100


def test_too_little_free_space_is_refused_before_the_model_loads(tmp_path, monkeypatch, nothing_loads):
    folder = model_folder(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(RunFolderError) as caught:
        loop.train(smoke(tmp_path / "run", f"model.name={folder}", "train.max_steps=2", "train.save_every=0"))
    message = str(caught.value)
    assert message.startswith(
        f"Not enough free space for output_dir={tmp_path / 'run'}: the run writes about"
    )
    assert "1 checkpoint(s)" in message and "0.00 GiB free" in message and "\n" not in message
    assert not (tmp_path / "run").exists(), "nothing created"


def test_an_unwritable_output_folder_is_refused(tmp_path, monkeypatch, nothing_loads):
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(RunFolderError, match=f"{tmp_path} is not writable by this user"):
        loop.train(smoke(tmp_path / "new" / "run", "train.max_steps=1"))


def test_a_missing_data_file_and_model_folder_are_one_line(tmp_path, nothing_loads):
    with pytest.raises(DataError, match=r"data.path=.*nope.jsonl does not exist"):
        loop.train(smoke(tmp_path / "a", f"data.path={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(ModelError, match="does not exist"):
        loop.train(smoke(tmp_path / "b", f"model.name={tmp_path / 'no-model'}"))


def test_an_offline_hub_model_fails_fast_on_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sparsealign.cli", "train", str(SMOKE), f"output_dir={tmp_path / 'run'}"]
        + [f"data.path={DATA}", "model.name=someone/not-cached-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Cannot load 'someone/not-cached-model'" in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_with_another_config_lists_the_differences(tmp_path, monkeypatch):
    run = tmp_path / "run"
    loop.train(smoke(run, "train.max_steps=1"))
    monkeypatch.setattr(loop, "load_bundle", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(CheckpointError) as caught:
        loop.train(smoke(run, "train.max_steps=2", "train.resume=auto", "train.lr=0.5", "method.beta=0.2"))
    message = str(caught.value)
    assert "belongs to a different run" in message
    assert "method.beta (checkpoint: 0.1, now: 0.2)" in message
    assert "train.lr (checkpoint: 0.001, now: 0.5)" in message
    assert not (run / ".lock").exists()
