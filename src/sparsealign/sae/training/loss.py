"""The training objective of a TopK SAE (Gao et al. 2024, arXiv:2406.04093, §2.1 and §A.2)::

L     = ‖x − x̂‖² / ‖x − mean(x)‖²  +  α · L_aux                       (sums over the batch, α = 1/32)
L_aux = ‖e − ê‖² / ‖e − mean(e)‖²,   e = sg(x − x̂),   ê = z_aux @ W_dec
z_aux = TopK_{k_aux}(ReLU(pre)) restricted to the dead latents; L_aux = 0 when no latent is dead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsealign.sae.model import SparseAutoencoder

__all__ = ["auxk_loss", "normalized_mse"]


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the rows (the batch FVU; Gao et al. 2024 §2.1)."""
    variance = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return (x - x_hat).pow(2).sum() / variance


def auxk_loss(sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024 §A.2): reconstruct the residual ``e = sg(x − x̂)`` from the top ``k_aux``
    dead latents, ``L_aux = ‖e − ê‖² / ‖e − mean(e)‖²`` with ``ê = z_aux @ W_dec`` (no bias).

    ``dead``: boolean ``[d_sae]``. Gradients reach only the dead latents' encoder columns, encoder biases
    and decoder rows. Returns a zero (with a graph) when no latent is dead.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return sae.W_dec.sum() * 0.0
    x_c = (x - sae.b_dec if sae.apply_b_dec_to_input else x).detach()
    pre = torch.addmm(sae.b_enc[dead_idx], x_c, sae.W_enc[:, dead_idx])
    values, positions = torch.relu(pre).topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    e_hat = F.embedding_bag(dead_idx[positions], sae.W_dec, per_sample_weights=values, mode="sum")
    return normalized_mse((x - x_hat).detach(), e_hat)
