"""``kto_unpaired_loss``: KTO on binary feedback, against hand-derived values and the paired loss."""

from __future__ import annotations

import math

import pytest
import torch

from sparsealign.losses import kto_loss, kto_unpaired_loss, kto_weight_ratio


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_hand_derived_values() -> None:
    # three items, one token each: r = π − ref = 1.0, -0.5, 2.0; z0 = 0.5; beta = 0.5
    policy = torch.tensor([[1.0, 9.0], [-0.5, 9.0], [2.5, 9.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    desirable = torch.tensor([True, False, False])
    out = kto_unpaired_loss(policy, ref, mask, desirable, 0.5, beta=0.5, desirable_weight=2.0)
    expected = [
        2.0 * (1 - _sigmoid(0.5 * (1.0 - 0.5))),  # desirable, λ_D = 2
        1 - _sigmoid(0.5 * (0.5 - (-0.5))),  # undesirable
        1 - _sigmoid(0.5 * (0.5 - 2.0)),  # undesirable
    ]
    assert out.per_example.tolist() == pytest.approx(expected)
    assert out.loss.item() == pytest.approx(sum(expected) / 3)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert out.metrics["rewards/rejected"].item() == pytest.approx((0.5 * -0.5 + 0.5 * 2.0) / 2)
    assert out.metrics["count/desirable"].item() == 1


def test_paired_data_flattened_equals_the_paired_loss() -> None:
    torch.manual_seed(0)
    b, t = 4, 5
    pc, pr, rc, rr = (torch.randn(b, t) for _ in range(4))
    mc = (torch.rand(b, t) > 0.3).float()
    mr = (torch.rand(b, t) > 0.3).float()
    paired = kto_loss(pc, pr, rc, rr, mc, mr, 0.2, beta=0.3, desirable_weight=1.2)
    unpaired = kto_unpaired_loss(
        torch.cat([pc, pr]),
        torch.cat([rc, rr]),
        torch.cat([mc, mr]),
        torch.tensor([True] * b + [False] * b),
        0.2,
        beta=0.3,
        desirable_weight=1.2,
    )
    assert unpaired.loss.item() == pytest.approx(paired.loss.item(), rel=1e-6)


def test_gradient_check() -> None:
    torch.manual_seed(1)
    policy = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    torch.autograd.gradcheck(lambda p: kto_unpaired_loss(p, ref, mask, desirable, 0.1).loss, (policy,))


def test_bad_inputs() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="bool"):
        kto_unpaired_loss(x, x, x, torch.tensor([1, 0]), 0.0)
    with pytest.raises(ValueError, match="beta"):
        kto_unpaired_loss(x, x, x, torch.tensor([True, False]), 0.0, beta=0)


def test_weight_ratio() -> None:
    assert kto_weight_ratio(100, 100) == 1.0
    assert kto_weight_ratio(10, 90, desirable_weight=9.0) == 1.0
    assert kto_weight_ratio(10, 90) == pytest.approx(1 / 9)
    assert kto_weight_ratio(5, 0) == math.inf
