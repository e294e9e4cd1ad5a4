"""How good a trained SAE is on held-out activations: FVU, mean L0 and the latents that never fire."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsealign.sae.model import SparseAutoencoder

__all__ = ["evaluate_sae"]


def evaluate_sae(sae: SparseAutoencoder, activations: Tensor, chunk: int = 4096) -> dict[str, float]:
    """On ``activations [n, d_in]``: ``fvu`` = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², ``l0`` = mean number of nonzero
    codes per token, ``dead_fraction`` = share of latents that never fire on these tokens."""
    x_all = activations.to(device=sae.device, dtype=torch.float32)
    mean = x_all.mean(0)
    sse = total = 0.0
    nonzero = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
    with torch.no_grad():
        for start in range(0, x_all.shape[0], chunk):
            x = x_all[start : start + chunk]
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
            sse += (x - x_hat).double().pow(2).sum().item()
            total += (x - mean).double().pow(2).sum().item()
            active = codes > 0
            nonzero += int(active.sum().item())
            fired |= active.any(0)
    return {
        "fvu": sse / total if total > 0 else float("nan"),
        "l0": nonzero / max(1, x_all.shape[0]),
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }
