"""SLiC-HF (HALOs' form): the loss by hand, the hinge's two regimes, masking, gradients, metrics.

The batch is test_losses.py's (B=2, T=3):

    policy_chosen   = [[-1.0, -2.0,  0.0], [-0.5, -0.5, -1.0]]   mask_chosen   = [[1, 1, 0], [1, 1, 1]]
    policy_rejected = [[-2.0, -1.0, -1.0], [-3.0,  0.0,  0.0]]   mask_rejected = [[1, 1, 1], [1, 0, 0]]

Summed log-probs: chosen [−3, −2], rejected [−4, −3]; so the margin Σπ_w − Σπ_l is [1, 1].
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import LossOutput, slic_loss


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def batch() -> dict[str, torch.Tensor]:
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]]),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
    }


def test_slic_by_hand_active_hinge():
    """δ = 1.5, λ = 0.1: hinge = max(0, 1.5 − 1) = 0.5 for both pairs; NLL = [3, 2].

    loss_i = [0.5 + 0.1 · 3, 0.5 + 0.1 · 2] = [0.8, 0.7]; mean 0.75.
    """
    out = slic_loss(**batch(), delta=1.5, lam=0.1)
    assert_close(out.per_example, t([0.8, 0.7]))
    assert_close(out.loss, torch.tensor(0.75))
    m = out.metrics
    assert_close(m["calibration_loss"], torch.tensor(0.5))
    assert_close(m["nll_loss"], torch.tensor(2.5))
    assert_close(m["rewards/chosen"], torch.tensor(-2.5))  # summed log-probs, as HALOs
    assert_close(m["rewards/rejected"], torch.tensor(-3.5))
    assert_close(m["rewards/margins"], torch.tensor(1.0))
    assert_close(m["rewards/accuracies"], torch.tensor(1.0))
    assert_close(m["logps/chosen"], torch.tensor(-2.5))


def test_slic_by_hand_satisfied_hinge():
    """δ = 0.5 < margin 1: the hinge is 0, only λ · NLL remains: λ = 0.2 gives [0.6, 0.4]; and the rejected
    side gets no gradient (the hinge is flat there)."""
    b = {k: v.clone() for k, v in batch().items()}
    b["policy_rejected_logps"].requires_grad_(True)
    b["policy_chosen_logps"].requires_grad_(True)
    out = slic_loss(**b, delta=0.5, lam=0.2)
    assert_close(out.per_example, t([0.6, 0.4]))
    out.loss.backward()
    assert (b["policy_rejected_logps"].grad == 0).all()
    # only the NLL: d/dπ_w (0.2 · −Σπ_w) / 2 pairs = −0.1 at every chosen token, 0 at padding
    assert_close(b["policy_chosen_logps"].grad, -0.1 * b["mask_chosen"].float())


def test_active_hinge_gradients_by_hand():
    """δ = 3 (hinge active, = 2 per pair), λ = 0.1, mean over 2 pairs: each chosen token gets
    (−1 − 0.1) / 2 = −0.55, each rejected token +1 / 2 = 0.5."""
    b = {k: v.clone() for k, v in batch().items()}
    b["policy_chosen_logps"].requires_grad_(True)
    b["policy_rejected_logps"].requires_grad_(True)
    slic_loss(**b, delta=3.0, lam=0.1).loss.backward()
    assert_close(b["policy_chosen_logps"].grad, -0.55 * b["mask_chosen"].float())
    assert_close(b["policy_rejected_logps"].grad, 0.5 * b["mask_rejected"].float())


def test_extra_padding_column_changes_nothing():
    b = batch()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1) for k, v in b.items()}
    out, out_padded = slic_loss(**b, delta=1.5), slic_loss(**padded, delta=1.5)
    assert_close(out_padded.per_example, out.per_example)
    for key, value in out.metrics.items():
        assert_close(out_padded.metrics[key], value)


def test_masked_token_is_ignored():
    b = batch()
    junk = dict(b, policy_chosen_logps=b["policy_chosen_logps"].clone())
    junk["policy_chosen_logps"][0, 2] = -7.0
    assert_close(slic_loss(**junk, delta=1.5).per_example, slic_loss(**b, delta=1.5).per_example)


def test_gradcheck():
    """Float64 finite differences, away from the hinge's kink (margins are far from δ)."""
    g = torch.Generator().manual_seed(1)
    mask_c = torch.arange(5) < torch.tensor([5, 3, 1, 4])[:, None]
    mask_r = torch.arange(5) < torch.tensor([2, 5, 4, 1])[:, None]
    chosen = -3 * torch.rand(4, 5, generator=g, dtype=torch.float64) * mask_c
    rejected = -3 * torch.rand(4, 5, generator=g, dtype=torch.float64) * mask_r
    margins = (chosen.sum(-1) - rejected.sum(-1)).tolist()
    delta = 1.0
    assert all(abs(delta - m) > 0.05 for m in margins)  # both hinge regimes, no kink

    def fn(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return slic_loss(c, r, mask_c, mask_r, delta=delta, lam=0.3).per_example

    assert torch.autograd.gradcheck(fn, (chosen.requires_grad_(True), rejected.requires_grad_(True)))


def test_output_shapes_and_detached_metrics():
    b = batch()
    b["policy_chosen_logps"].requires_grad_(True)
    out = slic_loss(**b)
    assert isinstance(out, LossOutput)
    assert out.per_example.shape == (2,) and out.loss.shape == () and out.loss.requires_grad
    assert_close(out.loss, out.per_example.mean())
    assert all(v.shape == () and not v.requires_grad for v in out.metrics.values())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="delta"):
        slic_loss(**batch(), delta=-1.0)
    with pytest.raises(ValueError, match="lam"):
        slic_loss(**batch(), lam=-0.1)
