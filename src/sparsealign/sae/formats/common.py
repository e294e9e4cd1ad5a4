"""Reading and checking helpers shared by the format modules (no format of its own).

Every check raises :class:`~sparsealign.errors.SAEError` naming the file, the key and the shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsealign.errors import SAEError
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder

HOOK_SITES = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out"}
"""TransformerLens hook name (after ``blocks.L.``) → hook site."""

SITE_HOOKS = {site: hook for hook, site in HOOK_SITES.items()}
"""Hook site → TransformerLens hook name."""


def folder_of(path: Path) -> Path:
    """``path`` when it is a folder, else the folder holding the file."""
    return path if path.is_dir() else path.parent


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SAEError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise SAEError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise SAEError(f"cannot read {path} as safetensors: {error}") from error


def tensor(tensors: dict[str, Tensor], key: str, file: Path) -> Tensor:
    """``tensors[key]``, or an error listing the keys the file has."""
    if key not in tensors:
        raise SAEError(f"{file} has no tensor {key!r} (it has: {', '.join(sorted(tensors)) or 'none'})")
    return tensors[key]


def check_shape(value: Tensor, shape: tuple[int, ...], key: str, file: Path, what: str = "") -> None:
    """Refuse a tensor of another shape (saying when it looks transposed)."""
    if tuple(value.shape) != tuple(shape):
        hint = ""
        if len(shape) == 2 and tuple(value.shape) == (shape[1], shape[0]):
            hint = " (it looks transposed)"
        raise SAEError(
            f"{file}: tensor {key!r} has shape {list(value.shape)}, expected {list(shape)}{what}{hint}"
        )


def check_d_in(found: int, expected: int | None, where: str) -> None:
    """Refuse an SAE whose input width is not the model's (``expected``; None: unchecked)."""
    if expected is not None and int(found) != int(expected):
        raise SAEError(
            f"SAE input width mismatch: {where} says d_in={found}, but the model's activations have width "
            f"{expected}; this SAE was trained on another model or site"
        )


def integer(cfg: dict[str, Any], key: str, file: Path) -> int:
    """``cfg[key]`` as an integer."""
    if key not in cfg or cfg[key] is None:
        raise SAEError(f"{file} has no {key!r}")
    try:
        return int(cfg[key])
    except (TypeError, ValueError) as error:
        raise SAEError(f"{file}: {key!r} must be an integer, got {cfg[key]!r}") from error


def parse_hook_name(hook_name: str | None) -> tuple[str | None, int | None]:
    """``blocks.L.hook_resid_post`` → ``("resid_post", L)``; other ``blocks.L.X`` → ``(X, L)``."""
    if not hook_name:
        return None, None
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if not match:
        return None, None
    layer, rest = int(match.group(1)), match.group(2)
    return HOOK_SITES.get(rest, rest), layer


def build_sae(
    *,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    activation: str,
    k: int | None,
    apply_b_dec_to_input: bool,
    threshold: Tensor | None,
    metadata: SAEMetadata,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> SparseAutoencoder:
    """A :class:`SparseAutoencoder` holding these (already shape-checked) tensors, in ``dtype`` (None: the
    stored one) on ``device``."""
    d_in, d_sae = W_enc.shape
    try:
        sae = SparseAutoencoder(
            d_in,
            d_sae,
            activation,
            k=k,
            apply_b_dec_to_input=apply_b_dec_to_input,
            metadata=metadata,
            dtype=dtype or W_enc.dtype,
            device=device,
        )
    except ValueError as error:
        raise SAEError(f"{metadata.source}: {error}") from error
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae
