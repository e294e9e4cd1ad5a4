"""Tests for FPO (Yin et al. 2024, arXiv:2411.07618): pool_features, feature_distance, fpo_loss.

The hand-checked log-prob batch is the one of ``test_sparse_losses.py`` (B=2, T=3):

    policy_chosen   = [[-1.0, -2.0,  0.0], [-0.5, -0.5, -1.0]]   mask_chosen   = [[1, 1, 0], [1, 1, 1]]
    ref_chosen      = [[-1.5, -2.0,  0.0], [-1.0, -1.0, -1.0]]
    policy_rejected = [[-2.0, -1.0, -1.0], [-3.0,  0.0,  0.0]]   mask_rejected = [[1, 1, 1], [1, 0, 0]]
    ref_rejected    = [[-1.5, -1.0, -1.0], [-2.0,  0.0,  0.0]]

Per-token log-ratios Δ = policy − ref:
    Δ_chosen   = [[0.5, 0.0, ·], [0.5, 0.5, 0.0]]      Δ_rejected = [[-0.5, 0.0, 0.0], [-1.0, ·, ·]]
Mean over the response tokens:
    ā_w = [0.5/2, 1.0/3] = [1/4, 1/3]      ā_l = [-0.5/3, -1.0/1] = [-1/6, -1]
with feature distances D_w = [0.4, 0.2], D_l = [1.0, 0.6].

The hand-checked pooled codes (B=2, F=5, k=2) for feature_distance:

    policy = [[0.0, 3.0, 1.0, 0.5, 2.0], [1.0, 0.0, 4.0, 0.2, 0.0]]
    ref    = [[1.0, 2.0, 0.0, 3.0, 0.5], [2.0, 0.5, 3.0, 0.0, 1.5]]
    policy − ref = [[-1, 1, 1, -2.5, 1.5], [-1, -0.5, 1, 0.2, -1.5]]
    squared      = [[ 1, 1, 1, 6.25, 2.25], [ 1, 0.25, 1, 0.04, 2.25]]
Top-2 index sets:
    row 0: reference {3, 1} (3.0, 2.0)   policy {1, 4} (3.0, 2.0)   union {1, 3, 4}
    row 1: reference {2, 0} (3.0, 2.0)   policy {2, 0} (4.0, 1.0)   union {0, 2}
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import (
    LossOutput,
    active_features,
    feature_distance,
    fpo_loss,
    pool_features,
)

FPO_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "fpo/feature_dist_chosen",
    "fpo/feature_dist_rejected",
    "logits/reward_part",
    "logits/feature_part",
}
LOGP_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
INDEX_SETS = ("reference", "policy", "union")


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def batch(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The hand-checked batch from the module docstring (inputs of fpo_loss)."""
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], dtype),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]], dtype),
        "ref_chosen_logps": t([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]], dtype),
        "ref_rejected_logps": t([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]], dtype),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
        "feature_dist_chosen": t([0.4, 0.2], dtype),
        "feature_dist_rejected": t([1.0, 0.6], dtype),
    }


