"""ORPO: the loss by hand, the stable log-odds (probability near 1 included), masking, gradients, metrics.

The batch is test_losses.py's (B=2, T=3):

    policy_chosen   = [[-1.0, -2.0,  0.0], [-0.5, -0.5, -1.0]]   mask_chosen   = [[1, 1, 0], [1, 1, 1]]
    policy_rejected = [[-2.0, -1.0, -1.0], [-3.0,  0.0,  0.0]]   mask_rejected = [[1, 1, 1], [1, 0, 0]]

Mean per-token log-probs: ā_w = [−3/2, −2/3], ā_l = [−4/3, −3]; sums: chosen [−3, −2], rejected [−4, −3].
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import LossOutput, log_odds, orpo_loss

MEAN_CHOSEN = [-3 / 2, -2 / 3]
MEAN_REJECTED = [-4 / 3, -3.0]


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def batch(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], dtype),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]], dtype),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
    }


def hand_log_odds(a: float) -> float:
    """log(p / (1 − p)) with p = e^a, straight from the definition."""
    p = math.exp(a)
    return math.log(p / (1 - p))


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_orpo_by_hand():
    """λ = 0.5: loss_i = −ā_w + λ · (−log σ(lo(ā_w) − lo(ā_l))) = −ā_w + λ · softplus(−(lo_w − lo_l)).

    Pair 1: ā_w = −1.5 < ā_l = −4/3, so the log-odds difference is negative (the rejected is likelier).
    Pair 2: ā_w = −2/3 > ā_l = −3: positive difference.
    """
    out = orpo_loss(**batch(), lam=0.5)
    diffs = [hand_log_odds(w) - hand_log_odds(r) for w, r in zip(MEAN_CHOSEN, MEAN_REJECTED, strict=True)]
    expected = [-w + 0.5 * softplus(-d) for w, d in zip(MEAN_CHOSEN, diffs, strict=True)]
    assert diffs[0] < 0 < diffs[1]
    assert_close(out.per_example, t(expected))
    assert_close(out.loss, torch.tensor(sum(expected) / 2))
    m = out.metrics
    assert_close(m["nll_loss"], torch.tensor((1.5 + 2 / 3) / 2))
    assert_close(m["log_odds_chosen"], torch.tensor(sum(diffs) / 2))
    assert_close(m["log_odds_ratio"], torch.tensor(sum(-softplus(-d) for d in diffs) / 2))
    assert_close(m["rewards/chosen"], torch.tensor(0.5 * sum(MEAN_CHOSEN) / 2))  # λ · mean ā_w
    assert_close(m["rewards/rejected"], torch.tensor(0.5 * sum(MEAN_REJECTED) / 2))
    assert_close(m["rewards/accuracies"], torch.tensor(0.5))  # pair 2 only
    assert_close(m["logps/chosen"], torch.tensor(-2.5))  # summed log-probs: mean([−3, −2])
    assert_close(m["logps/rejected"], torch.tensor(-3.5))


def test_lam_zero_is_length_normalised_sft():
    """λ = 0 leaves the SFT term: −ā_w = [3/2, 2/3]."""
    assert_close(orpo_loss(**batch(), lam=0.0).per_example, t([1.5, 2 / 3]))


def test_equal_responses_cost_log2():
    """Identical chosen and rejected: log-odds difference 0, so loss = −ā_w + λ log 2."""
    b = batch()
    b["policy_rejected_logps"], b["mask_rejected"] = b["policy_chosen_logps"], b["mask_chosen"]
    out = orpo_loss(**b, lam=0.3)
    assert_close(out.per_example, t([1.5 + 0.3 * math.log(2), 2 / 3 + 0.3 * math.log(2)]))
    assert_close(out.metrics["log_odds_chosen"], torch.tensor(0.0))


# --- the log-odds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [-1e-3, -0.2, -math.log(2), -0.7, -5.0, -30.0])
def test_log_odds_matches_definition(a: float):
    """Both branches (above and below −log 2) agree with log(p / (1 − p)) in float64."""
    assert_close(
        log_odds(torch.tensor(a, dtype=torch.float64)), torch.tensor(hand_log_odds(a), dtype=torch.float64)
    )


def test_log_odds_is_accurate_near_probability_one():
    """ā = −1e−12: 1 − e^ā = 1e−12 (1 − 5e−13 ...), so log-odds = ā − log(1e−12) + O(ā) ≈ 27.631021.

    The naive log1p(−exp(ā)) loses most digits here (exp(ā) rounds to 1 − 1.000089e−12)."""
    a = -1e-12
    expected = a - (math.log(1e-12) + math.log1p(-0.5e-12))
    assert_close(log_odds(torch.tensor(a, dtype=torch.float64)), torch.tensor(expected, dtype=torch.float64))


def test_log_odds_is_accurate_for_unlikely_responses():
    """ā = −50: log(1 − e^ā) ≈ −e^−50, so log-odds ≈ ā + e^−50 = −50 to double precision."""
    assert log_odds(torch.tensor(-50.0, dtype=torch.float64)).item() == pytest.approx(-50.0, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probability_one_stays_finite(dtype: torch.dtype):
    """ā = 0 exactly (every chosen token has probability 1): the log-odds are capped at ā = −ε, so the loss
    and its gradient stay finite; both sides at 0 give a log-odds difference of 0 (loss λ log 2)."""
    eps = torch.finfo(dtype).eps
    cap = -math.log(-math.expm1(-eps)) - eps  # log-odds at ā = −ε: −ε − log(1 − e^−ε)
    assert log_odds(torch.zeros((), dtype=dtype)).item() == pytest.approx(cap, rel=1e-2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    chosen = torch.zeros(1, 2, dtype=dtype, requires_grad=True)
    rejected = torch.full((1, 2), -1.0, dtype=dtype, requires_grad=True)
    out = orpo_loss(chosen, rejected, mask, mask, lam=1.0)
    out.loss.backward()
    assert (
        torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    )
    both = orpo_loss(torch.zeros(1, 2, dtype=dtype), torch.zeros(1, 2, dtype=dtype), mask, mask, lam=1.0)
    assert both.loss.float().item() == pytest.approx(math.log(2), rel=1e-2)


def test_empty_row_stays_finite():
    """A row with no token has ā = 0 (masked_mean's convention): finite like ā = 0."""
    b = batch()
    b["mask_rejected"] = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    b["policy_rejected_logps"] = t([[-2.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    assert torch.isfinite(orpo_loss(**b).per_example).all()


# --- masking, gradients, shapes ------------------------------------------------------------------------


def test_extra_padding_column_changes_nothing():
    b = batch()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1) for k, v in b.items()}
    out, out_padded = orpo_loss(**b), orpo_loss(**padded)
    assert_close(out_padded.per_example, out.per_example)
    for key, value in out.metrics.items():
        assert_close(out_padded.metrics[key], value)


def test_masked_token_is_ignored():
    b = batch()
    junk = dict(b, policy_chosen_logps=b["policy_chosen_logps"].clone())
    junk["policy_chosen_logps"][0, 2] = -7.0
    assert_close(orpo_loss(**junk).per_example, orpo_loss(**b).per_example)


def test_gradcheck():
    """Float64 finite differences w.r.t. both sides' per-token log-probs (random, padded, B=4, T=5)."""
    g = torch.Generator().manual_seed(0)
    mask_c = torch.arange(5) < torch.tensor([5, 3, 1, 4])[:, None]
    mask_r = torch.arange(5) < torch.tensor([2, 5, 4, 1])[:, None]
    chosen = (-3 * torch.rand(4, 5, generator=g, dtype=torch.float64) - 0.01) * mask_c
    rejected = (-3 * torch.rand(4, 5, generator=g, dtype=torch.float64) - 0.01) * mask_r

    def fn(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return orpo_loss(c, r, mask_c, mask_r, lam=0.7).per_example

    assert torch.autograd.gradcheck(fn, (chosen.requires_grad_(True), rejected.requires_grad_(True)))


def test_gradient_direction():
    """Descent raises the chosen log-probs (SFT and odds-ratio terms) and lowers the rejected ones."""
    b = {k: v.clone() for k, v in batch().items()}
    b["policy_chosen_logps"].requires_grad_(True)
    b["policy_rejected_logps"].requires_grad_(True)
    orpo_loss(**b).loss.backward()
    assert (b["policy_chosen_logps"].grad[b["mask_chosen"]] < 0).all()
    assert (b["policy_rejected_logps"].grad[b["mask_rejected"]] > 0).all()
    assert (b["policy_chosen_logps"].grad[~b["mask_chosen"]] == 0).all()


def test_output_shapes_and_detached_metrics():
    b = batch()
    b["policy_chosen_logps"].requires_grad_(True)
    out = orpo_loss(**b)
    assert isinstance(out, LossOutput)
    assert out.per_example.shape == (2,) and out.loss.shape == () and out.loss.requires_grad
    assert_close(out.loss, out.per_example.mean())
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins", "logps/chosen"} <= set(
        out.metrics
    )
    assert all(v.shape == () and not v.requires_grad for v in out.metrics.values())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="lam"):
        orpo_loss(**batch(), lam=-0.1)
    b = batch()
    b["mask_rejected"] = b["mask_rejected"][:, :2]
    with pytest.raises(ValueError, match="shape mismatch"):
        orpo_loss(**b)
