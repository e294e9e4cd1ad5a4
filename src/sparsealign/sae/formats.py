"""Loading pretrained SAEs from local folders in the three common on-disk formats (spec ``fpo.md`` §6).

:func:`load_sae` detects the format from the files present:

SAELens (``cfg.json`` + ``sae_weights.safetensors``)
    Tensors ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` (+ ``threshold`` for
    JumpReLU; a training checkpoint's ``log_threshold`` is exponentiated). ``cfg.json`` is either the 6.x
    layout (``architecture``, ``d_in``, ``d_sae``, ``apply_b_dec_to_input``, ``k`` at the top level, model
    and hook in a nested ``metadata`` object) or the older flat layout (``hook_name``/``hook_point``,
    ``hook_layer``, ``activation_fn_str``/``activation_fn`` + ``activation_fn_kwargs``). Architecture
    ``standard`` → ReLU (or TopK when the legacy activation is ``topk``), ``jumprelu``, ``topk``; a missing
    ``apply_b_dec_to_input`` defaults to True (SAELens' own default). Hook ``blocks.L.hook_resid_post`` →
    site ``resid_post``, layer L; ``blocks.L.hook_mlp_out`` → ``mlp_out``.
Gemma Scope (``params.npz``)
    Arrays ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold`` (lowercase ``w_*`` accepted); JumpReLU,
    no ``b_dec`` subtraction. Layer, width and L0 come from the path ``layer_L/width_W/average_l0_N``
    (width ``16k`` = 16384 is checked against the arrays), the site and model from a
    ``gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att}`` component when the path has one.
EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``)
    ``encoder.weight [num_latents, d_in]`` (``nn.Linear`` layout: ``W_enc = encoder.weightᵀ``),
    ``encoder.bias``, ``W_dec [num_latents, d_in]``, ``b_dec``; TopK with ``k`` from ``cfg.json``;
    ``apply_b_dec_to_input = not transcode``; ``num_latents`` 0 or missing ⇒ ``d_in · expansion_factor``;
    ``d_in`` from ``cfg.json`` or ``b_dec``. A folder named ``layers.L`` → ``resid_post`` of layer L,
    ``layers.L.mlp`` → ``mlp_out``.

Every shape is checked (against ``d_in`` from the config, or the ``d_in`` argument: the model's hidden
size); errors are :class:`SAEError` (a :class:`~sparsealign.errors.UserError`) naming the file, the key and
the shapes. Features with no faithful implementation here (gated SAEs, activation normalisation, decoder-
norm rescaling, skip connections, groupmax, embedding SAEs) are refused rather than silently mis-encoded.

Hub ids: a string that is not an existing path (``owner/repo`` or ``owner/repo/sub/folder``) is downloaded
with ``huggingface_hub.snapshot_download`` unless the hub is offline (``HF_HUB_OFFLINE``); offline or on a
failed download, the error says how to download it and pass the local folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparsealign.errors import UserError
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

SAVED_SAE_LENS_VERSION = "6.0.0"
"""Written into ``metadata.sae_lens_version`` by :func:`save_saelens` (marks the 6.x layout)."""

_HOOK_SITES = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out"}
_SITE_HOOKS = {site: hook for hook, site in _HOOK_SITES.items()}


class SAEError(UserError):
    """A pretrained SAE cannot be found or loaded (missing file or key, wrong shape, unsupported option)."""


# -- helpers ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SAEError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise SAEError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise SAEError(f"cannot read {path} as safetensors: {error}") from error


def _tensor(tensors: dict[str, Tensor], key: str, file: Path) -> Tensor:
    if key not in tensors:
        raise SAEError(f"{file} has no tensor {key!r} (it has: {', '.join(sorted(tensors)) or 'none'})")
    return tensors[key]


def _check_shape(value: Tensor, shape: tuple[int, ...], key: str, file: Path, what: str = "") -> None:
    if tuple(value.shape) != tuple(shape):
        hint = ""
        if len(shape) == 2 and tuple(value.shape) == (shape[1], shape[0]):
            hint = " (it looks transposed)"
        raise SAEError(
            f"{file}: tensor {key!r} has shape {list(value.shape)}, expected {list(shape)}{what}{hint}"
        )


def _check_d_in(found: int, expected: int | None, where: str) -> None:
    if expected is not None and int(found) != int(expected):
        raise SAEError(
            f"SAE input width mismatch: {where} says d_in={found}, but the model's activations have width "
            f"{expected}; this SAE was trained on another model or site"
        )


def _int(cfg: dict[str, Any], key: str, file: Path) -> int:
    if key not in cfg or cfg[key] is None:
        raise SAEError(f"{file} has no {key!r}")
    try:
        return int(cfg[key])
    except (TypeError, ValueError) as error:
        raise SAEError(f"{file}: {key!r} must be an integer, got {cfg[key]!r}") from error


def _build(
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
    d_in, d_sae = W_enc.shape
    dtype = dtype or W_enc.dtype
    try:
        sae = SparseAutoencoder(
            d_in,
            d_sae,
            activation,
            k=k,
            apply_b_dec_to_input=apply_b_dec_to_input,
            metadata=metadata,
            dtype=dtype,
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


def _parse_hook_name(hook_name: str | None) -> tuple[str | None, int | None]:
    """``blocks.L.hook_resid_post`` → ``("resid_post", L)``; other ``blocks.L.X`` → ``(X, L)``."""
    if not hook_name:
        return None, None
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if not match:
        return None, None
    layer, rest = int(match.group(1)), match.group(2)
    return _HOOK_SITES.get(rest, rest), layer


# -- SAELens ------------------------------------------------------------------------------------------


def _load_saelens(folder: Path, d_in: int | None, dtype, device) -> SparseAutoencoder:
    cfg_file = folder / SAELENS_CFG
    weights_file = folder / SAELENS_WEIGHTS
    cfg = _read_json(cfg_file)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def get(key: str, default: Any = None) -> Any:
        """Top level first (6.x architecture keys, legacy everything), then ``metadata`` (6.x)."""
        if cfg.get(key) is not None:
            return cfg[key]
        return meta.get(key, default)

    cfg_d_in = _int(cfg, "d_in", cfg_file)
    d_sae = _int(cfg, "d_sae", cfg_file)
    _check_d_in(cfg_d_in, d_in, str(cfg_file))

    architecture = str(get("architecture") or "standard").lower()
    act_fn = get("activation_fn_str", get("activation_fn"))
    act_fn = str(act_fn).lower() if isinstance(act_fn, str) else None
    kwargs = get("activation_fn_kwargs") or {}
    k: int | None = None
    if architecture == "jumprelu":
        activation = "jumprelu"
    elif architecture == "topk" or (architecture == "standard" and act_fn == "topk"):
        activation = "topk"
        raw_k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if raw_k is None:
            raise SAEError(f"{cfg_file}: a topk SAE needs 'k' (or activation_fn_kwargs.k)")
        k = int(raw_k)
        if get("rescale_acts_by_decoder_norm"):
            raise SAEError(f"{cfg_file}: rescale_acts_by_decoder_norm=true is not supported")
    elif architecture == "standard":
        if act_fn not in (None, "relu"):
            raise SAEError(f"{cfg_file}: activation function {act_fn!r} is not supported (relu or topk)")
        activation = "relu"
    else:
        raise SAEError(
            f"{cfg_file}: SAE architecture {architecture!r} is not supported (standard, jumprelu, topk)"
        )
    normalize = get("normalize_activations")
    if normalize not in (None, False, "none"):
        raise SAEError(
            f"{cfg_file}: normalize_activations={normalize!r} is not supported: the scaling it needs is "
            "not part of the SAE weights, so encodings would be mis-scaled"
        )
    apply_b_dec = get("apply_b_dec_to_input")
    apply_b_dec = True if apply_b_dec is None else bool(apply_b_dec)

    tensors = _read_safetensors(weights_file)
    for extra in ("b_gate", "r_mag", "b_mag"):
        if extra in tensors:
            raise SAEError(f"{weights_file} holds {extra!r}: gated SAEs are not supported")
    if "scaling_factor" in tensors and not torch.all(tensors["scaling_factor"] == 1):
        raise SAEError(f"{weights_file}: a 'scaling_factor' other than ones is not supported")
    W_enc = _tensor(tensors, "W_enc", weights_file)
    b_enc = _tensor(tensors, "b_enc", weights_file)
    W_dec = _tensor(tensors, "W_dec", weights_file)
    b_dec = _tensor(tensors, "b_dec", weights_file)
    what = f" (d_in={cfg_d_in}, d_sae={d_sae} from {SAELENS_CFG})"
    _check_shape(W_enc, (cfg_d_in, d_sae), "W_enc", weights_file, what)
    _check_shape(b_enc, (d_sae,), "b_enc", weights_file, what)
    _check_shape(W_dec, (d_sae, cfg_d_in), "W_dec", weights_file, what)
    _check_shape(b_dec, (cfg_d_in,), "b_dec", weights_file, what)
    threshold = None
    if activation == "jumprelu":
        if "threshold" in tensors:
            threshold = tensors["threshold"]
        elif "log_threshold" in tensors:
            threshold = tensors["log_threshold"].float().exp()
        else:
            _tensor(tensors, "threshold", weights_file)  # raises, naming the key
        assert threshold is not None
        _check_shape(threshold, (d_sae,), "threshold", weights_file, what)

    hook_name = get("hook_name", get("hook_point"))
    site, layer = _parse_hook_name(hook_name)
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
    return _build(
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
    advertised L0. :func:`load_sae` of the folder gives back the same weights, activation and site.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = sae.metadata
    hook_name = meta.hook_name
    if meta.layer is not None and meta.site is not None:
        hook_name = f"blocks.{meta.layer}.{_SITE_HOOKS.get(meta.site, meta.site)}"
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
    save_file(tensors, str(folder / SAELENS_WEIGHTS))
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


# -- Gemma Scope --------------------------------------------------------------------------------------

_GEMMA_SCOPE_REPO = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att)")
_GEMMA_SCOPE_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn.hook_z"}


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
    repo = _GEMMA_SCOPE_REPO.search(text)
    if repo:
        size, variant, site = repo.groups()
        info["site"] = _GEMMA_SCOPE_SITES[site]
        info["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    return info


def _load_gemma_scope(file: Path, d_in: int | None, dtype, device) -> SparseAutoencoder:
    if "embedding" in file.parts:
        raise SAEError(f"{file}: Gemma Scope embedding SAEs are not supported (only layer SAEs)")
    try:
        with np.load(file) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        raise SAEError(f"cannot read {file} as a numpy .npz archive: {error}") from error
    arrays = {(("W" + key[1:]) if key.startswith("w_") else key): value for key, value in arrays.items()}
    tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    W_enc = _tensor(tensors, "W_enc", file)
    if W_enc.dim() != 2:
        raise SAEError(f"{file}: tensor 'W_enc' must be 2-D [d_in, d_sae], got shape {list(W_enc.shape)}")
    found_d_in, d_sae = W_enc.shape
    info = parse_gemma_scope_path(file)
    if "width" in info and info["width"] != d_sae:
        raise SAEError(
            f"{file}: tensor 'W_enc' has shape {list(W_enc.shape)}, but the path says width "
            f"{info['width']} (d_sae); the file does not match its folder"
        )
    _check_d_in(found_d_in, d_in, f"{file} (W_enc shape {list(W_enc.shape)})")
    what = f" (d_in={found_d_in}, d_sae={d_sae} from W_enc)"
    b_enc = _tensor(tensors, "b_enc", file)
    W_dec = _tensor(tensors, "W_dec", file)
    b_dec = _tensor(tensors, "b_dec", file)
    threshold = _tensor(tensors, "threshold", file)
    _check_shape(b_enc, (d_sae,), "b_enc", file, what)
    _check_shape(W_dec, (d_sae, found_d_in), "W_dec", file, what)
    _check_shape(b_dec, (found_d_in,), "b_dec", file, what)
    _check_shape(threshold, (d_sae,), "threshold", file, what)
    layer = info.get("layer")
    site = info.get("site")
    hook_name = f"blocks.{layer}.{_SITE_HOOKS.get(site, site)}" if site and layer is not None else None
    metadata = SAEMetadata(
        site=site,
        layer=layer,
        model_name=info.get("model_name"),
        hook_name=hook_name,
        format="gemma_scope",
        source=str(file),
        average_l0=info.get("average_l0"),
    )
    return _build(
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


# -- sparsify -----------------------------------------------------------------------------------------


def _sparsify_hookpoint(name: str) -> tuple[str | None, int | None]:
    """``layers.10`` / ``layer_10`` → resid_post 10; ``layers.10.mlp`` → mlp_out 10; else unknown."""
    match = re.fullmatch(r"(?:.*\.)?layers?[._](\d+)(\.mlp)?", name)
    if not match:
        return None, None
    return ("mlp_out" if match.group(2) else "resid_post"), int(match.group(1))


def _load_sparsify(folder: Path, d_in: int | None, dtype, device) -> SparseAutoencoder:
    cfg_file = folder / SPARSIFY_CFG
    weights_file = folder / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_file)
    activation = str(cfg.get("activation", "topk")).lower()
    if activation != "topk":
        raise SAEError(f"{cfg_file}: sparsify activation {activation!r} is not supported (topk only)")
    for flag in ("skip_connection", "signed"):
        if cfg.get(flag):
            raise SAEError(f"{cfg_file}: {flag}=true is not supported")
    tensors = _read_safetensors(weights_file)
    if "W_skip" in tensors:
        raise SAEError(f"{weights_file} holds 'W_skip': skip connections are not supported")
    encoder_weight = _tensor(tensors, "encoder.weight", weights_file)
    encoder_bias = _tensor(tensors, "encoder.bias", weights_file)
    W_dec = _tensor(tensors, "W_dec", weights_file)
    b_dec = _tensor(tensors, "b_dec", weights_file)
    if cfg.get("d_in") is not None:
        cfg_d_in = _int(cfg, "d_in", cfg_file)
        source = str(cfg_file)
    else:
        if b_dec.dim() != 1:
            raise SAEError(f"{weights_file}: tensor 'b_dec' must be 1-D [d_in], got {list(b_dec.shape)}")
        cfg_d_in = int(b_dec.shape[0])
        source = f"{weights_file} (b_dec; {SPARSIFY_CFG} has no d_in)"
    _check_d_in(cfg_d_in, d_in, source)
    num_latents = int(cfg.get("num_latents") or 0)
    if num_latents <= 0:
        num_latents = cfg_d_in * int(cfg.get("expansion_factor", 32))
    k = int(cfg.get("k", 32))
    what = f" (d_in={cfg_d_in}, num_latents={num_latents} from {SPARSIFY_CFG})"
    _check_shape(encoder_weight, (num_latents, cfg_d_in), "encoder.weight", weights_file, what)
    _check_shape(encoder_bias, (num_latents,), "encoder.bias", weights_file, what)
    _check_shape(W_dec, (num_latents, cfg_d_in), "W_dec", weights_file, what)
    _check_shape(b_dec, (cfg_d_in,), "b_dec", weights_file, what)
    site, layer = _sparsify_hookpoint(folder.name)
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
    return _build(
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


# -- detection ----------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return True


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
    return Path(local) / sub if sub else Path(local)


def _looks_like_hub_id(text: str) -> bool:
    if text.startswith(("/", ".", "~")) or "\\" in text or ":" in text:
        return False
    parts = text.strip("/").split("/")
    return len(parts) >= 2 and all(parts)


def load_sae(
    path: str | Path,
    d_in: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SparseAutoencoder:
    """Load a pretrained SAE from a local folder or file (format detected; see the module docstring).

    ``path``: an SAE folder (SAELens, sparsify hookpoint folder, or a Gemma Scope ``average_l0_N`` folder),
    one of its files (``cfg.json``, ``sae_weights.safetensors``, ``sae.safetensors``, ``params.npz``), or a
    hub id (downloaded unless offline). ``d_in``: the expected input width (the model's hidden size); a
    different SAE width raises :class:`SAEError`. ``dtype``: the parameters' dtype (default: as stored);
    ``device``: where to put them (default CPU). Returns an unfrozen SAE; call ``.freeze()`` for training.
    A built-in name (:data:`sparsealign.sae.builtins.BUILTIN_SAES`) is looked up first: its cached
    folder, trained on first use.
    """
    from sparsealign.sae.builtins import BUILTIN_SAES, ensure_builtin_sae

    if isinstance(path, str) and path in BUILTIN_SAES:
        path = ensure_builtin_sae(path)
    target = Path(path).expanduser()
    if not target.exists():
        text = str(path)
        if _looks_like_hub_id(text):
            target = _download(text)
        else:
            raise SAEError(f"SAE path {text!r} does not exist")
        if not target.exists():
            raise SAEError(f"the download of SAE {text!r} has no folder {target}")
    if target.is_file():
        if target.suffix == ".npz":
            return _load_gemma_scope(target, d_in, dtype, device)
        if target.name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
            target = target.parent
        else:
            raise SAEError(
                f"{target} is not a known SAE file (expected {SAELENS_CFG}, {SAELENS_WEIGHTS}, "
                f"{SPARSIFY_WEIGHTS} or {GEMMA_SCOPE_PARAMS}, or the folder holding them)"
            )
    folder = target
    if (folder / GEMMA_SCOPE_PARAMS).is_file():
        return _load_gemma_scope(folder / GEMMA_SCOPE_PARAMS, d_in, dtype, device)
    has_cfg = (folder / SAELENS_CFG).is_file()
    if has_cfg and (folder / SAELENS_WEIGHTS).is_file():
        return _load_saelens(folder, d_in, dtype, device)
    if has_cfg and (folder / SPARSIFY_WEIGHTS).is_file():
        return _load_sparsify(folder, d_in, dtype, device)
    if has_cfg:
        cfg = _read_json(folder / SAELENS_CFG)
        if "d_sae" in cfg or "metadata" in cfg or "hook_name" in cfg:
            raise SAEError(f"{folder} has a SAELens {SAELENS_CFG} but no {SAELENS_WEIGHTS}")
        raise SAEError(f"{folder} has a {SPARSIFY_CFG} but no weights file ({SPARSIFY_WEIGHTS} for sparsify)")
    contents = sorted(child.name + ("/" if child.is_dir() else "") for child in folder.iterdir())
    hookpoints = [
        name for name in contents if name.endswith("/") and (folder / name / SPARSIFY_CFG).is_file()
    ]
    if hookpoints:
        raise SAEError(
            f"{folder} holds one SAE per hookpoint ({', '.join(h.rstrip('/') for h in hookpoints[:8])}); "
            "pass one hookpoint folder"
        )
    shown = ", ".join(contents[:12]) + (" ..." if len(contents) > 12 else "")
    raise SAEError(
        f"{folder} is not an SAE folder: expected {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens), "
        f"{SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify) or {GEMMA_SCOPE_PARAMS} (Gemma Scope); "
        f"it has: {shown or 'nothing'}"
    )


__all__ = ["SAEError", "load_sae", "parse_gemma_scope_path", "save_saelens"]
