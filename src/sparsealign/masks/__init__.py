"""Token masks for SparsePO (learned networks on reference hidden states) and MaPO (activation maps).

Both produce ``[N, T]`` non-negative per-token weights, response-aligned like the per-token tensors of
:class:`sparsealign.models.logprobs.TokenOutputs` and zero outside the response mask, for
:func:`sparsealign.losses.sparsepo_loss`.
"""

from __future__ import annotations

from sparsealign.masks.activation import ACTIVATION_TYPES, activation_mask, token_map
from sparsealign.masks.networks import MASK_KINDS, MaskModel, MaskNetwork, RandomMask, build_mask_model

__all__ = [
    "ACTIVATION_TYPES",
    "MASK_KINDS",
    "MaskModel",
    "MaskNetwork",
    "RandomMask",
    "activation_mask",
    "build_mask_model",
    "token_map",
]
