"""Gemma Scope ``params.npz`` files (spec ``fpo.md`` §6.2).

Arrays ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold`` (lowercase ``w_*`` accepted); JumpReLU, no
``b_dec`` subtraction. Layer, width and L0 come from the path ``layer_L/width_W/average_l0_N`` (width
``16k`` = 16384 is checked against the arrays), the site and model from a
``gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}`` component when the path has one. Embedding SAEs are
refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsealign.errors import SAEError
from sparsealign.sae.formats import SAEFormat, register_format
from sparsealign.sae.formats.common import SITE_HOOKS, build_sae, check_d_in, check_shape, tensor
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder

PARAMS = "params.npz"

_REPO = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)")
_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn.hook_z"}


def _parse_width(text: str) -> int:
    """``16k`` → 16384, ``1m`` → 1048576, ``16`` → 16."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", text.lower())
    if not match:
        raise SAEError(f"cannot parse the Gemma Scope width {text!r} (expected e.g. 16k, 1m)")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2)]
    return int(round(float(match.group(1)) * scale))


def parse_gemma_scope_path(path: str | Path) -> dict[str, Any]:
    """Metadata from a Gemma Scope path: ``layer``, ``width`` (d_sae), ``average_l0``, ``site``, ``model_name``.

    Keys are absent where the path does not say (e.g. no ``gemma-scope-…`` repo component → no site/model).
    """
    text = Path(path).as_posix()
    info: dict[str, Any] = {}
    match = re.search(r"(?:^|/)layer_(\d+)/width_([^/]+)/average_l0_(\d+(?:\.\d+)?)(?:/|$)", text)
    if match:
        info["layer"] = int(match.group(1))
        info["width"] = _parse_width(match.group(2))
        info["average_l0"] = float(match.group(3))
    else:
        layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", text)
        if layer:
            info["layer"] = int(layer.group(1))
        width = re.search(r"(?:^|/)width_([^/]+)(?:/|$)", text)
        if width:
            info["width"] = _parse_width(width.group(1))
    repo = _REPO.search(text)
    if repo:
        size, variant, site = repo.groups()
        info["site"] = _SITES[site]
        info["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    return info


def detect(path: Path) -> bool:
    """A ``.npz`` file, or a folder holding ``params.npz``."""
    return path.suffix == ".npz" if path.is_file() else (path / PARAMS).is_file()


def load(
    path: Path,
    *,
    d_in: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> SparseAutoencoder:
    """The JumpReLU SAE of the ``params.npz`` at ``path`` (or in the folder ``path``)."""
    file = path if path.is_file() else path / PARAMS
    if "embedding" in file.parts:
        raise SAEError(f"{file}: Gemma Scope embedding SAEs are not supported (only layer SAEs)")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise SAEError(f"cannot read {file} as a numpy .npz archive: {error}") from error
    tensors = {
        ("W" + key[1:] if key.startswith("w_") else key): torch.from_numpy(value)
        for key, value in arrays.items()
    }
    W_enc = tensor(tensors, "W_enc", file)
    if W_enc.dim() != 2:
        raise SAEError(f"{file}: tensor 'W_enc' must be 2-D [d_in, d_sae], got shape {list(W_enc.shape)}")
    found_d_in, d_sae = W_enc.shape
    info = parse_gemma_scope_path(file)
    if "width" in info and info["width"] != d_sae:
        raise SAEError(
            f"{file}: tensor 'W_enc' has shape {list(W_enc.shape)}, but the path says width "
            f"{info['width']} (d_sae); the file does not match its folder"
        )
    check_d_in(found_d_in, d_in, f"{file} (W_enc shape {list(W_enc.shape)})")
    what = f" (d_in={found_d_in}, d_sae={d_sae} from W_enc)"
    b_enc = tensor(tensors, "b_enc", file)
    W_dec = tensor(tensors, "W_dec", file)
    b_dec = tensor(tensors, "b_dec", file)
    threshold = tensor(tensors, "threshold", file)
    check_shape(b_enc, (d_sae,), "b_enc", file, what)
    check_shape(W_dec, (d_sae, found_d_in), "W_dec", file, what)
    check_shape(b_dec, (found_d_in,), "b_dec", file, what)
    check_shape(threshold, (d_sae,), "threshold", file, what)
    layer = info.get("layer")
    site = info.get("site")
    hook_name = f"blocks.{layer}.{SITE_HOOKS.get(site, site)}" if site and layer is not None else None
    metadata = SAEMetadata(
        site=site,
        layer=layer,
        model_name=info.get("model_name"),
        hook_name=hook_name,
        format="gemma_scope",
        source=str(file),
        average_l0=info.get("average_l0"),
    )
    return build_sae(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        activation="jumprelu",
        k=None,
        apply_b_dec_to_input=False,
        threshold=threshold,
        metadata=metadata,
        dtype=dtype,
        device=device,
    )


FORMAT = register_format(SAEFormat("gemma_scope", PARAMS, detect, load))

__all__ = ["FORMAT", "parse_gemma_scope_path"]
