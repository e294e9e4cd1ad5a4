"""A frozen-able sparse autoencoder in one common representation for all on-disk formats.

Parameters (the SAELens orientation, spec ``fpo.md`` §6): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; JumpReLU SAEs also hold ``threshold [d_sae]``.

Encoding, for an input ``x [..., d_in]``::

    x'  = x - b_dec            if apply_b_dec_to_input else x
    pre = x' @ W_enc + b_enc
    relu:     f = ReLU(pre)
    jumprelu: f = ReLU(pre) * 1[pre > threshold]      (Gemma Scope / SAELens; a value equal to the
                                                       threshold gives 0; with the usual positive
                                                       thresholds this is pre * 1[pre > threshold])
    topk:     f = ReLU(pre) at the k largest entries of ReLU(pre) per row, 0 elsewhere

For TopK, sparsify applies the ReLU first and then takes the top k (``fpo.md`` §6.3), SAELens takes the top
k of ``pre`` and then applies the ReLU (§6.1). The dense codes are the same: an entry kept by one and not by
the other is ``<= 0`` before the ReLU, hence 0 in both (only the choice among ties differs). This module
uses the sparsify order. Decoding: ``decode(f) = f @ W_dec + b_dec``.

Dtypes and devices: the computation runs in the parameters' dtype and device. ``encode`` and ``decode``
cast their input to that dtype/device (differentiably, so gradients reach a bf16 model through an fp32
SAE) and return the parameters' dtype -- codes are a new space, the caller decides what to cast them to.
``forward(x)`` (encode then decode) returns the reconstruction in ``x``'s dtype and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsealign.sae.formats import save_sae

ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")
"""Supported latent activations."""


@dataclass
class SAEMetadata:
    """Where an SAE was trained and where it came from.

    ``site``: the hook site (``"resid_post"`` or ``"mlp_out"`` -- see :mod:`sparsealign.models.hooks`; other
    TransformerLens hook names are kept as found, e.g. ``"attn.hook_z"``) or None when unknown; ``layer``:
    the decoder-layer index or None; ``model_name``: the model the SAE was trained on (free text);
    ``hook_name``: the original hook name (``blocks.25.hook_resid_post``, ``layers.10``, ...);
    ``format``: the :mod:`~sparsealign.sae.formats` name it was loaded from (``"saelens"``, ``"gemma_scope"``,
    ``"sparsify"``...; None when built in code);
    ``source``: the local path loaded from; ``average_l0``: the advertised mean L0 (Gemma Scope path).
    """

    site: str | None = None
    layer: int | None = None
    model_name: str | None = None
    hook_name: str | None = None
    format: str | None = None
    source: str | None = None
    average_l0: float | None = None


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder with ReLU, JumpReLU or TopK latents (formulas in the module docstring)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        activation: str = "relu",
        *,
        k: int | None = None,
        apply_b_dec_to_input: bool = False,
        metadata: SAEMetadata | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown SAE activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        if activation == "topk":
            if k is None or not 0 < int(k) <= d_sae:
                raise ValueError(f"a topk SAE needs 0 < k <= d_sae={d_sae}, got k={k}")
            k = int(k)
        elif k is not None:
            raise ValueError(f"k is only used by topk SAEs, not {activation!r}")
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.activation = activation
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata = metadata if metadata is not None else SAEMetadata()
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, **factory))
        else:
            self.register_parameter("threshold", None)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def site(self) -> str | None:
        return self.metadata.site

    @property
    def layer(self) -> int | None:
        return self.metadata.layer

    @property
    def model_name(self) -> str | None:
        return self.metadata.model_name

    @property
    def format(self) -> str | None:
        return self.metadata.format

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        where = f", site={self.site}, layer={self.layer}" if self.site is not None else ""
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation}{extra}, "
            f"apply_b_dec_to_input={self.apply_b_dec_to_input}{where}"
        )

    # -- math ---------------------------------------------------------------------------------------

    def _check_width(self, x: Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise ValueError(
                f"SAE {what} has last dimension {x.shape[-1]}, expected {width} "
                f"(d_in={self.d_in}, d_sae={self.d_sae}); is the SAE hooked at the right site/model?"
            )

    def pre_activations(self, x: Tensor) -> Tensor:
        """``(x − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc`` in the parameters' dtype."""
        self._check_width(x, self.d_in, "input")
        x = x.to(device=self.device, dtype=self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes ``[..., d_sae]`` (formulas in the module docstring)."""
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        acts = torch.relu(pre)
        values, indices = acts.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(acts).scatter(-1, indices, values)

    def decode(self, codes: Tensor) -> Tensor:
        """``codes @ W_dec + b_dec`` ``[..., d_in]`` in the parameters' dtype."""
        self._check_width(codes, self.d_sae, "code")
        codes = codes.to(device=self.device, dtype=self.dtype)
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``decode(encode(x))``, in ``x``'s dtype and device."""
        return self.decode(self.encode(x)).to(device=x.device, dtype=x.dtype)

    def freeze(self) -> SparseAutoencoder:
        """Stop gradients into the SAE's parameters (they still flow through it into the input)."""
        for param in self.parameters():
            param.requires_grad_(False)
        return self

    def save(self, folder: str | Path) -> Path:
        """Write the SAE into ``folder`` in the SAELens 6.x layout (``cfg.json`` +
        ``sae_weights.safetensors``, :mod:`sparsealign.sae.formats.saelens`); returns the folder."""
        return save_sae(self, folder)
