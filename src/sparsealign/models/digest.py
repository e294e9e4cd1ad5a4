"""Digests that identify a model's weights and other inputs, for caches and "same model?" checks.

:func:`weights_digest` is what a reference cache records of the reference model and what a reloaded
reference is compared against (:func:`sparsealign.models.loading.load_reference`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["digest_of", "weights_digest"]


def digest_of(chunks: Iterable[bytes]) -> str:
    """The 128-bit BLAKE2b hex digest of the concatenated ``chunks``."""
    h = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _base_name(name: str) -> str:
    """The parameter name without PEFT's wrapping, so a LoRA run and a full run of one base agree."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer (name, dtype, shape, bytes), LoRA adapter weights excluded."""
    named = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        named[_base_name(name)] = tensor

    def chunks() -> Iterable[bytes]:
        for name in sorted(named):
            tensor = named[name]
            yield f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode()
            yield _tensor_bytes(tensor)

    return digest_of(chunks())
