"""The one rule that turns a dtype name (``model.dtype``, an SAE training config's ``dtype``) into a dtype."""

from __future__ import annotations

import torch

from sparsealign.errors import ModelError

__all__ = ["DTYPES", "resolve_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtype names accepted besides ``auto``."""


def resolve_dtype(name: str, device: str | torch.device | None) -> torch.dtype:
    """``'auto'`` is bfloat16 on CUDA and float32 elsewhere (bf16 matmuls are several times slower than
    fp32 on CPUs without bf16 units, and fp32 keeps CPU runs identical across machines); any other name
    is looked up in :data:`DTYPES`. This is the rule for inference (sampling, evaluation); training first
    makes ``auto`` explicit from ``train.precision`` (``sparsealign.train.precision.training_model_config``:
    float32 master weights in ``fp32`` and the mixed modes, bfloat16 in ``bf16-pure``)."""
    if name == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    if name not in DTYPES:
        raise ModelError(f"Unknown dtype '{name}'; use one of auto, {', '.join(DTYPES)}.")
    return DTYPES[name]
