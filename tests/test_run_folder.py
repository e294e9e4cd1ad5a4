"""One owner per run folder (the lock, the used-folder refusal, train.overwrite) and SIGTERM saving a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsealign.errors import RunFolderError, UserError
from sparsealign.recipes.load import load_config
from sparsealign.train.checkpoint import list_checkpoints
from sparsealign.train.loop import train
from sparsealign.train.run_folder import RunLock, claim_run_folder, holds_a_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def smoke(tmp_path: Path, *overrides: str):
    base = [
        f"output_dir={tmp_path}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
    ]
    return load_config(SMOKE, base + list(overrides))


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_with_the_holder_named(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    with pytest.raises(RunFolderError, match=f"in use by another run \\(process {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    with pytest.raises(RunFolderError, match="in use by another run"):
        train(smoke(tmp_path, "train.max_steps=1"))
    assert (tmp_path / ".lock").is_file(), "the refused run leaves the holder's lock alone"
    lock.release()
    assert not (tmp_path / ".lock").exists()
    lock.release()  # twice is harmless


def test_a_lock_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(f"{dead_pid()} some-other-host\n")
    with pytest.raises(RunFolderError, match="on some-other-host"):
        RunLock(tmp_path).acquire()


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, caplog):
    pid = dead_pid()
    (tmp_path / ".lock").write_text(f"{pid} {socket.gethostname()}\n")
    result = train(smoke(tmp_path, "train.max_steps=1", "train.eval_every=0"))
    assert result.steps == 1
    assert f"taking over a stale lock of process {pid}" in caplog.text
    assert not (tmp_path / ".lock").exists(), "released at the end of the run"


def test_a_used_folder_is_refused_then_moved_aside_or_resumed(tmp_path, caplog):
    run = tmp_path / "run"
    common = ("train.save_every=2", "train.eval_every=0")
    train(smoke(run, "train.max_steps=2", *common))
    assert holds_a_run(run) and not (run / ".lock").exists()
    with pytest.raises(
        RunFolderError, match=r"already holds a run .* train\.resume=auto, .* train\.overwrite=true"
    ):
        train(smoke(run, "train.max_steps=2", *common))
    assert not (run / ".lock").exists(), "released after the refusal"
    with pytest.raises(RunFolderError, match="contradict"):
        claim_run_folder(run, "auto", True)

    # resume=auto continues the run in place
    resumed = train(smoke(run, "train.max_steps=4", *common, "train.resume=auto"))
    assert resumed.steps == 4
    assert [p.name for p in list_checkpoints(run)] == ["step-2", "step-4"]

    # overwrite=true moves the old run aside (named in the log) and starts afresh
    before = json.loads((run / "checkpoints/step-4/state.json").read_text())
    fresh = train(smoke(run, "train.max_steps=1", *common, "train.overwrite=true"))
    assert fresh.steps == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1
    assert f"moved the previous run in {run} to {aside[0]}" in caplog.text
    assert json.loads((aside[0] / "checkpoints/step-4/state.json").read_text()) == before
    assert [p.name for p in list_checkpoints(run)] == ["step-1"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 1]


def test_a_folder_with_only_a_config_is_not_a_run(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    assert not holds_a_run(tmp_path)
    claim_run_folder(tmp_path, None, False).release()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsealign.cli", *args],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=300,
    )


def test_output_dir_naming_a_file_is_one_clear_line(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    with pytest.raises(UserError, match="is a file"):
        train(smoke(target, "train.max_steps=1"))
    proc = _cli("train", str(SMOKE), f"output_dir={target}", "train.max_steps=1", "train.progress=false")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: output_dir={target} is a file, not a folder. Choose another output_dir." in proc.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        str(SMOKE),
        f"output_dir={run}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.max_steps=100000",
        "train.save_every=0",
        "train.eval_every=0",
        "train.progress=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsealign.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=OFFLINE,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no metrics line in time"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted by SIGTERM at step" in err
    assert "Continue with train.resume=auto" in err
    saved = list_checkpoints(run)
    assert len(saved) == 1
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert step >= 1 and saved[0].name == f"step-{step}"
    assert not (run / "final").exists()
    assert not (run / ".lock").exists()
