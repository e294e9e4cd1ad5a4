"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), read in the 6.x and the older flat layout,
written in the 6.x layout (spec ``fpo.md`` §6.1).

Tensors ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` (+ ``threshold`` for JumpReLU;
a training checkpoint's ``log_threshold`` is exponentiated). ``cfg.json`` is either the 6.x layout
(``architecture``, ``d_in``, ``d_sae``, ``apply_b_dec_to_input``, ``k`` at the top level, model and hook in
a nested ``metadata`` object) or the older flat layout (``hook_name``/``hook_point``, ``hook_layer``,
``activation_fn_str``/``activation_fn`` + ``activation_fn_kwargs``). Architecture ``standard`` → ReLU (or
TopK when the legacy activation is ``topk``), ``jumprelu``, ``topk``; a missing ``apply_b_dec_to_input``
defaults to True (SAELens' own default). Hook ``blocks.L.hook_resid_post`` → site ``resid_post``, layer L;
``blocks.L.hook_mlp_out`` → ``mlp_out``. Gated SAEs, activation normalisation, a ``scaling_factor`` other
than ones and decoder-norm rescaling are refused rather than silently mis-encoded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsealign.errors import SAEError
from sparsealign.io import atomic_file, atomic_write
from sparsealign.sae.formats import SAEFormat, register_format
from sparsealign.sae.formats.common import (
    SITE_HOOKS,
    build_sae,
    check_d_in,
    check_shape,
    folder_of,
    integer,
    parse_hook_name,
    read_json,
    read_safetensors,
    tensor,
)
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"

SAVED_SAE_LENS_VERSION = "6.0.0"
"""Written into ``metadata.sae_lens_version`` by :func:`save_saelens` (marks the 6.x layout)."""

_CFG_KEYS = ("d_sae", "metadata", "hook_name", "hook_point")
"""Keys that mark a ``cfg.json`` as SAELens' (sparsify's has none of them)."""


def detect(path: Path) -> bool:
    """A folder (or its ``cfg.json`` / weights file) with SAELens weights, or a SAELens ``cfg.json``."""
    if path.is_file() and path.name not in (CFG, WEIGHTS):
        return False
    folder = folder_of(path)
    if (folder / WEIGHTS).is_file():
        return True
    return (folder / CFG).is_file() and any(key in read_json(folder / CFG) for key in _CFG_KEYS)


def _activation(cfg_file: Path, get: Any, cfg: dict[str, Any]) -> tuple[str, int | None]:
    """``(activation, k)`` from the architecture (6.x) or the activation function (flat layout)."""
    architecture = str(get("architecture") or "standard").lower()
    act_fn = get("activation_fn_str", get("activation_fn"))
    act_fn = str(act_fn).lower() if isinstance(act_fn, str) else None
    kwargs = get("activation_fn_kwargs") or {}
    if architecture == "jumprelu":
        return "jumprelu", None
    if architecture == "topk" or (architecture == "standard" and act_fn == "topk"):
        raw_k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if raw_k is None:
            raise SAEError(f"{cfg_file}: a topk SAE needs 'k' (or activation_fn_kwargs.k)")
        if get("rescale_acts_by_decoder_norm"):
            raise SAEError(f"{cfg_file}: rescale_acts_by_decoder_norm=true is not supported")
        return "topk", int(raw_k)
    if architecture == "standard":
        if act_fn not in (None, "relu"):
            raise SAEError(f"{cfg_file}: activation function {act_fn!r} is not supported (relu or topk)")
        return "relu", None
    raise SAEError(
        f"{cfg_file}: SAE architecture {architecture!r} is not supported (standard, jumprelu, topk)"
    )


def load(
    path: Path,
    *,
    d_in: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> SparseAutoencoder:
    """The SAE of the SAELens folder at (or holding) ``path``."""
    folder = folder_of(path)
    cfg_file, weights_file = folder / CFG, folder / WEIGHTS
    if not cfg_file.is_file():
        raise SAEError(f"{folder} has {WEIGHTS} but no {CFG} (SAELens)")
    if not weights_file.is_file():
        raise SAEError(f"{folder} has a SAELens {CFG} but no {WEIGHTS}")
    cfg = read_json(cfg_file)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def get(key: str, default: Any = None) -> Any:
        """Top level first (6.x architecture keys, legacy everything), then ``metadata`` (6.x)."""
        if cfg.get(key) is not None:
            return cfg[key]
        return meta.get(key, default)

    cfg_d_in = integer(cfg, "d_in", cfg_file)
    d_sae = integer(cfg, "d_sae", cfg_file)
    check_d_in(cfg_d_in, d_in, str(cfg_file))
    activation, k = _activation(cfg_file, get, cfg)
    normalize = get("normalize_activations")
    if normalize not in (None, False, "none"):
        raise SAEError(
            f"{cfg_file}: normalize_activations={normalize!r} is not supported: the scaling it needs is "
            "not part of the SAE weights, so encodings would be mis-scaled"
        )
    apply_b_dec = get("apply_b_dec_to_input")
    apply_b_dec = True if apply_b_dec is None else bool(apply_b_dec)

    tensors = read_safetensors(weights_file)
    for extra in ("b_gate", "r_mag", "b_mag"):
        if extra in tensors:
            raise SAEError(f"{weights_file} holds {extra!r}: gated SAEs are not supported")
    if "scaling_factor" in tensors and not torch.all(tensors["scaling_factor"] == 1):
        raise SAEError(f"{weights_file}: a 'scaling_factor' other than ones is not supported")
    W_enc = tensor(tensors, "W_enc", weights_file)
    b_enc = tensor(tensors, "b_enc", weights_file)
    W_dec = tensor(tensors, "W_dec", weights_file)
    b_dec = tensor(tensors, "b_dec", weights_file)
    what = f" (d_in={cfg_d_in}, d_sae={d_sae} from {CFG})"
    check_shape(W_enc, (cfg_d_in, d_sae), "W_enc", weights_file, what)
    check_shape(b_enc, (d_sae,), "b_enc", weights_file, what)
    check_shape(W_dec, (d_sae, cfg_d_in), "W_dec", weights_file, what)
    check_shape(b_dec, (cfg_d_in,), "b_dec", weights_file, what)
    threshold = None
    if activation == "jumprelu":
        if "log_threshold" in tensors and "threshold" not in tensors:
            threshold = tensors["log_threshold"].float().exp()
        else:
            threshold = tensor(tensors, "threshold", weights_file)
        check_shape(threshold, (d_sae,), "threshold", weights_file, what)

    hook_name = get("hook_name", get("hook_point"))
    site, layer = parse_hook_name(hook_name)
    if get("hook_layer") is not None:
        layer = int(get("hook_layer"))
    extra = meta.get("sparsealign") if isinstance(meta.get("sparsealign"), dict) else {}
    metadata = SAEMetadata(
        site=site,
        layer=layer,
        model_name=get("model_name"),
        hook_name=hook_name,
        format="saelens",
        source=str(folder),
        average_l0=extra.get("average_l0"),
    )
    return build_sae(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        activation=activation,
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        threshold=threshold,
        metadata=metadata,
        dtype=dtype,
        device=device,
    )


def save_saelens(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``sae`` as a SAELens 6.x folder (``cfg.json`` + ``sae_weights.safetensors``); returns it.

    ``metadata.hook_name`` is ``blocks.L.hook_resid_post`` / ``blocks.L.hook_mlp_out`` when the site and
    layer are known (else the original hook name); ``metadata.sparsealign`` keeps the source format and
    advertised L0. Each file is written atomically (:mod:`sparsealign.io`). Loading the folder gives back the
    same weights, activation and site.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = sae.metadata
    hook_name = meta.hook_name
    if meta.layer is not None and meta.site is not None:
        hook_name = f"blocks.{meta.layer}.{SITE_HOOKS.get(meta.site, meta.site)}"
    architecture = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[sae.activation]
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {
        "model_name": meta.model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "sae_lens_version": SAVED_SAE_LENS_VERSION,
        "sparsealign": {"source_format": meta.format, "average_l0": meta.average_l0},
    }
    tensors = {
        name: param.detach().to("cpu").contiguous()
        for name, param in (
            ("W_enc", sae.W_enc),
            ("b_enc", sae.b_enc),
            ("W_dec", sae.W_dec),
            ("b_dec", sae.b_dec),
            ("threshold", sae.threshold),
        )
        if param is not None
    }
    with atomic_file(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    with atomic_write(folder / CFG) as handle:
        handle.write(json.dumps(cfg, indent=2) + "\n")
    return folder


FORMAT = register_format(SAEFormat("saelens", f"{CFG} + {WEIGHTS}", detect, load, save_saelens))

__all__ = ["FORMAT", "save_saelens"]
