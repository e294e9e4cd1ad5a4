"""MaPO's activation-based token masks: per-token maps from reference-model activations.

MaPO (model-activation-based masks, Christopoulou et al. 2024, "SparsePO: Controlling Preference
Alignment of LLMs via Sparse Token Masks", arXiv:2410.05102) weights every response token by a fixed,
parameter-free mask computed from the frozen reference model's activations, and trains with
:func:`sparsealign.losses.sparsepo_loss` (``shared_mask=True``, no L1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

ACTIVATION_TYPES: tuple[str, ...] = ("mlp", "attn", "resid", "logits")
"""The activation types of the paper's hooks: MLP activations, attention q/k/v/outputs, residual stream
points, LM-head logits."""

MIN_RELATIVE_SPAN = 1e-6
"""Floor of the relative tolerance below which a sequence's token map counts as constant (see
:func:`token_map`)."""


def token_map(activation: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Min-max normalised per-token map of one ``[B, T, W]`` activation; returns ``(map, finite)``.

    In float32: ``ā_t = mean_j A_t,j``, then per sequence, over its response tokens (``mask``),
    ``r_t = (ā_t − min ā) / (max ā − min ā)``, zero outside the mask. The paper's ``zn_rescale`` first
    z-normalises ā, which cancels in the min-max step (apart from its float16 rounding and NaNs), so it is
    left out.

    Degenerate sequences -- a one-token response, or activations whose token means do not vary -- get
    1.0 at every response token. A constant activation says nothing about which tokens matter, so its map
    is neutral: all ones is TDPO1's uniform weighting, which is what MaPO reduces to when every map is
    constant (the paper's ``uniform`` ablation); 0 would switch the tokens off and 0.5 would only rescale
    β. "Does not vary" means a span of at most ``rtol · mean|A|`` over the sequence's response tokens, with
    ``rtol = max(eps of the input dtype, MIN_RELATIVE_SPAN)``: differences below the resolution of the
    input are rounding noise (a LayerNorm output with uniform γ has mean β up to rounding), and
    normalising them to [0, 1] would turn noise into a full-range mask. ``finite`` is a ``[B]`` bool
    tensor, False where a response token has a non-finite activation.
    """
    on = mask.bool()
    values = activation.float()
    token_mean = values.mean(dim=-1)  # [B, T]
    token_abs = values.abs().mean(dim=-1)
    finite = (torch.isfinite(token_mean) & torch.isfinite(token_abs)) | ~on
    token_mean = torch.where(on, token_mean, torch.zeros_like(token_mean))
    low = token_mean.masked_fill(~on, float("inf")).amin(dim=-1, keepdim=True)
    high = token_mean.masked_fill(~on, float("-inf")).amax(dim=-1, keepdim=True)
    span = high - low
    count = on.sum(dim=-1, keepdim=True).clamp_min(1)
    magnitude = torch.where(on, token_abs, torch.zeros_like(token_abs)).sum(dim=-1, keepdim=True) / count
    rtol = max(torch.finfo(activation.dtype).eps, MIN_RELATIVE_SPAN)
    # NaN compares False, and a row without tokens has span −inf: both land in the constant case.
    varies = span > rtol * magnitude
    safe_span = torch.where(varies, span, torch.ones_like(span))
    safe_low = torch.where(varies, low, torch.zeros_like(low))
    scaled = ((token_mean - safe_low) / safe_span).clamp(0.0, 1.0)
    result = torch.where(varies, scaled, torch.ones_like(scaled))
    return torch.where(on, result, torch.zeros_like(result)), finite.all(dim=-1)


def activation_mask(groups: Mapping[str, Sequence[Tensor]], mask: Tensor) -> Tensor:
    """MaPO's token mask ``[B, T]`` (float32, in [0, 1], zero outside ``mask``, no gradient).

    ``groups`` maps an activation type (one of :data:`ACTIVATION_TYPES`) to a list of ``[B, T, W]``
    activations aligned like the per-token tensors (row t = the position that predicts response token t;
    4-D attention tensors ``[B, heads, T, hd]`` must be permuted and flattened to ``[B, T, heads·hd]``
    first). Each becomes a per-token map by :func:`token_map` (mean over the width, then min-max over
    the response tokens of each sequence); the maps are averaged within a type (every layer and hook
    counts equally), then the type maps are averaged across types:

        m_t = mean_types mean_{A in type} (ā_t − min ā) / (max ā − min ā).

    Types with an empty list are skipped (hooks that do not fire on an architecture); no activation at
    all, an unknown type, a shape that does not match ``mask`` or a non-finite activation at a response
    token raise ``ValueError``. Computed in float32 under ``no_grad``, whatever the input dtype; a
    degenerate sequence (one token, constant activations) gets 1.0 per token, never NaN.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    unknown = [name for name in groups if name not in ACTIVATION_TYPES]
    if unknown:
        raise ValueError(f"unknown activation type(s) {unknown}; valid types: {', '.join(ACTIVATION_TYPES)}")
    with torch.no_grad():
        type_maps: list[Tensor] = []
        checks: list[tuple[str, int, Tensor]] = []
        for name, tensors in groups.items():
            maps = []
            for index, activation in enumerate(tensors):
                if activation.dim() != 3 or activation.shape[:2] != mask.shape:
                    raise ValueError(
                        f"activation {name}[{index}] must be [B, T, W] with [B, T] = {tuple(mask.shape)}, "
                        f"got shape {tuple(activation.shape)}"
                    )
                values, finite = token_map(activation, mask)
                maps.append(values)
                checks.append((name, index, finite.all()))
            if maps:
                type_maps.append(torch.stack(maps).mean(dim=0))
        if not type_maps:
            raise ValueError(f"no activations given: pass at least one tensor for one of {ACTIVATION_TYPES}")
        if not bool(torch.stack([ok for _, _, ok in checks]).all()):
            bad = [f"{name}[{index}]" for name, index, ok in checks if not bool(ok)]
            raise ValueError(f"non-finite activations at response tokens in {', '.join(bad)}")
        result = torch.stack(type_maps).mean(dim=0)
        result = torch.where(mask.bool(), result, torch.zeros_like(result))
    return result.detach()
