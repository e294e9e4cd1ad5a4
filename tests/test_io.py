"""The one atomic write (files and folders), the cache root and the hub probe."""

from __future__ import annotations

import http.server
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sparsealign import hub
from sparsealign.io import atomic_file, atomic_folder, atomic_write, cache_root


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# Files.


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path: Path, mask: int, expected: int) -> None:
    path = tmp_path / "sub" / "out.json"  # missing parents are created
    with umask(mask), atomic_write(path) as handle:
        handle.write("héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    assert mode(path) == expected
    assert leftovers(path.parent) == []


def test_atomic_write_replaces_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    with atomic_write(path, "wb") as handle:
        handle.write(b"\x00\x01old")
    with atomic_write(path, "wb") as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path, "wb") as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"new"
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_write(path, "a"):
        pass


def test_atomic_file_for_writers_that_take_a_name(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path / "t.safetensors"
    with umask(0o022), atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.safetensors.tmp-") and tmp.exists()
        assert not path.exists()  # nothing visible until the block ends
        save_file({"x": torch.arange(3.0)}, str(tmp))  # safetensors writes its files with mode 0o600
    assert torch.equal(load_file(str(path))["x"], torch.arange(3.0)) and mode(path) == 0o644
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"abc")
    assert path.read_bytes() == b"abc"
    with pytest.raises(KeyError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyError("x")
    assert path.read_bytes() == b"abc"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Folders.


@pytest.mark.parametrize(("mask", "folders", "files"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_atomic_folder_honours_the_umask(tmp_path: Path, mask: int, folders: int, files: int) -> None:
    dest = tmp_path / "run" / "final"
    with umask(mask), atomic_folder(dest) as work:
        assert work.parent == dest.parent and work.name.startswith(".final.tmp-")
        assert not dest.exists()
        private = Path(tempfile.mkdtemp(dir=work))  # 0o700, as tempfile makes them
        (private / "a.txt").write_text("a")
        (private / "a.txt").chmod(0o600)
        (work / "run.sh").write_text("#!/bin/sh\n")
        (work / "run.sh").chmod(0o700)
    inner = dest / private.name
    assert (inner / "a.txt").read_text() == "a"
    assert (mode(dest), mode(inner), mode(inner / "a.txt")) == (folders, folders, files)
    assert mode(dest / "run.sh") == folders  # an executable stays executable
    assert leftovers(dest.parent) == []


def test_atomic_folder_replaces_a_folder_whole(tmp_path: Path) -> None:
    dest = tmp_path / "step-2"
    with atomic_folder(dest) as work:
        (work / "old.txt").write_text("old")
        (work / "kept-name.txt").write_text("1")
    with atomic_folder(dest) as work:
        (work / "kept-name.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["kept-name.txt"]
    assert (dest / "kept-name.txt").read_text() == "2"
    assert leftovers(tmp_path) == []


def test_atomic_folder_error_leaves_the_old_folder(tmp_path: Path) -> None:
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "model.safetensors").write_text("good")
    with pytest.raises(OSError, match="disk full"), atomic_folder(dest) as work:
        (work / "model.safetensors").write_text("half")
        raise OSError("disk full")
    assert [p.name for p in dest.iterdir()] == ["model.safetensors"]
    assert (dest / "model.safetensors").read_text() == "good"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Cache root and hub.


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("SPARSEALIGN_CACHE", "~/x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / "x"
    monkeypatch.delenv("SPARSEALIGN_CACHE")
    assert cache_root() == tmp_path / ".cache" / "sparsealign"


@pytest.mark.parametrize(
    ("env", "offline"),
    [({}, False), ({"HF_HUB_OFFLINE": "1"}, True), ({"TRANSFORMERS_OFFLINE": " True "}, True),
     ({"HF_HUB_OFFLINE": "0"}, False)],
)  # fmt: skip
def test_hub_offline_flag(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], offline: bool) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert hub.hub_offline_flag() is offline


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_hub_reachable_probes_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    hub._probe.cache_clear()
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
        assert hub.hub_reachable(timeout=5)  # an answer, even a 404, means the hub is there
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens there
    assert not hub.hub_reachable(timeout=5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._probe.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", "http://unused.invalid")
    assert not hub.hub_reachable() and hub._probe.cache_info().currsize == 0  # no probe when switched off
    hub._probe.cache_clear()
