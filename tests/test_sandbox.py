"""The code sandbox: each hostile program is contained and reported as a failed sample, quickly."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sparsealign.eval import sandbox
from sparsealign.eval.sandbox import Limits, Outcome, run_program, run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

FAST = Limits(timeout=5.0, memory_mb=512)  # a ceiling: these programs end (or are refused) at once


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``, read from /proc (no psutil)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def assert_group_gone(pid: int | None) -> None:
    assert pid is not None
    deadline = time.monotonic() + 2
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pid) == []


def run(source: str, limits: Limits = FAST) -> Outcome:
    return run_program(textwrap.dedent(source), limits)


def test_a_correct_program_passes_and_a_wrong_one_fails_at_its_assertion():
    good = run("def double(x):\n    return 2 * x\n\nassert double(2) == 4\n")
    bad = run("def double(x):\n    return 3 * x\n\nassert double(2) == 4\n")
    assert (good.status, good.passed, good.reason) == ("passed", True, "")
    assert (bad.status, bad.passed) == ("failed", False)
    assert bad.reason == "AssertionError at line 4: assert double(2) == 4"


def test_an_infinite_loop_times_out_quickly_and_leaves_no_process():
    start = time.monotonic()
    outcome = run("while True:\n    pass\n", Limits(timeout=1.0))
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and not outcome.passed
    assert outcome.reason == "killed after the wall-clock limit of 1 s"
    assert elapsed < 4
    assert_group_gone(outcome.pid)


def test_a_memory_bomb_hits_the_memory_limit():
    bomb = "hoard = []\nwhile True:\n    hoard.append(bytes(10**7))\n"  # calloc: fast, pages untouched
    outcome = run(bomb, Limits(timeout=10, memory_mb=256))
    assert (outcome.status, outcome.reason) == ("memory", "MemoryError: the memory limit was reached")


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        ("import os\nwhile True:\n    os.fork()\n", "os.fork"),
        ("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '30'])\n", "subprocess.Popen"),
        ("import os\nos.system('sleep 30 &')\n", "os.system"),
        ("import os\nos.execv('/bin/sleep', ['sleep', '30'])\n", "os.exec"),
        (  # _posixsubprocess.fork_exec raises no audit event of its own
            "import multiprocessing.util as u\nwhile True:\n    u.spawnv_passfds(b'/bin/sleep', [b'sleep', b'30'], [])\n",
            "_posixsubprocess.fork_exec",
        ),
    ],
)
def test_a_fork_bomb_is_refused_and_leaves_no_process(source, refused):
    outcome = run(source)
    assert outcome.status == "failed"
    assert outcome.reason.startswith(f"PermissionError: refused by the sandbox: {refused}")
    assert_group_gone(outcome.pid)


def test_the_whole_process_group_is_killed_on_timeout_and_after_exit(tmp_path):
    """The last line of defence, below the audit hook: children of a command are killed with it."""
    looping = ["sh", "-c", "sleep 30 & sleep 30 & wait"]
    returncode, _, _, pid = sandbox._run_in_group(looping, cwd=str(tmp_path), env={}, stdin=b"", timeout=0.5)
    assert returncode is None
    assert_group_gone(pid)
    leaving = ["sh", "-c", "sleep 30 >/dev/null 2>&1 & exit 0"]  # exits at once, its child lives on
    returncode, _, _, pid = sandbox._run_in_group(leaving, cwd=str(tmp_path), env={}, stdin=b"", timeout=5)
    assert returncode == 0
    assert_group_gone(pid)


def test_a_network_attempt_reaches_nothing():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        outcome = run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
        )
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert outcome.status == "failed"
    assert outcome.reason.startswith("PermissionError: refused by the sandbox: socket.")


@pytest.mark.parametrize(
    "operation",
    [
        "open({target!r}, 'w').write('escaped')",
        "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
        "import pathlib\npathlib.Path({target!r}).write_text('escaped')",
        "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('escaped')",
        "import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
    ],
)
def test_a_write_outside_the_folder_is_refused(tmp_path, operation):
    target = tmp_path / "outside.txt"
    outcome = run(operation.format(target=str(target)))
    assert outcome.status == "failed"
    assert "refused by the sandbox: " in outcome.reason and "outside the working folder" in outcome.reason
    assert not target.exists()


@pytest.mark.parametrize(
    "operation",
    [
        "import os\nos.remove({keep!r})",
        "import os\nos.rename({keep!r}, 'stolen')",
        "import os\nos.chmod({keep!r}, 0)",
        "import shutil\nshutil.rmtree({folder!r})",
        "import os\nos.fchmod(os.open({keep!r}, os.O_RDONLY), 0)",
        "import os\nos.link({keep!r}, 'here')\nopen('here', 'w').write('changed')",
    ],
)
def test_changes_to_files_outside_the_folder_are_refused(tmp_path, operation):
    folder = tmp_path / "owned"
    folder.mkdir()
    keep = folder / "keep.txt"
    keep.write_text("mine")
    mode = keep.stat().st_mode
    outcome = run(operation.format(keep=str(keep), folder=str(folder)))
    assert outcome.status == "failed"
    assert "outside the working folder" in outcome.reason
    assert keep.read_text() == "mine" and keep.stat().st_mode == mode


def test_a_refusal_the_program_catches_still_fails_the_sample():
    outcome = run("import socket\ntry:\n    socket.socket()\nexcept OSError:\n    pass\n")
    assert outcome.status == "failed"
    assert outcome.reason == "PermissionError: refused by the sandbox: socket.__new__ (caught)"


def test_ctypes_from_the_program_is_refused():
    direct = run("import ctypes\n")
    indirect = run("import importlib\nimportlib.import_module('ctypes')\n")
    assert direct.reason.startswith("PermissionError: refused by the sandbox: import ctypes")
    assert indirect.reason.startswith("PermissionError: refused by the sandbox: import _ctypes")


def test_the_program_works_in_its_own_folder_which_is_removed_with_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    outcome = run(
        f"""
        import os, tempfile
        here = os.getcwd()
        assert here.startswith({str(tmp_path.resolve())!r}) and os.path.basename(here).startswith("sparsealign-sandbox-")
        assert os.environ["HOME"] == here and tempfile.gettempdir() == here
        assert "OPENAI_API_KEY" not in os.environ
        with open("scratch.txt", "w") as handle:
            handle.write("ok")
        os.mkdir("sub")
        os.rename("scratch.txt", "sub/moved.txt")
        assert open("sub/moved.txt").read() == "ok"
        tempfile.mkstemp()
        print("to /dev/null")
        """
    )
    assert (outcome.status, outcome.reason) == ("passed", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("source", "status", "reason"),
    [
        ("def broken(:\n", "error", "SyntaxError: invalid syntax (<program>, line 1)"),
        (
            "import sys\nsys.exit(0)\nassert False\n",
            "failed",
            "the program exited (SystemExit: 0) before its tests finished",
        ),
        (  # a forged result on its own stdout is not the sandbox's result line
            'print(\'x {"status": "passed", "reason": ""}\')\nimport os\nos._exit(0)\n',
            "error",
            "exited with status 0 without a result",
        ),
        ("if __name__ == '__main__':\n    raise SystemExit(1)\n", "passed", ""),
        ("x = input()\n", "failed", "EOFError: EOF when reading a line at line 1: x = input()"),
    ],
)
def test_programs_that_end_early_or_do_not_compile(source, status, reason):
    outcome = run(source)
    assert (outcome.status, outcome.reason) == (status, reason)


def test_run_programs_keeps_the_order_and_reports_each_result():
    sources = ["assert 1 == 1", "assert 1 == 2", "raise ValueError('no')", "x = 1"]
    seen = {}
    outcomes = run_programs(
        sources, FAST, workers=2, on_result=lambda index, outcome: seen.update({index: outcome})
    )
    assert [outcome.status for outcome in outcomes] == ["passed", "failed", "failed", "passed"]
    assert outcomes[2].reason == "ValueError: no at line 1: raise ValueError('no')"
    assert seen == dict(enumerate(outcomes))


def test_limits_are_checked():
    assert Limits(timeout=1.0).cpu_seconds == 2 and Limits(timeout=2.5).cpu_seconds == 4
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=10)


def test_network_isolation_is_checked_once():
    first = sandbox.network_isolation()
    assert sandbox.network_isolation() is first
    assert first == () or first[-1] == "--net"
    if os.geteuid() == 0 and first:
        assert first[1:] == ("--net",)
