"""EleutherAI sparsify hookpoint folders (``cfg.json`` + ``sae.safetensors``; spec ``fpo.md`` §6.3).

``encoder.weight [num_latents, d_in]`` (``nn.Linear`` layout: ``W_enc = encoder.weightᵀ``), ``encoder.bias``,
``W_dec [num_latents, d_in]``, ``b_dec``; TopK with ``k`` from ``cfg.json``; ``apply_b_dec_to_input = not
transcode``; ``num_latents`` 0 or missing ⇒ ``d_in · expansion_factor``; ``d_in`` from ``cfg.json`` or
``b_dec``. A folder named ``layers.L`` → ``resid_post`` of layer L, ``layers.L.mlp`` → ``mlp_out``; the
model name from the repository's ``config.json`` one level up. Skip connections, signed and non-TopK
activations are refused. A repository folder holding one SAE per hookpoint is recognised and refused with
the list of its hookpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sparsealign.errors import SAEError
from sparsealign.sae.formats import SAEFormat, register_format
from sparsealign.sae.formats.common import (
    build_sae,
    check_d_in,
    check_shape,
    folder_of,
    integer,
    read_json,
    read_safetensors,
    tensor,
)
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"

_CFG_KEYS = ("expansion_factor", "num_latents")
"""Keys that mark a ``cfg.json`` as sparsify's."""


def _is_hookpoint(folder: Path) -> bool:
    """Whether ``folder`` holds sparsify weights or a sparsify ``cfg.json``."""
    if (folder / WEIGHTS).is_file():
        return True
    return (folder / CFG).is_file() and any(key in read_json(folder / CFG) for key in _CFG_KEYS)


def _hookpoints(folder: Path) -> list[str]:
    return sorted(child.name for child in folder.iterdir() if child.is_dir() and _is_hookpoint(child))


def detect(path: Path) -> bool:
    """A hookpoint folder (or its ``cfg.json`` / weights), a sparsify ``cfg.json`` alone, or a repository
    folder of hookpoints (refused by :func:`load` with their names)."""
    if path.is_file():
        return path.name in (CFG, WEIGHTS) and _is_hookpoint(path.parent)
    return _is_hookpoint(path) or bool(_hookpoints(path))


def _hookpoint(name: str) -> tuple[str | None, int | None]:
    """``layers.10`` / ``layer_10`` → resid_post 10; ``layers.10.mlp`` → mlp_out 10; else unknown."""
    match = re.fullmatch(r"(?:.*\.)?layers?[._](\d+)(\.mlp)?", name)
    if not match:
        return None, None
    return ("mlp_out" if match.group(2) else "resid_post"), int(match.group(1))


def load(
    path: Path,
    *,
    d_in: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> SparseAutoencoder:
    """The TopK SAE of the sparsify hookpoint folder at (or holding) ``path``."""
    folder = folder_of(path)
    cfg_file, weights_file = folder / CFG, folder / WEIGHTS
    if not cfg_file.is_file():
        hookpoints = _hookpoints(folder)
        if hookpoints:
            raise SAEError(
                f"{folder} holds one SAE per hookpoint ({', '.join(hookpoints[:8])}); "
                "pass one hookpoint folder"
            )
        raise SAEError(f"{folder} has {WEIGHTS} but no {CFG} (sparsify)")
    if not weights_file.is_file():
        raise SAEError(f"{folder} has a sparsify {CFG} but no weights file {WEIGHTS}")
    cfg = read_json(cfg_file)
    activation = str(cfg.get("activation", "topk")).lower()
    if activation != "topk":
        raise SAEError(f"{cfg_file}: sparsify activation {activation!r} is not supported (topk only)")
    for flag in ("skip_connection", "signed"):
        if cfg.get(flag):
            raise SAEError(f"{cfg_file}: {flag}=true is not supported")
    tensors = read_safetensors(weights_file)
    if "W_skip" in tensors:
        raise SAEError(f"{weights_file} holds 'W_skip': skip connections are not supported")
    encoder_weight = tensor(tensors, "encoder.weight", weights_file)
    encoder_bias = tensor(tensors, "encoder.bias", weights_file)
    W_dec = tensor(tensors, "W_dec", weights_file)
    b_dec = tensor(tensors, "b_dec", weights_file)
    if cfg.get("d_in") is not None:
        cfg_d_in = integer(cfg, "d_in", cfg_file)
        source = str(cfg_file)
    else:
        if b_dec.dim() != 1:
            raise SAEError(f"{weights_file}: tensor 'b_dec' must be 1-D [d_in], got {list(b_dec.shape)}")
        cfg_d_in = int(b_dec.shape[0])
        source = f"{weights_file} (b_dec; {CFG} has no d_in)"
    check_d_in(cfg_d_in, d_in, source)
    num_latents = int(cfg.get("num_latents") or 0)
    if num_latents <= 0:
        num_latents = cfg_d_in * int(cfg.get("expansion_factor", 32))
    k = int(cfg.get("k", 32))
    what = f" (d_in={cfg_d_in}, num_latents={num_latents} from {CFG})"
    check_shape(encoder_weight, (num_latents, cfg_d_in), "encoder.weight", weights_file, what)
    check_shape(encoder_bias, (num_latents,), "encoder.bias", weights_file, what)
    check_shape(W_dec, (num_latents, cfg_d_in), "W_dec", weights_file, what)
    check_shape(b_dec, (cfg_d_in,), "b_dec", weights_file, what)
    site, layer = _hookpoint(folder.name)
    model_name = None
    repo_config = folder.parent / "config.json"
    if repo_config.is_file():
        try:
            model_name = json.loads(repo_config.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError):
            model_name = None
    metadata = SAEMetadata(
        site=site,
        layer=layer,
        model_name=model_name,
        hook_name=folder.name,
        format="sparsify",
        source=str(folder),
        average_l0=float(k),
    )
    return build_sae(
        W_enc=encoder_weight.T,
        b_enc=encoder_bias,
        W_dec=W_dec,
        b_dec=b_dec,
        activation="topk",
        k=k,
        apply_b_dec_to_input=not bool(cfg.get("transcode", False)),
        threshold=None,
        metadata=metadata,
        dtype=dtype,
        device=device,
    )


FORMAT = register_format(SAEFormat("sparsify", f"{CFG} + {WEIGHTS}", detect, load))

__all__ = ["FORMAT"]
