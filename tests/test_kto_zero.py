"""KTO-zero (HALOs' ``KTOZeroTrainer``): KTO with the reference point fixed at 0, no mismatched forward.

HALOs' KTOZero differs from its KTO only in z₀ = 0 (its per-item losses 1 − σ(β r_w) and 1 − σ(−β r_l),
averaged over all items, weights 1), so it is ``kto_loss(..., reference_point=0.0)``.

Summed log-ratios of the batch (test_losses.py's): chosen r_w = [0.5, 1.0], rejected r_l = [−0.5, −1.0].
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import kto_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def batch() -> dict[str, torch.Tensor]:
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]]),
        "ref_chosen_logps": t([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]]),
        "ref_rejected_logps": t([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]]),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
    }


@pytest.mark.parametrize("zero", [0.0, 0, torch.tensor(0.0)])
def test_kto_zero_by_hand(zero):
    """β = 0.5, z₀ = 0 (as a float, an int or a tensor):

    desirable:   1 − σ(0.5 · 0.5) = 1 − σ(0.25);     1 − σ(0.5 · 1.0) = 1 − σ(0.5)
    undesirable: 1 − σ(0.5 · 0.5) = 1 − σ(0.25);     1 − σ(0.5 · 1.0) = 1 − σ(0.5)
    per pair: the mean of its two items, so [1 − σ(0.25), 1 − σ(0.5)]; the ``kl`` metric is 0.
    """
    out = kto_loss(**batch(), reference_point=zero, beta=0.5)
    expected = t([1 - sigmoid(0.25), 1 - sigmoid(0.5)])
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    assert_close(out.metrics["kl"], torch.tensor(0.0))
    assert_close(out.metrics["rewards/chosen"], torch.tensor(0.5 * 0.75))


def test_kto_zero_gradients_by_hand():
    """d/dπ of (1 − σ(β r)) / 2 / B at every chosen token is −β σ'(β r) / (2B), σ' = σ (1 − σ);
    for the rejected side, (1 − σ(−β r)) gives +β σ'(β r) / (2B). β = 0.5, B = 2."""
    b = {k: v.clone() for k, v in batch().items()}
    b["policy_chosen_logps"].requires_grad_(True)
    b["policy_rejected_logps"].requires_grad_(True)
    kto_loss(**b, reference_point=0.0, beta=0.5).loss.backward()

    def slope(x: float) -> float:
        return sigmoid(x) * (1 - sigmoid(x))

    chosen = [-0.5 * slope(0.5 * r) / 4 for r in (0.5, 1.0)]
    rejected = [0.5 * slope(-0.5 * r) / 4 for r in (-0.5, -1.0)]
    assert_close(b["policy_chosen_logps"].grad, t(chosen)[:, None] * b["mask_chosen"].float())
    assert_close(b["policy_rejected_logps"].grad, t(rejected)[:, None] * b["mask_rejected"].float())
