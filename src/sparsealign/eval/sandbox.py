"""Run untrusted Python programs (model-written code and its tests) one process each, contained.

Each program runs in a fresh ``python -I -B`` (isolated mode: no user site, no ``PYTHON*`` variables, no
bytecode written), in a new session (its own process group), with a throw-away temporary folder as working
directory and as ``HOME``/``TMPDIR``, and a minimal environment (no API keys or tokens of the caller). The
folder is removed afterwards. Layers, outermost first:

1. **Network namespace**: when ``unshare --net`` works on this machine (checked once; root, or user
   namespaces via ``--user --map-root-user``), the child runs in an empty network namespace: no interface
   but a down loopback, so nothing, not even 127.0.0.1, is reachable.
2. **Resource limits** set by the child on itself before the program starts: ``RLIMIT_CPU`` (the timeout,
   rounded up, plus one second: ``SIGXCPU``), ``RLIMIT_AS`` (``memory_mb``: allocations beyond it raise
   ``MemoryError``), ``RLIMIT_FSIZE`` (``file_size_mb`` per file), ``RLIMIT_CORE`` 0 and, when not running as
   root (the kernel does not apply it to root), ``RLIMIT_NPROC`` 0: no new process, and no thread either (a
   program that starts threads fails when not run as root).
3. **Audit-hook guard** (:pep:`578`), installed in the child before the program is compiled: it refuses
   socket creation and use, process creation (``os.fork``/``forkpty``, ``subprocess``, ``os.system``,
   ``os.exec*``, ``os.spawn*``, ``posix_spawn``; ``_posixsubprocess.fork_exec``, which raises no audit event,
   is replaced by a refusal), signals to other processes, raising resource limits, ``ctypes`` (importing it
   from the program's own code, and every ``ctypes`` event: loading a library, looking up a symbol, calling a
   foreign function, raw memory access; libraries such as numpy that import ctypes still load), and any
   change to the file system outside the working folder: ``open`` for writing, ``remove``, ``rename``,
   ``rmdir``, ``mkdir``, ``chmod``, ``chown``, links, ``truncate``, ``utime`` (``/dev/null`` excepted). A refused operation raises ``PermissionError`` and marks the sample failed, even
   if the program catches the error.
4. **Wall clock**: past ``timeout`` seconds the whole process group is killed (``killpg(SIGKILL)``); the
   group is killed after every run in any case, so nothing the program started survives it.

The result comes back as one JSON line on a private copy of the child's stdout, prefixed by a random token
the parent sent on stdin; the program's own stdout and stderr go to ``/dev/null``. Nothing is unpickled.

What is **not** guaranteed: the audit hook runs inside the interpreter it guards, so it is not a security
boundary. A deliberately hostile program (C extensions, interpreter internals, a gap in the guard such as
``os.open(name, flags, dir_fd=fd)``, whose audit event does not carry the folder ``fd``) may get around it,
forge its own result, read any file the user can read, or fill the disk up to ``file_size_mb`` per file
until the timeout. Without ``unshare`` the network layer is only the hook. These layers contain the
mistakes of model-written code (loops, memory bombs, stray writes, forks, sockets); for untrusted or
adversarial code the real boundary is a container or a VM (e.g. a rootless container with
``--network none``, a read-only root and memory/pid limits), with this sandbox inside it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass

__all__ = ["STATUSES", "Limits", "Outcome", "network_isolation", "run_program", "run_programs"]

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "error")
"""``passed``: ran to the end; ``failed``: an exception (a failed assertion, an error in the program, an
operation the sandbox refused, an early ``sys.exit``); ``timeout``: the wall-clock or CPU-time limit;
``memory``: the memory limit (``MemoryError``); ``error``: the program could not run or gave no result
(syntax error, killed by a signal, ``os._exit`` before its tests finished)."""

_REASON_CHARS = 300


@dataclass(frozen=True)
class Limits:
    """The limits of one program: ``timeout`` seconds of wall clock (CPU time: the timeout rounded up, plus
    one second), ``memory_mb`` of address space, ``file_size_mb`` per file written."""

    timeout: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 16

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, not {self.timeout}")
        if self.memory_mb < 64:
            raise ValueError(
                f"memory_mb must be at least 64 (the interpreter needs it), not {self.memory_mb}"
            )
        if self.file_size_mb < 1:
            raise ValueError(f"file_size_mb must be at least 1, not {self.file_size_mb}")

    @property
    def cpu_seconds(self) -> int:
        return int(-(-self.timeout // 1)) + 1


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``status`` (one of :data:`STATUSES`), a short ``reason``, and ``pid`` (its
    process and process-group id, for diagnostics)."""

    status: str
    reason: str
    pid: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _child_main() -> None:  # pragma: no cover - runs in the sandboxed child, see _child_source
    """The child's bootstrap: read the job from stdin, limit itself, hide its stdout, install the guard,
    run the program, write ``<token> <json>`` on the private stdout and leave with ``os._exit``."""
    import json
    import os
    import resource
    import sys
    import traceback

    job = json.loads(sys.stdin.buffer.read())
    token, source, root = job["token"], job["source"], os.path.realpath(job["root"])
    mib = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (job["cpu"], job["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory_mb"] * mib, job["memory_mb"] * mib))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_mb"] * mib, job["file_size_mb"] * mib))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if job["limit_processes"]:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    result_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    refused: list[str] = []

    def refuse(what: str) -> None:
        refused.append(what)
        raise PermissionError(f"refused by the sandbox: {what}")

    import _posixsubprocess

    def no_fork_exec(*args: object) -> None:
        refuse("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = no_fork_exec

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_prefixes = ("socket.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork")
    blocked = frozenset(
        {
            "os.system",
            "os.forkpty",
            "subprocess.Popen",
            "pty.spawn",
            "os.kill",
            "os.killpg",
            "signal.pthread_kill",
            "resource.setrlimit",
            "resource.prlimit",
            "os.startfile",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
        }
    )
    # events that change the file system: (position of a path, position of its dir_fd or None), as in the
    # audit events table of the Python documentation
    path_events = {
        "os.remove": ((0, 1),),
        "os.rmdir": ((0, 1),),
        "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)),  # also os.replace
        "os.chmod": ((0, 2),),  # also fchmod and lchmod
        "os.chown": ((0, 3),),  # also fchown and lchown
        "os.chflags": ((0, None),),
        "os.link": ((0, 2), (1, 3)),  # a hard link to an outside file would be written through
        "os.symlink": ((1, 2),),  # the link itself; writing through it is checked on the resolved path
        "os.truncate": ((0, None),),
        "os.utime": ((0, 3),),
        "os.mkfifo": ((0, 2),),
        "os.mknod": ((0, 3),),
        "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, 1),),
        "sqlite3.connect": ((0, None),),  # SQLite writes its files without an open event
    }

    def inside(path: object, dir_fd: object = None) -> bool:
        """Whether ``path`` (a path, or an open file descriptor) is in the working folder or is /dev/null."""
        if isinstance(path, int):
            try:
                name = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
            if not name.startswith("/"):  # a pipe or another object without a path
                return True
            name = name.removesuffix(" (deleted)")
        else:
            name = os.fsdecode(path)  # type: ignore[arg-type]
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(name):
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        full = os.path.realpath(name)
        return full == root or full.startswith(root + os.sep) or full == os.devnull

    def program_imports(package: str) -> bool:
        """Whether the import of ``package`` (or of a module of it) being audited was asked for by the
        program's own code (or by code it made at run time, ``exec``/``eval``) rather than by a library: the
        first frame outside importlib and outside the package itself is not from a file."""
        own = f"{os.sep}{package}{os.sep}"
        frame = sys._getframe(2)
        while frame is not None and (
            "importlib" in frame.f_code.co_filename or own in frame.f_code.co_filename
        ):
            frame = frame.f_back
        return frame is None or frame.f_code.co_filename.startswith("<")

    def guard(event: str, args: tuple) -> None:
        if event in blocked or event.startswith(blocked_prefixes):
            refuse(event)
        elif event == "import":
            top = args[0].split(".")[0]
            # _posixsubprocess is loaded already: an import event for it is an attempt at a fresh copy
            if top == "_posixsubprocess" or (top in ("ctypes", "_ctypes") and program_imports("ctypes")):
                refuse(f"import {args[0]}")
        elif event.startswith("ctypes.") and (event, args) != ("ctypes.dlopen", (None,)):
            refuse(event)  # (importing ctypes opens the interpreter's own symbols: that alone is allowed)
        elif event == "object.__setattr__" and args[1] == "__code__":
            refuse("replacing a function's code")
        elif event == "open":
            path, mode, flags = args
            writing = (
                (flags & write_flags) if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            )
            if writing and not inside(path):
                refuse(f"writing {path!r} outside the working folder")
        elif event in path_events:
            for position, dir_fd_at in path_events[event]:
                dir_fd = args[dir_fd_at] if dir_fd_at is not None and len(args) > dir_fd_at else None
                if not inside(args[position], dir_fd):
                    refuse(f"{event} {args[position]!r} outside the working folder")

    def finish(status: str, reason: str = "") -> None:
        if status == "passed" and refused:
            status, reason = "failed", f"PermissionError: refused by the sandbox: {refused[0]} (caught)"
        line = token + " " + json.dumps({"status": status, "reason": reason[:300]}) + "\n"
        os.write(result_fd, line.encode())
        os._exit(0)

    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        finish("error", f"{type(error).__name__}: {error}")
    lines = source.splitlines()
    sys.addaudithook(guard)
    namespace = {"__name__": "__program__", "__builtins__": __builtins__}
    status, reason = "passed", ""
    try:
        exec(code, namespace)
    except MemoryError:
        status, reason = "memory", "MemoryError: the memory limit was reached"
    except SystemExit as error:
        status, reason = "failed", f"the program exited (SystemExit: {error.code}) before its tests finished"
    except BaseException as error:  # the program's exception, whatever it is, is the sample's failure
        where = ""
        for frame, number in traceback.walk_tb(error.__traceback__):
            if frame.f_code.co_filename == "<program>" and 0 < number <= len(lines):
                where = f" at line {number}: {lines[number - 1].strip()}"
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        status, reason = "failed", message[:200] + where
    namespace.clear()  # after the except clause: what a memory bomb holds is freed before the result is written
    finish(status, reason)


@functools.cache
def _child_source() -> str:
    """The code the child runs (``python -c``): :func:`_child_main` and its call."""
    return inspect.getsource(_child_main) + "\n_child_main()\n"


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """The ``unshare`` prefix that runs a command without network on this machine (``unshare --net``, or as a
    user without privileges ``unshare --user --map-root-user --net``), or ``()`` when neither works (then only
    the audit hook keeps the program off the network). Checked once per process."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        logger.info("sandbox: `unshare` is not available; network access is refused by the audit hook only")
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--user", "--map-root-user", "--net")):
        try:
            done = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            logger.info("sandbox: programs run without network (%s)", " ".join(prefix[1:]))
            return prefix
    logger.info(
        "sandbox: `unshare --net` is not permitted here; network access is refused by the audit hook only"
    )
    return ()


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group ``pgid`` (gone already: nothing to do)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _run_in_group(
    argv: Sequence[str], *, cwd: str, env: dict[str, str], stdin: bytes, timeout: float
) -> tuple[int | None, bytes, bytes, int]:
    """Run ``argv`` as the leader of a new session and process group; past ``timeout`` seconds (or once it
    has exited) SIGKILL the whole group. Returns ``(returncode or None on timeout, stdout, stderr, pid)``."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
        out = err = b""
    finally:
        # the leader's pid names the group; while any member lives, the kernel does not reuse that number
        _kill_group(proc.pid)
    if returncode is None:
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a process that left the group still holds the pipes
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()
    return returncode, out, err, proc.pid


def _remove_folder(path: str) -> None:
    """Remove the working folder, whatever permissions the program gave its contents."""
    for folder, _, _ in os.walk(path):
        with suppress(OSError):
            os.chmod(folder, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _outcome(returncode: int | None, out: bytes, err: bytes, token: str, limits: Limits, pid: int) -> Outcome:
    """The outcome of a child from its exit status and its result line."""
    if returncode is None:
        return Outcome("timeout", f"killed after the wall-clock limit of {limits.timeout:g} s", pid)
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        if line.startswith(token + " "):
            try:
                result = json.loads(line[len(token) + 1 :])
                status, reason = str(result["status"]), str(result["reason"])
            except (ValueError, KeyError, TypeError):
                break
            if status in STATUSES:
                return Outcome(status, reason[:_REASON_CHARS], pid)
            break
    if returncode == -signal.SIGXCPU:
        return Outcome("timeout", f"killed after the CPU-time limit of {limits.cpu_seconds} s", pid)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Outcome("error", f"killed by {name} before its tests finished", pid)
    last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    detail = f" ({last[0][:200]})" if last[0] else ""
    return Outcome("error", f"exited with status {returncode} without a result{detail}", pid)


def run_program(source: str, limits: Limits | None = None) -> Outcome:
    """Run one program (e.g. a completion followed by its tests) in the sandbox described in this module's
    docstring; ``passed`` when it runs to its end within the limits."""
    limits = limits or Limits()
    root = tempfile.mkdtemp(prefix="sparsealign-sandbox-")
    try:
        token = secrets.token_hex(16)
        job = {
            "token": token,
            "source": source,
            "root": root,
            "cpu": limits.cpu_seconds,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            # decided here: in a user namespace the child's euid is 0 while the kernel still applies the limit
            "limit_processes": os.geteuid() != 0,
        }
        env = {
            "PATH": os.defpath,
            "HOME": root,
            "TMPDIR": root,
            "LANG": "C.UTF-8",
            **{name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        }
        argv = [*network_isolation(), sys.executable, "-I", "-B", "-c", _child_source()]
        returncode, out, err, pid = _run_in_group(
            argv, cwd=root, env=env, stdin=json.dumps(job).encode(), timeout=limits.timeout
        )
        return _outcome(returncode, out, err, token, limits, pid)
    finally:
        _remove_folder(root)


def run_programs(
    sources: Iterable[str],
    limits: Limits | None = None,
    workers: int = 1,
    on_result: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Run each program with :func:`run_program`, ``workers`` at a time (threads, each waiting on its own
    child process); ``on_result(index, outcome)`` is called in this thread as each one finishes. The
    outcomes come back in the order of ``sources``."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    sources = list(sources)
    network_isolation()  # check once, before the threads start
    outcomes: list[Outcome | None] = [None] * len(sources)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(run_program, source, limits): index for index, source in enumerate(sources)}
        for future in as_completed(futures):
            index = futures[future]
            outcomes[index] = future.result()
            if on_result is not None:
                on_result(index, outcomes[index])
    finally:  # on Ctrl-C or an error, start nothing more; what runs ends within its timeout
        pool.shutdown(wait=True, cancel_futures=True)
    return [outcome for outcome in outcomes if outcome is not None]
