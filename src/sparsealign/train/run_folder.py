"""One owner per run folder: the ``output_dir/.lock`` file, and what a fresh run does with an old run's files.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on local file systems) and holds the owner's
``pid host``. A second run on the same folder is refused with the holder named; a lock left by a process
that no longer exists on this host (``os.kill(pid, 0)`` fails) is taken over with a note. A lock from
another host is never taken over: only its owner or the user can tell whether that run is alive.

A folder "holds a run" when it has ``metrics.jsonl``, ``final/`` or a ``checkpoints/step-N`` folder. A fresh
run (``train.resume`` unset) refuses such a folder unless ``train.overwrite=true``, which moves the old run's
files aside to a sibling ``<output_dir>.old-<UTC time>`` (nothing is deleted).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from sparsealign.errors import RunFolderError

logger = logging.getLogger("sparsealign.train")

LOCK_NAME = ".lock"
RESULT_NAMES = ("metrics.jsonl", "final", "checkpoints")


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that names a file (or anything but a folder) with one clear line."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"output_dir={output_dir} is a file, not a folder. Choose another output_dir.")


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (and its parents) or refuse with one clear line when that is impossible."""
    check_output_dir(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"Cannot create output_dir={output_dir}: {error.strerror or error}. Choose another output_dir."
        ) from None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The ``.lock`` of a run folder, held by this process from :meth:`acquire` until :meth:`release`."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True

    def _holder(self) -> tuple[int | None, str]:
        """The lock's ``(pid, host)``; ``(None, text)`` for a lock that cannot be read or parsed."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None, ""
        pid, _, host = text.partition(" ")
        return (int(pid), host) if pid.isdigit() else (None, text)

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderError` naming the run that holds it."""
        for _ in range(3):  # a lock released or taken over between our checks: look again
            if self._create():
                self.held = True
                return self
            pid, host = self._holder()
            if pid is None and not self.path.exists():
                continue
            if pid is not None and host == socket.gethostname() and not _alive(pid):
                logger.warning(
                    "%s: taking over a stale lock of process %d on %s, which no longer runs.",
                    self.path,
                    pid,
                    host,
                )
                self.path.unlink(missing_ok=True)
                continue
            holder = f"process {pid} on {host}" if pid is not None else f"an unreadable lock ({host!r})"
            raise RunFolderError(
                f"{self.path.parent} is in use by another run ({holder}). Wait for it to finish, use another "
                f"output_dir, or delete {self.path} if that run is gone."
            )
        raise RunFolderError(f"Could not take the lock {self.path}; another run keeps taking it.")

    def release(self) -> None:
        """Remove the lock if this process holds it (safe to call more than once)."""
        if self.held:
            self.held = False
            pid, _ = self._holder()
            if pid == os.getpid():
                self.path.unlink(missing_ok=True)


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` has another run's results: metrics, ``final/`` or any ``checkpoints/step-N``."""
    if (folder / "metrics.jsonl").exists() or (folder / "final").exists():
        return True
    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())


def move_aside(folder: Path) -> Path:
    """Move every entry of ``folder`` but the lock to a new sibling ``<folder>.old-<UTC time>``; return it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    aside.mkdir()
    for entry in folder.iterdir():
        if entry.name != LOCK_NAME:
            entry.rename(aside / entry.name)
    return aside


def claim_run_folder(folder: Path, resume: str | None, overwrite: bool) -> RunLock:
    """Create and lock ``folder`` for a run; refuse one holding another run's results unless the run resumes
    (``resume`` set) or ``overwrite`` moves them aside. Returns the held lock (release it when done)."""
    if overwrite and resume is not None:
        raise RunFolderError(
            f"train.overwrite=true and train.resume={resume} contradict each other: choose one."
        )
    prepare_output_dir(folder)
    lock = RunLock(folder).acquire()
    try:
        if resume is None and holds_a_run(folder):
            if not overwrite:
                raise RunFolderError(
                    f"{folder} already holds a run (metrics, checkpoints or final/). Continue it with "
                    "train.resume=auto, move it aside with train.overwrite=true, or use another output_dir."
                )
            aside = move_aside(folder)
            logger.warning("train.overwrite=true: moved the previous run in %s to %s", folder, aside)
    except BaseException:
        lock.release()
        raise
    return lock
