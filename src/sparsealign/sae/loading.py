"""``load_sae``: an SAE from a local file or folder, or a hub id, in any registered format.

The format is detected from the files present (:mod:`sparsealign.sae.formats`: SAELens 6.x and flat,
Gemma Scope ``params.npz``, EleutherAI sparsify, and any format registered later). Loading only reads
files: a built-in SAE name is resolved to its cached folder first, by
:func:`sparsealign.sae.builtins.resolve_builtin_sae` (or :func:`~sparsealign.sae.builtins.ensure_builtin_sae`,
which trains it when asked to).

Hub ids: a string that is not an existing path (``owner/repo`` or ``owner/repo/sub/folder``) is downloaded
with ``huggingface_hub.snapshot_download`` unless the hub is offline (``HF_HUB_OFFLINE``); offline or on a
failed download, the error says how to download it and pass the local folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsealign.errors import SAEError
from sparsealign.hub import hub_offline_flag
from sparsealign.sae.builtins import BUILTIN_SAES
from sparsealign.sae.formats import available_formats, detect_formats
from sparsealign.sae.model import SparseAutoencoder

__all__ = ["load_sae"]


def _hub_offline() -> bool:
    if hub_offline_flag():
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _download(name: str) -> Path:
    """Download ``owner/repo[/subfolder]`` from the hub; returns the local folder of the subfolder."""
    parts = [part for part in name.strip("/").split("/") if part]
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    how = (
        f"download it first (e.g. `huggingface-cli download {repo_id}"
        f"{f' --include {sub!r}/*' if sub else ''} --local-dir DIR`) and pass the local folder"
        f"{f' DIR/{sub}' if sub else ''}"
    )
    if _hub_offline():
        raise SAEError(f"SAE {name!r} is not a local path and the Hugging Face hub is offline; {how}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as error:  # noqa: BLE001 - network, auth, missing repo: all reported the same way
        raise SAEError(f"cannot download SAE {name!r} from the hub ({error}); {how}") from error
    target = Path(local) / sub if sub else Path(local)
    if not target.exists():
        raise SAEError(f"the download of SAE {name!r} has no folder {target}")
    return target


def _looks_like_hub_id(text: str) -> bool:
    if text.startswith(("/", ".", "~")) or "\\" in text or ":" in text:
        return False
    parts = text.strip("/").split("/")
    return len(parts) >= 2 and all(parts)


def _local(path: str | Path) -> Path:
    """The existing file or folder that ``path`` names, downloading a hub id."""
    target = Path(path).expanduser()
    if target.exists():
        return target
    text = str(path)
    if _looks_like_hub_id(text):
        return _download(text)
    if text in BUILTIN_SAES:
        raise SAEError(
            f"{text!r} is a built-in SAE name, not a path: load_sae reads files only; pass "
            f"sparsealign.sae.builtins.resolve_builtin_sae({text!r}) (its cached folder, built by "
            f"`sparsealign sae train --builtin {text}`)"
        )
    raise SAEError(f"SAE path {text!r} does not exist")


def _unrecognised(target: Path) -> SAEError:
    expected = "; ".join(f"{fmt.expected} ({fmt.name})" for fmt in available_formats())
    if target.is_file():
        return SAEError(f"{target} is not a known SAE file (expected {expected}, or the folder holding them)")
    contents = sorted(child.name + ("/" if child.is_dir() else "") for child in target.iterdir())
    shown = ", ".join(contents[:12]) + (" ..." if len(contents) > 12 else "")
    return SAEError(f"{target} is not an SAE folder: expected {expected}; it has: {shown or 'nothing'}")


def load_sae(
    path: str | Path,
    d_in: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SparseAutoencoder:
    """Load a pretrained SAE from a local folder or file, or a hub id (format detected from the files).

    ``path``: an SAE folder (SAELens, sparsify hookpoint folder, or a Gemma Scope ``average_l0_N`` folder),
    one of its files (``cfg.json``, ``sae_weights.safetensors``, ``sae.safetensors``, ``params.npz``), or a
    hub id (downloaded unless offline). ``d_in``: the expected input width (the model's hidden size); a
    different SAE width raises :class:`SAEError`. ``dtype``: the parameters' dtype (default: as stored);
    ``device``: where to put them (default CPU). Returns an unfrozen SAE; call ``.freeze()`` for training.
    """
    target = _local(path)
    formats = detect_formats(target)
    if not formats:
        raise _unrecognised(target)
    if len(formats) > 1:
        names = ", ".join(fmt.name for fmt in formats)
        raise SAEError(f"{target} matches several SAE formats ({names}); pass the weights file itself")
    return formats[0].load(target, d_in=d_in, dtype=dtype, device=device)
