"""Two processes on CPU (gloo), issue 14 item 7: a failure in one process stops both at once and is shown
once; logs, the "Done" summary and every file come from the main process; the logged metrics are the mean
over the processes; FSDP, which accelerate builds only on GPUs, is refused on CPU in one line.

The faults and the recorders are user methods (``method.name=file.py:name``, docs/extending.md) written into
the test's folder: DPO's loss wrapped, nothing added to the product for the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparsealign.cli import main
from sparsealign.errors import TrainingError
from sparsealign.train.distributed import (
    FAILURE_KEY,
    check_engine,
    claim_failure,
    earlier_failure,
    failed_status,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
QUIET = ["train.save_every=0", "train.eval_every=0", "train.progress=false"]

FAULTY = """
import dataclasses
import os

from sparsealign.methods import get_method

MESSAGE = "injected fault in process 1 at step 2"
_DPO = get_method("dpo")
_calls = []


def _loss(out, options):
    _calls.append(1)
    if os.environ.get("RANK") == "1" and len(_calls) == 2:
        raise RuntimeError(MESSAGE)
    return _DPO.loss(out, options)


faulty = dataclasses.replace(_DPO, name="faulty", loss=_loss, trl_loss_type=None)
"""

RECORDING = '''
import atexit
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from sparsealign.methods import get_method

RANK = os.environ.get("RANK", "0")
HERE = Path(__file__).resolve().parent
_DPO = get_method("dpo")
_rows, _writes = [], []
_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")


def _name(path):
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else None


def _audit(event, args):
    """Every path this process opens for writing, creates, renames or deletes."""
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writing and _name(path):
            _writes.append(_name(path))
    elif event in _EVENTS:
        _writes.extend(n for n in map(_name, args[:2] if event == "os.rename" else args[:1]) if n)


sys.addaudithook(_audit)


def _loss(out, options):
    result = _DPO.loss(out, options)
    if torch.is_grad_enabled():  # a training step (evaluation runs without gradients)
        _rows.append({"loss": float(result.loss), "logps/chosen": float(result.metrics["logps/chosen"])})
    return result


@atexit.register
def _dump():
    (HERE / f"rank{RANK}.json").write_text(json.dumps({"steps": _rows, "writes": _writes}))


recording = dataclasses.replace(_DPO, name="recording", loss=_loss, trl_loss_type=None)
'''


def _plugin(folder: Path, source: str, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    return f"method.name={folder / name}.py:{name}"


def _train_nproc2(run: Path, *overrides: str, timeout: int = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sparsealign.cli", "train", "--nproc", "2", "smoke", f"output_dir={run}"]
    return subprocess.run(
        [*command, *QUIET, *overrides], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout
    )


def test_a_failure_in_one_process_stops_both_and_is_shown_once(tmp_path):
    """Process 1 raises at step 2: both processes end within seconds (the launcher's timeout would fail the
    test), the traceback is shown once, nothing of process 0's consequent errors (gloo's closed connection,
    the launcher's SIGTERM) nor a launcher traceback, exit status 1; step 1's metrics line is kept."""
    run = tmp_path / "run"
    done = _train_nproc2(run, _plugin(tmp_path / "plugin", FAULTY, "faulty"), "train.max_steps=4", timeout=50)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert out.count("RuntimeError: injected fault in process 1 at step 2") == 1, out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1, out[-3000:]
    for noise in ("Connection closed", "gloo", "ChildFailedError", "SIGTERM", "[rank", "Done:"):
        assert noise not in out, (noise, out[-3000:])
    assert out.count("read 48 rows") == 1  # the logs of process 0 only
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1] and not (run / "final").exists()


def test_two_processes_log_once_write_from_the_main_process_and_reduce_metrics(tmp_path):
    """A 2-step run: each log line and the "Done" summary appear once; metrics.jsonl has one line per step;
    process 1 opens no file for writing in the run folder (an audit hook records every write, mkdir, rename
    and delete; process 0's record shows the hook sees the run's files); the logged loss and logps/chosen are
    the mean of the two processes' values (4 pairs each)."""
    run, plugin = tmp_path / "run", tmp_path / "plugin"
    done = _train_nproc2(run, _plugin(plugin, RECORDING, "recording"), "train.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Done: 2 steps") == 1 and "[rank" not in done.stderr
    assert done.stderr.count("read 48 rows") == 1 and done.stderr.count("precision fp32") == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/loss" in r] == [2]  # the final evaluation, once
    zero, one = (json.loads((plugin / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert len(zero["steps"]) == len(one["steps"]) == 2
    logged = [r for r in records if "loss" in r]
    for step, (a, b) in enumerate(zip(zero["steps"], one["steps"], strict=True)):
        for name in ("loss", "logps/chosen"):
            assert logged[step][name] == pytest.approx((a[name] + b[name]) / 2, abs=1e-6), (step, name)
        assert a["logps/chosen"] != pytest.approx(b["logps/chosen"], abs=1e-3)  # the processes' data differ
    inside = str(run.resolve())
    assert [p for p in one["writes"] if str(Path(p).resolve()).startswith(inside)] == []
    assert any(p.endswith("metrics.jsonl") for p in zero["writes"])  # the hook sees the main process's writes


def test_fsdp_on_cpu_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """accelerate 1.16 builds FSDP (and DeepSpeed) only on GPU-type devices; CPU processes get MULTI_CPU, plain
    DDP, whatever the config says. `--nproc 2 --accelerate-config fsdp` refuses before any process starts;
    a direct `accelerate launch --config_file fsdp.yaml` is refused by the processes, shown once."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a CPU machine, even on a GPU host
    for config in ("fsdp", "deepspeed-zero2"):
        assert (
            main(
                ["train", "--nproc", "2", "--accelerate-config", config, "smoke", f"output_dir={tmp_path}/a"]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: The accelerate config asks for ")
        assert "only on GPUs" in err and "MULTI_CPU" in err and "--nproc N" in err
    assert not (tmp_path / "a").exists()
    assert main(["train", "--accelerate-config", "fsdp", "smoke"]) == 2
    assert "needs --nproc" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", "--accelerate-config", "nope", "smoke"]) == 2
    assert "ddp, deepspeed-zero2, deepspeed-zero3, fsdp" in capsys.readouterr().err

    fsdp = ROOT / "src/sparsealign/recipes/accelerate/fsdp.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp)]
    launch += ["--num_processes", "2", "-m", "sparsealign.cli", "train", "smoke", f"output_dir={tmp_path}/b"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run([*launch, *QUIET], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode != 0
    assert done.stderr.count("error: The accelerate config asks for FSDP") == 1, done.stderr[-3000:]
    assert "sparsealign/train" not in done.stderr  # no traceback from the processes (accelerate's launcher
    assert not (tmp_path / "b" / "checkpoints").exists()  # prints its own ChildFailedError summary)


def test_check_engine_compares_the_config_with_what_accelerate_set_up():
    check_engine("FSDP", "cuda", {"ACCELERATE_USE_FSDP": "true"})
    check_engine("MULTI_CPU", "cpu", {})
    check_engine("MULTI_CPU", "cpu", {"ACCELERATE_USE_FSDP": "false"})
    with pytest.raises(TrainingError, match="asks for FSDP.*CPU processes.*MULTI_CPU"):
        check_engine("MULTI_CPU", "cpu", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(TrainingError, match="asks for DeepSpeed"):
        check_engine("NO", "cpu", {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_the_first_failure_reports_and_the_others_take_its_status(monkeypatch):
    """The launcher's store (here a local TCPStore standing in for torchrun's agent store) decides who
    reports: the first process to fail; a later one gets the first one's status and prints nothing."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
    for key, value in {**env, "WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    assert earlier_failure() is None
    assert claim_failure(2) is None  # process 1 is first: it reports
    monkeypatch.setenv("RANK", "0")
    assert claim_failure(1) == 2 and earlier_failure() == 2  # process 0 follows quietly, with status 2
    assert store.get(FAILURE_KEY) == b"1:2"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # another launcher: everyone reports
    assert claim_failure(1) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert claim_failure(1) is None and earlier_failure() is None


def test_the_launch_status_is_the_failed_process_s_or_names_the_signal(capsys):
    def failure(exitcode: int, timestamp: int = 5) -> SimpleNamespace:
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp)

    assert failed_status({0: failure(-15), 1: failure(2)}, 2) == 2  # process 0 was SIGTERMed by the launcher
    assert failed_status({0: failure(1), 1: failure(1, 4)}, 2) == 1
    assert capsys.readouterr().err == ""  # the failed process printed its own error
    killed = "error: process 1 of 2 was killed by SIGKILL (out of memory?); the others were stopped.\n"
    assert failed_status({0: failure(-15, 6), 1: failure(-9)}, 2) == 128 + 9
    assert capsys.readouterr().err == killed
    assert failed_status({0: failure(1), 1: failure(-9)}, 2) == 128 + 9  # 0 saw the closed connection
    assert capsys.readouterr().err == killed
    assert failed_status({0: failure(-15, 6), 1: failure(-15)}, 2) == 128 + 15
    assert "process 1 of 2 was killed by SIGTERM;" in capsys.readouterr().err
