"""The optimisation of a TopK SAE, one batch at a time (Gao et al. 2024, arXiv:2406.04093, §A).

Adam (β = 0.9, 0.999, ε = 6.25e-10), lr = 2e-4 / sqrt(d_sae / 16384) by default; ``b_dec`` initialised to
the geometric median of the first batch; ``W_dec`` rows random unit vectors and ``W_enc = W_decᵀ``; before
each step the gradient component parallel to each decoder row is removed, after it the rows are
renormalised. Our additions: a short linear warm-up and a linear decay of the lr over the last steps (short
CPU runs end lower with it), and training on a scaled copy of the activations (``x · c`` with
``c = sqrt(d_in / E‖x − mean‖²)`` from the first batch) so the learning rate does not depend on the
residual stream's norm; ``c`` is folded back into the biases at the end (``b_dec /= c``, ``b_enc /= c``: the
codes scale by 1/c and TopK/ReLU commute with a positive scale), so the result reads raw activations.
A latent is dead when it has not fired in the last ``dead_window`` training tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsealign.errors import SAEError
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder
from sparsealign.sae.training.config import default_lr
from sparsealign.sae.training.kernels import topk_encode
from sparsealign.sae.training.loss import auxk_loss, normalized_mse

__all__ = ["StepStats", "TopKSAETrainer", "geometric_median", "init_topk_sae"]


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising ``Σ‖p_i − y‖`` (starts at the mean)."""
    y = points.mean(0)
    scale = points.std().clamp_min(1e-12)
    for _ in range(iterations):
        weights = 1.0 / (points - y).norm(dim=1).clamp_min(1e-8 * scale)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - y).norm() <= tol * scale:
            return new
        y = new
    return y


def init_topk_sae(
    d_in: int,
    width: int,
    k: int,
    generator: torch.Generator,
    metadata: SAEMetadata | None = None,
    device: torch.device | str | None = None,
) -> SparseAutoencoder:
    """A TopK SAE with random unit-norm decoder rows, ``W_enc = W_decᵀ`` and zero biases (Gao et al. §A)."""
    sae = SparseAutoencoder(d_in, width, "topk", k=k, apply_b_dec_to_input=True, metadata=metadata)
    with torch.no_grad():
        directions = torch.randn(width, d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.t())
    return sae.to(device) if device is not None else sae


@dataclass
class StepStats:
    """One optimiser step: the batch FVU (normalised MSE), AuxK loss, mean L0, and dead latents (window)."""

    fvu: float
    aux: float
    l0: float
    dead: int
    lr: float


class TopKSAETrainer:
    """Trains a TopK SAE one batch at a time (formulas in the module docstring).

    The first batch sets the input scale ``c`` and ``b_dec`` (geometric median). ``step(x)`` takes raw
    activations ``[n, d_in]``; :meth:`result` returns the SAE for raw activations (``c`` folded in).
    """

    def __init__(
        self,
        d_in: int,
        width: int,
        k: int,
        *,
        total_steps: int,
        lr: float | None = None,
        k_aux: int | None = None,
        aux_coef: float = 1 / 32,
        dead_window: int = 10_000_000,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        metadata: SAEMetadata | None = None,
        normalize: bool = True,
    ) -> None:
        if not 0 < k <= width:
            raise SAEError(f"SAE training: need 0 < k <= width, got k={k}, width={width}")
        generator = torch.Generator().manual_seed(seed)
        self.sae = init_topk_sae(d_in, width, k, generator, metadata, device)
        self.k_aux = k_aux if k_aux is not None else max(1, d_in // 2)
        self.aux_coef = aux_coef
        self.dead_window = dead_window
        self.lr = lr if lr is not None else default_lr(width)
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.decay_steps = int(round(decay_fraction * self.total_steps))
        self.normalize = normalize
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=6.25e-10, foreach=True
        )
        self.tokens_since_fired = torch.zeros(width, dtype=torch.long, device=self.sae.device)
        self.scale = 1.0
        self.steps = 0
        self.tokens = 0
        self._initialised = False

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the last
        ``decay_steps`` of ``total_steps``."""
        factor = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        left = self.total_steps - step
        if self.decay_steps and left <= self.decay_steps:
            factor = min(factor, max(left, 0) / self.decay_steps)
        return self.lr * factor

    def _initialise(self, x: Tensor) -> None:
        if self.normalize:
            variance = (x - x.mean(0)).pow(2).sum(1).mean().item()
            self.scale = math.sqrt(self.sae.d_in / variance) if variance > 0 else 1.0
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(x * self.scale))
        self._initialised = True

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last ``dead_window`` training tokens."""
        return self.tokens_since_fired >= self.dead_window

    def step(self, x: Tensor) -> StepStats:
        """One Adam step on raw activations ``x [n, d_in]``."""
        x = x.to(device=self.sae.device, dtype=torch.float32)
        if not self._initialised:
            self._initialise(x)
        x = x * self.scale
        lr = self.lr_at(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sae = self.sae
        x_hat, values, indices, _ = topk_encode(sae, x)
        fvu = normalized_mse(x, x_hat)
        dead = self.dead_mask()
        aux = auxk_loss(sae, x, x_hat, dead, self.k_aux) if self.aux_coef else fvu.new_zeros(())
        loss = fvu + self.aux_coef * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, grad = sae.W_dec, sae.W_dec.grad
            if grad is not None:
                grad -= (grad * W).sum(1, keepdim=True) * W
            self.optimizer.step()
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[indices[values > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        self.steps += 1
        self.tokens += x.shape[0]
        l0 = (values > 0).sum().item() / x.shape[0]
        return StepStats(fvu.item(), aux.item(), l0, int(dead.sum().item()), lr)

    def result(self) -> SparseAutoencoder:
        """A copy of the SAE for raw activations: ``b_dec / c``, ``b_enc / c`` (codes scale by ``1/c``)."""
        sae = SparseAutoencoder(
            self.sae.d_in,
            self.sae.d_sae,
            "topk",
            k=self.sae.k,
            apply_b_dec_to_input=True,
            metadata=dataclasses.replace(self.sae.metadata),
            device=self.sae.device,
        )
        with torch.no_grad():
            sae.W_enc.copy_(self.sae.W_enc)
            sae.W_dec.copy_(self.sae.W_dec)
            sae.b_enc.copy_(self.sae.b_enc / self.scale)
            sae.b_dec.copy_(self.sae.b_dec / self.scale)
        return sae
