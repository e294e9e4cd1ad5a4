"""The TopK SAE forward with a sparse backward (Gao et al. 2024, arXiv:2406.04093, §2.3 and §D.2).

Only the k selected pre-activations per token carry gradient, so the gradients of ``W_enc`` and of the
input are sparse-dense products (n·k·d_in work instead of n·d_sae·d_in); the decoder is a sparse-dense
product with the k selected rows, with a sparse backward too::

    values, indices = TopK(ReLU(x_c @ W_enc + b_enc))          x_c = x − b_dec (apply_b_dec_to_input)
    x̂ = Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from sparsealign.sae.model import SparseAutoencoder

__all__ = ["sparse_decode", "topk_encode"]


def _csr(indices: Tensor, values: Tensor, width: int) -> Tensor:
    """The ``[n, width]`` sparse matrix with ``values[t, j]`` at column ``indices[t, j]`` of row ``t``
    (``k`` entries per row, columns sorted within each row)."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device, dtype=torch.long)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": not actionable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, indices.reshape(-1), values.reshape(-1), (n, width), check_invariants=False
        )


class _TopKEncode(torch.autograd.Function):
    """``values, indices = TopK(ReLU(x_c @ W_enc + b_enc))`` with a sparse backward: only the k kept entries
    per row carry gradient, so ``∂W_enc = x_cᵀ S`` and ``∂x_c = S W_encᵀ`` with ``S`` sparse (n·k·d_in)."""

    @staticmethod
    def forward(ctx: Any, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        pre = torch.addmm(b_enc, x_c, W_enc)
        values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
        indices, order = indices.sort(dim=-1)
        values = values.gather(-1, order)
        ctx.save_for_backward(x_c, W_enc, indices, values > 0)
        ctx.mark_non_differentiable(indices, pre)
        return values, indices, pre

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _grad_indices: Any, _grad_pre: Any) -> tuple:
        x_c, W_enc, indices, positive = ctx.saved_tensors
        grad = grad_values * positive
        sparse = _csr(indices, grad, W_enc.shape[1])
        grad_x = sparse @ W_enc.t().contiguous() if ctx.needs_input_grad[0] else None
        grad_W = (sparse.t() @ x_c).t() if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
        grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_W, grad_b, None


class _SparseDecode(torch.autograd.Function):
    """``Σ_j values[:, j] · W_dec[indices[:, j]]`` (no bias) as a sparse-dense product, with the sparse
    backward ``∂W_dec = Sᵀ g`` and ``∂values[t, j] = g[t] · W_dec[indices[t, j]]``."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return _csr(indices, values, W_dec.shape[0]) @ W_dec

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # (g W_decᵀ) sampled at the k kept entries per row (SDDMM)
            pattern = _csr(indices, torch.zeros_like(values), W_dec.shape[0])
            sampled = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.t(), beta=0.0)
            grad_values = sampled.values().reshape(values.shape)
        if ctx.needs_input_grad[2]:
            grad_W = _csr(indices, values, W_dec.shape[0]).t() @ grad_out
        return grad_values, None, grad_W


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``Σ_j values[:, j] · W_dec[indices[:, j]]`` ``[n, d_in]``; ``indices`` sorted within each row."""
    return _SparseDecode.apply(values, indices, W_dec)


def topk_encode(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x̂, values, indices, pre)`` of a TopK SAE for ``x [n, d_in]``, differentiable in the SAE's
    parameters (sparse backward). ``values``/``indices`` ``[n, k]``: the kept codes (indices sorted per
    row); ``pre`` ``[n, d_sae]``: the detached pre-activations; ``x̂ = Σ values · W_dec[indices] + b_dec``
    equals ``sae(x)``."""
    x_c = x - sae.b_dec if sae.apply_b_dec_to_input else x
    values, indices, pre = _TopKEncode.apply(x_c, sae.W_enc, sae.b_enc, sae.k)
    x_hat = sparse_decode(values, indices, sae.W_dec) + sae.b_dec
    return x_hat, values, indices, pre