def pooled_pair(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-checked pooled codes from the module docstring: (policy, reference)."""
    policy = t([[0.0, 3.0, 1.0, 0.5, 2.0], [1.0, 0.0, 4.0, 0.2, 0.0]], dtype)
    ref = t([[1.0, 2.0, 0.0, 3.0, 0.5], [2.0, 0.5, 3.0, 0.0, 1.5]], dtype)
    return policy, ref


def random_batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random log-probs (zero at padding) and non-negative distances, B=4, T=5; every row keeps a token."""
    g = torch.Generator().manual_seed(seed)
    lengths_c, lengths_r = torch.tensor([5, 3, 1, 4]), torch.tensor([2, 5, 4, 1])
    mask_c = torch.arange(5) < lengths_c[:, None]
    mask_r = torch.arange(5) < lengths_r[:, None]

    def rand(mask: torch.Tensor) -> torch.Tensor:
        return -3.0 * torch.rand(mask.shape, generator=g, dtype=dtype) * mask

    return {
        "policy_chosen_logps": rand(mask_c),
        "policy_rejected_logps": rand(mask_r),
        "ref_chosen_logps": rand(mask_c),
        "ref_rejected_logps": rand(mask_r),
        "mask_chosen": mask_c,
        "mask_rejected": mask_r,
        "feature_dist_chosen": torch.rand(4, generator=g, dtype=dtype),
        "feature_dist_rejected": torch.rand(4, generator=g, dtype=dtype),
    }


# --------------------------------------------------------------------------------------------------
# pool_features


def test_pool_features_by_hand():
    """B=3, T=3, F=2; mask [[1, 1, 0], [1, 0, 0], [0, 0, 0]], padded positions hold large values.

    row 0: ([1, 2] + [3, 0]) / 2 = [2, 1]      (not / 3, the padded length)
    row 1: [4, 6] / 1 = [4, 6]
    row 2: no tokens → [0, 0]
    """
    codes = t(
        [
            [[1.0, 2.0], [3.0, 0.0], [100.0, 100.0]],
            [[4.0, 6.0], [50.0, 50.0], [50.0, 50.0]],
            [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]],
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    expected = t([[2.0, 1.0], [4.0, 6.0], [0.0, 0.0]])
    assert_close(pool_features(codes, mask), expected)
    assert_close(pool_features(codes, mask.float()), expected)


def test_pool_features_padding_invariant():
    """Appending padded tokens (any values, mask 0) does not change the pooled codes."""
    g = torch.Generator().manual_seed(1)
    codes = torch.rand(3, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    padded_codes = torch.cat([codes, 9.0 * torch.ones(3, 3, 6, dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    assert_close(pool_features(padded_codes, padded_mask), pool_features(codes, mask))


def test_pool_features_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T, F\]"):
        pool_features(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask shape"):
        pool_features(torch.zeros(2, 3, 4), torch.ones(2, 4))


# --------------------------------------------------------------------------------------------------
# feature_distance


@pytest.mark.parametrize(
    ("index_set", "expected"),
    [
        # row 0: I = {1, 3}: (1 + 6.25) / 2 = 3.625      row 1: I = {0, 2}: (1 + 1) / 2 = 1
        ("reference", [3.625, 1.0]),
        # row 0: I = {1, 4}: (1 + 2.25) / 2 = 1.625      row 1: I = {0, 2}: (1 + 1) / 2 = 1
        ("policy", [1.625, 1.0]),
        # row 0: I = {1, 3, 4}: (1 + 6.25 + 2.25) / 3 = 9.5 / 3      row 1: I = {0, 2}: 2 / 2 = 1
        ("union", [9.5 / 3, 1.0]),
    ],
)
def test_feature_distance_by_hand(index_set: str, expected: list[float]):
    """Hand values of the module docstring, k = 2; the union divides by |I| (3 in row 0, 2 in row 1)."""
    policy, ref = pooled_pair()
    assert_close(feature_distance(policy, ref, k=2, index_set=index_set), t(expected))


def test_feature_distance_default_is_reference_top_k():
    policy, ref = pooled_pair()
    assert_close(feature_distance(policy, ref, k=2), t([3.625, 1.0]))


@pytest.mark.parametrize("index_set", INDEX_SETS)
def test_feature_distance_k_larger_than_f_clamps(index_set: str):
    """k = 10 > F = 5 selects every feature, for every index set:

    row 0: (1 + 1 + 1 + 6.25 + 2.25) / 5 = 11.5 / 5 = 2.3
    row 1: (1 + 0.25 + 1 + 0.04 + 2.25) / 5 = 4.54 / 5 = 0.908
    """
    policy, ref = pooled_pair()
    assert_close(feature_distance(policy, ref, k=10, index_set=index_set), t([2.3, 0.908]))
    assert_close(
        feature_distance(policy, ref, k=10, index_set=index_set),
        feature_distance(policy, ref, k=5, index_set=index_set),
    )


def test_feature_distance_rejects_unknown_index_set():
    policy, ref = pooled_pair()
    with pytest.raises(ValueError, match="reference, policy, union"):
        feature_distance(policy, ref, k=2, index_set="intersection")


def test_feature_distance_rejects_bad_arguments():
    policy, ref = pooled_pair()
    with pytest.raises(ValueError, match="k must be"):
        feature_distance(policy, ref, k=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        feature_distance(policy, ref[:, :4], k=2)
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        feature_distance(policy[0], ref[0], k=2)


@pytest.mark.parametrize(
    ("index_set", "expected_grad"),
    [
        # dD/dc̄_θ[b, i] = 2 (c̄_θ − c̄_ref)[b, i] / |I_b| on I_b, 0 elsewhere.
        # row 0, I = {1, 3}: [0, 2·1/2, 0, 2·(−2.5)/2, 0];  row 1, I = {0, 2}: [2·(−1)/2, 0, 2·1/2, 0, 0]
        ("reference", [[0.0, 1.0, 0.0, -2.5, 0.0], [-1.0, 0.0, 1.0, 0.0, 0.0]]),
        # row 0, I = {1, 4}: [0, 1, 0, 0, 2·1.5/2]
        ("policy", [[0.0, 1.0, 0.0, 0.0, 1.5], [-1.0, 0.0, 1.0, 0.0, 0.0]]),
        # row 0, I = {1, 3, 4}: [0, 2/3, 0, −5/3, 3/3]
        ("union", [[0.0, 2 / 3, 0.0, -5 / 3, 1.0], [-1.0, 0.0, 1.0, 0.0, 0.0]]),
    ],
)
def test_feature_distance_gradient_only_through_values(index_set: str, expected_grad: list):
    """The selection is detached: the gradient is that of the squared differences at the selected
    indices and exactly zero at the others (even where the policy value decided the selection)."""
    policy, ref = pooled_pair(torch.float64)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    feature_distance(policy, ref, k=2, index_set=index_set).sum().backward()
    expected = t(expected_grad, torch.float64)
    assert_close(policy.grad, expected)
    assert_close(ref.grad, -expected)


@pytest.mark.parametrize("index_set", INDEX_SETS)
def test_gradcheck_pool_and_distance(index_set: str):
    """Analytic gradients of feature_distance(pool_features(codes, mask), ref) match finite differences
    (float64) w.r.t. the policy's per-token codes, padding included (where they are zero)."""
    g = torch.Generator().manual_seed(3)
    codes = torch.rand(3, 4, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    ref = torch.rand(3, 8, generator=g, dtype=torch.float64)

    def fn(policy_codes: torch.Tensor) -> torch.Tensor:
        return feature_distance(pool_features(policy_codes, mask), ref, k=3, index_set=index_set)

    assert torch.autograd.gradcheck(fn, (codes.clone().requires_grad_(True),))


# --------------------------------------------------------------------------------------------------
# active_features


def test_active_features():
    """Non-zero counts per row [2, 1, 0] → mean 1.0; detached."""
    pooled = t([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]).requires_grad_(True)
    value = active_features(pooled)
    assert_close(value, torch.tensor(1.0))
    assert not value.requires_grad


# --------------------------------------------------------------------------------------------------
# fpo_loss


def test_fpo_by_hand():
    """β = 0.5, α = 0.5 (αβ = 0.25). u = β(ā_w − ā_l) − αβ(D_l − D_w):

      pair 1: 0.5 · (1/4 + 1/6) − 0.25 · (1.0 − 0.4) = 5/24 − 0.15
      pair 2: 0.5 · (1/3 + 1)   − 0.25 · (0.6 − 0.2) = 2/3 − 0.1
    loss_i = −log σ(u_i) = softplus(−u_i).
    reward part β(ā_w − ā_l) = [5/24, 2/3] → mean (5/24 + 16/24) / 2 = 7/16;
    feature part −αβ(D_l − D_w) = [−0.15, −0.1] → mean −0.125.
    rewards β·ā: chosen mean(1/8, 1/6) = 7/48, rejected mean(−1/12, −1/2) = −7/24, margin 7/48 + 14/48 = 7/16.
    logps (summed): chosen mean(−3, −2) = −2.5, rejected mean(−4, −3) = −3.5.
    feature distances: chosen mean(0.4, 0.2) = 0.3, rejected mean(1.0, 0.6) = 0.8.
    """
    out = fpo_loss(**batch(), beta=0.5, alpha=0.5)
    assert isinstance(out, LossOutput)
    u = [5 / 24 - 0.15, 2 / 3 - 0.1]
    expected = t([softplus(-u[0]), softplus(-u[1])])
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    m = out.metrics
    assert m.keys() == FPO_KEYS
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())
    assert_close(m["logits/reward_part"], torch.tensor(7 / 16))
    assert_close(m["logits/feature_part"], torch.tensor(-0.125))
    assert_close(m["rewards/chosen"], torch.tensor(7 / 48))
    assert_close(m["rewards/rejected"], torch.tensor(-7 / 24))
    assert_close(m["rewards/margins"], torch.tensor(7 / 16))
    assert_close(m["rewards/accuracies"], torch.tensor(1.0))
    assert_close(m["logps/chosen"], torch.tensor(-2.5))
    assert_close(m["logps/rejected"], torch.tensor(-3.5))
    assert_close(m["fpo/feature_dist_chosen"], torch.tensor(0.3))
    assert_close(m["fpo/feature_dist_rejected"], torch.tensor(0.8))


def test_fpo_logit_parts_sum_to_u():
    b = random_batch(seed=2)
    out = fpo_loss(**b, beta=0.3, alpha=0.7)
    u = out.metrics["logits/reward_part"] + out.metrics["logits/feature_part"]
    # per-pair u recovered from the loss: u = −softplus⁻¹(loss) = log(e^{-loss}/(1 − e^{-loss}))
    p = torch.exp(-out.per_example)
    assert_close(torch.log(p / (1 - p)).mean(), u)


def test_fpo_stop_grad_setting_does_not_change_value():
    b = random_batch(seed=3)
    assert_close(
        fpo_loss(**b, stop_grad_chosen=True).per_example, fpo_loss(**b, stop_grad_chosen=False).per_example
    )


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_fpo_alpha_zero_is_length_normalised_dpo(beta: float):
    """α = 0 leaves −log σ(β(ā_w − ā_l)), computed here with plain Python per row."""
    b = random_batch(seed=4)
    out = fpo_loss(**b, beta=beta, alpha=0.0)

    def mean_ratio(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, row: int) -> float:
        values = [float(policy[row, j] - ref[row, j]) for j in range(policy.shape[1]) if mask[row, j]]
        return sum(values) / len(values)

    expected = []
    for row in range(4):
        a_w = mean_ratio(b["policy_chosen_logps"], b["ref_chosen_logps"], b["mask_chosen"], row)
        a_l = mean_ratio(b["policy_rejected_logps"], b["ref_rejected_logps"], b["mask_rejected"], row)
        expected.append(-math.log(sigmoid(beta * (a_w - a_l))))
    assert_close(out.per_example, t(expected, torch.float64))
    assert_close(out.metrics["logits/feature_part"], torch.tensor(0.0, dtype=torch.float64))


def test_fpo_at_reference_is_log2():
    """policy == reference and D_w == D_l ⇒ u = 0 ⇒ loss = log 2 for every pair."""
    b = random_batch(seed=5)
    b["policy_chosen_logps"] = b["ref_chosen_logps"].clone()
    b["policy_rejected_logps"] = b["ref_rejected_logps"].clone()
    b["feature_dist_rejected"] = b["feature_dist_chosen"].clone()
    out = fpo_loss(**b, beta=0.4, alpha=0.9)
    assert_close(out.per_example, torch.full((4,), math.log(2.0), dtype=torch.float64))
    assert_close(out.loss, torch.tensor(math.log(2.0), dtype=torch.float64))


def test_fpo_stop_gradient_on_chosen_distance():
    """stop_grad_chosen=True: dL/dD_w is exactly 0; dL/dD_l = αβ σ(−u)/B > 0 (a larger rejected drift
    lowers u and raises the loss). Checked on the hand batch: u = [5/24 − 0.15, 2/3 − 0.1], B = 2."""
    b = batch(torch.float64)
    b["feature_dist_chosen"].requires_grad_(True)
    b["feature_dist_rejected"].requires_grad_(True)
    loss = fpo_loss(**b, beta=0.5, alpha=0.5).loss
    grad_w, grad_l = torch.autograd.grad(
        loss,
        [b["feature_dist_chosen"], b["feature_dist_rejected"]],
        allow_unused=True,
        materialize_grads=True,
    )
    assert torch.equal(grad_w, torch.zeros_like(grad_w))
    u = [5 / 24 - 0.15, 2 / 3 - 0.1]
    expected_l = t([0.25 * sigmoid(-x) / 2 for x in u], torch.float64)
    assert_close(grad_l, expected_l)
    assert (grad_l > 0).all()


def test_fpo_without_stop_gradient_reaches_both_distances():
    """stop_grad_chosen=False: dL/dD_w = −αβ σ(−u)/B < 0 and dL/dD_l = +αβ σ(−u)/B > 0."""
    b = batch(torch.float64)
    b["feature_dist_chosen"].requires_grad_(True)
    b["feature_dist_rejected"].requires_grad_(True)
    fpo_loss(**b, beta=0.5, alpha=0.5, stop_grad_chosen=False).loss.backward()
    u = [5 / 24 - 0.15, 2 / 3 - 0.1]
    expected_l = t([0.25 * sigmoid(-x) / 2 for x in u], torch.float64)
    assert_close(b["feature_dist_rejected"].grad, expected_l)
    assert_close(b["feature_dist_chosen"].grad, -expected_l)


def test_fpo_gradient_direction_on_logps():
    """Descent raises the chosen policy log-probs and lowers the rejected ones; padding gets no gradient."""
    b = {k: v.clone() for k, v in random_batch(seed=6).items()}
    b["policy_chosen_logps"].requires_grad_(True)
    b["policy_rejected_logps"].requires_grad_(True)
    fpo_loss(**b).loss.backward()
    gc, gr = b["policy_chosen_logps"].grad, b["policy_rejected_logps"].grad
    assert (gc[b["mask_chosen"]] < 0).all() and (gc[~b["mask_chosen"]] == 0).all()
    assert (gr[b["mask_rejected"]] > 0).all() and (gr[~b["mask_rejected"]] == 0).all()


@pytest.mark.parametrize("stop_grad_chosen", [True, False])
def test_gradcheck_fpo(stop_grad_chosen: bool):
    """With the stop-gradient, feature_dist_chosen is left out: its analytic gradient is 0 on purpose
    while the value depends on it (tested above)."""
    b = random_batch(seed=7)
    keys = [*LOGP_KEYS, "feature_dist_rejected"] + ([] if stop_grad_chosen else ["feature_dist_chosen"])
    inputs = tuple(b[k].clone().requires_grad_(True) for k in keys)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        new = dict(zip(keys, tensors, strict=True))
        return fpo_loss(**{**b, **new}, beta=0.7, alpha=0.6, stop_grad_chosen=stop_grad_chosen).per_example

    assert torch.autograd.gradcheck(fn, inputs)


def test_fpo_padding_invariant():
    """Extra padded columns (garbage values, mask 0) change neither the loss nor the metrics."""
    b = random_batch(seed=8)
    padded = dict(b)
    for key in LOGP_KEYS:
        padded[key] = torch.cat([b[key], torch.full((4, 3), -7.0, dtype=torch.float64)], dim=1)
    for key in ("mask_chosen", "mask_rejected"):
        padded[key] = torch.cat([b[key], torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    out, out_padded = fpo_loss(**b), fpo_loss(**padded)
    assert_close(out_padded.per_example, out.per_example)
    assert out_padded.metrics.keys() == out.metrics.keys()
    for name in out.metrics:
        assert_close(out_padded.metrics[name], out.metrics[name])


def test_fpo_end_to_end_padding_invariant():
    """codes → pool_features → feature_distance → fpo_loss does not depend on padding length."""
    g = torch.Generator().manual_seed(9)
    b = random_batch(seed=9)

    def distances(pad: int, mask: torch.Tensor) -> torch.Tensor:
        codes = torch.rand(4, 5, 16, generator=g, dtype=torch.float64) * mask[..., None]
        ref = torch.rand(4, 5, 16, generator=g, dtype=torch.float64) * mask[..., None]
        pad_block = torch.full((4, pad, 16), 5.0, dtype=torch.float64)
        padded_mask = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], dim=1)
        d = feature_distance(pool_features(codes, mask), pool_features(ref, mask), k=4, index_set="union")
        d_pad = feature_distance(
            pool_features(torch.cat([codes, pad_block], 1), padded_mask),
            pool_features(torch.cat([ref, pad_block], 1), padded_mask),
            k=4,
            index_set="union",
        )
        assert_close(d_pad, d)
        return d

    b["feature_dist_chosen"] = distances(2, b["mask_chosen"])
    b["feature_dist_rejected"] = distances(3, b["mask_rejected"])
    out = fpo_loss(**b)
    assert torch.isfinite(out.loss)


def test_fpo_uses_mean_not_sum_log_ratio():
    """ā is the masked mean: repeating a response's per-token log-ratio over more tokens leaves u unchanged.

    Both pairs have Δ_w = 0.5 per token and Δ_l = −0.5 per token, over 1 token in pair 1 and 3 in pair 2,
    so ā_w − ā_l = 1 in both: u = β · 1 − αβ(0.2 − 0.2) = 0.5 for β = 0.5.
    """
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    out = fpo_loss(
        policy_chosen_logps=0.5 * mask.double(),
        policy_rejected_logps=-0.5 * mask.double(),
        ref_chosen_logps=zeros,
        ref_rejected_logps=zeros,
        mask_chosen=mask,
        mask_rejected=mask,
        feature_dist_chosen=t([0.2, 0.2], torch.float64),
        feature_dist_rejected=t([0.2, 0.2], torch.float64),
        beta=0.5,
    )
    assert_close(out.per_example, t([softplus(-0.5)] * 2, torch.float64))


def test_fpo_rejects_bad_arguments():
    b = batch()
    with pytest.raises(ValueError, match="alpha"):
        fpo_loss(**b, alpha=-0.1)
    with pytest.raises(ValueError, match="feature_dist_rejected"):
        fpo_loss(**{**b, "feature_dist_rejected": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="feature_dist_chosen"):
        fpo_loss(**{**b, "feature_dist_chosen": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape mismatch"):
        fpo_loss(**{**b, "mask_rejected": torch.ones(2, 4, dtype=torch.bool)})
