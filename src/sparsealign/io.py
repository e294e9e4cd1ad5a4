"""Files and folders written atomically, and the folder where sparsealign keeps what it downloads or builds.

Every file or folder that sparsealign writes for later reading (checkpoints, final models, reference caches,
reward classifiers, prepared data, reports, converted models) goes through :func:`atomic_file` or
:func:`atomic_folder`: the content is written under a hidden temporary name next to its destination, flushed
to disk, and renamed into place, so a reader (or a resumed run after a crash) finds either the complete new
version or the previous one, never a partial file. Before the rename, every file and folder gets the
permissions a plain ``open``/``mkdir`` gives (``0o666``/``0o777`` minus the user's umask; some writers,
safetensors and ``tempfile`` among them, make theirs private), so the result is readable by whoever could
read a file written directly.

Paths that come from configs or data and are joined under an output folder go through :func:`inside`,
which refuses any that would lead outside it.

This module is the lowest layer: it imports nothing from sparsealign but its errors, and nothing heavy.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from sparsealign.errors import UserError

__all__ = ["atomic_file", "atomic_folder", "atomic_write", "cache_root", "inside"]

StrPath = str | os.PathLike[str]


def cache_root() -> Path:
    """Root of sparsealign's download/conversion cache: ``$SPARSEALIGN_CACHE`` or ``~/.cache/sparsealign``."""
    env = os.environ.get("SPARSEALIGN_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/sparsealign").expanduser()


def _sibling(dest: Path, create: Callable[[Path], None]) -> Path:
    """A fresh hidden name next to ``dest``, created by ``create(path)`` (which fails if the name exists)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            create(path)
        except FileExistsError:
            continue
        return path


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _umask() -> int:
    """The process's umask (Python can only read it by setting it: 0o022 for that instant, then back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(path: Path, mask: int) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have given it (writers such as
    safetensors and ``mkdtemp`` make theirs private) and flush a file's content to disk."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        os.chmod(path, 0o777 & ~mask)
        return
    executable = info.st_mode & 0o111
    os.chmod(path, (0o777 if executable else 0o666) & ~mask)
    _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not possible on every platform or file system)."""
    with suppress(OSError):
        _fsync_file(folder)


@contextmanager
def atomic_file(path: StrPath) -> Iterator[Path]:
    """Yield a new empty temporary file next to ``path`` for a writer that takes a file name (safetensors,
    ``torch.save``); when the block succeeds, give it the umask's permissions, flush it to disk and rename
    it over ``path``; on an error, delete it and leave ``path`` as it was. Missing parent folders are
    created."""
    path = Path(path)
    tmp = _sibling(path, _create_file)
    try:
        yield tmp
        _finish(tmp, _umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


@contextmanager
def atomic_write(path: StrPath, mode: str = "w") -> Iterator[IO]:
    """:func:`atomic_file`, opened: yield a handle (``mode`` ``"w"``: UTF-8 text, ``"wb"``: bytes)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_file(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
        yield handle


@contextmanager
def atomic_folder(dest: StrPath) -> Iterator[Path]:
    """Yield a new empty temporary folder next to ``dest`` to write into; when the block succeeds, give
    everything in it the umask's permissions, flush its files to disk and rename it to ``dest``; on an
    error, delete it and leave ``dest`` as it was.

    An existing ``dest`` is replaced with two renames (the old folder moved aside, the new one moved in, the
    old one deleted), so ``dest`` is at every moment either absent, complete and old, or complete and new.
    """
    dest = Path(dest)
    work = _sibling(dest, lambda path: path.mkdir())
    try:
        yield work
        mask = _umask()
        for item in [work, *work.rglob("*")]:
            _finish(item, mask)
        _swap_in(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync_folder(dest.parent)


def _swap_in(work: Path, dest: Path) -> None:
    try:
        os.rename(work, dest)  # ``dest`` absent (or an empty folder): one rename
        return
    except OSError:
        if not dest.exists():
            raise
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(dest, old)
    try:
        os.rename(work, dest)
    except OSError:
        os.rename(old, dest)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _escape_reason(relative: str, nested: bool) -> str | None:
    """Why ``relative`` cannot be joined under a folder as it is (None when it can, symbolic links aside)."""
    if not relative:
        return "is empty"
    if "\0" in relative:
        return "contains a NUL character"
    if "\\" in relative:
        return "contains a backslash (a path separator on Windows)"
    if relative.startswith("/"):
        return "is an absolute path"
    if not nested and "/" in relative:
        return "contains a path separator ('/')"
    if ".." in relative.split("/"):
        return "has a '..' component"
    return None


def inside(
    root: StrPath,
    relative: StrPath,
    what: str,
    *,
    nested: bool = False,
    error: type[UserError] = UserError,
) -> Path:
    """``root / relative``, for a name or relative path that comes from a config value or from data (a cell
    name, a method name, a cache key): refused with ``error`` (one line naming ``what``) when the result could
    lead outside ``root``.

    ``relative`` must be a plain name (no ``/``), or with ``nested=True`` a relative path of plain names. It
    may not be empty, absolute, contain ``..``, a backslash or NUL, nor lead through an existing symbolic
    link (inside ``root``) to a place outside it. ``root`` itself is not checked: it is the destination the
    user chose. The path returned is the plain join (not resolved), so messages show what the user gave.
    """
    text = os.fspath(relative)
    reason = _escape_reason(text, nested)
    path = Path(root) / text
    if reason is None:
        try:
            base, resolved = Path(root).resolve(), path.resolve()
        except (OSError, RuntimeError):  # a loop of symbolic links
            reason = "cannot be resolved (a loop of symbolic links)"
        else:
            if resolved == base:
                reason = "names the folder itself"
            elif base not in resolved.parents:
                reason = f"leads through a symbolic link to {resolved}"
    if reason is not None:
        kind = "a relative path of plain names" if nested else "a plain file name"
        raise error(f"{what} {text!r} {reason}: give {kind}, for a place inside {root}.")
    return path
