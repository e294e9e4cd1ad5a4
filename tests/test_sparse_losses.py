"""Tests for the token-level losses: TDPO (1 and 2) and SparsePO (with MaPO as a special case).

The hand-checked batch extends the one of ``test_losses.py`` (B=2, T=3) with per-token KL values:

    policy_chosen   = [[-1.0, -2.0,  0.0], [-0.5, -0.5, -1.0]]   mask_chosen   = [[1, 1, 0], [1, 1, 1]]
    ref_chosen      = [[-1.5, -2.0,  0.0], [-1.0, -1.0, -1.0]]
    policy_rejected = [[-2.0, -1.0, -1.0], [-3.0,  0.0,  0.0]]   mask_rejected = [[1, 1, 1], [1, 0, 0]]
    ref_rejected    = [[-1.5, -1.0, -1.0], [-2.0,  0.0,  0.0]]
    kl_chosen       = [[ 0.2,  0.4,  0.0], [ 0.1,  0.1,  0.3]]
    kl_rejected     = [[ 0.5,  0.3,  0.2], [ 0.3,  0.0,  0.0]]

Per-token log-ratios Δ = policy − ref:
    Δ_chosen   = [[0.5, 0.0, ·], [0.5, 0.5, 0.0]]      Δ_rejected = [[-0.5, 0.0, 0.0], [-1.0, ·, ·]]
Summed over the response tokens:
    S_w = [0.5, 1.0]     S_l = [-0.5, -1.0]     K_w = [0.6, 0.5]     K_l = [1.0, 0.3]
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import LossOutput, dpo_loss, masked_sum, sparsepo_loss, tdpo_loss

PAIRED_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}
TDPO_KEYS = PAIRED_KEYS | {"kl/chosen", "kl/rejected", "logits/reward_part", "logits/kl_part"}
SPARSEPO_KEYS = (
    TDPO_KEYS
    | {"l1_penalty", "masked_kl/chosen", "masked_kl/rejected"}
    | {
        f"mask/{stat}_{kind}_{side}"
        for stat in ("sparsity", "mean")
        for kind in ("reward", "kl")
        for side in ("chosen", "rejected")
    }
)
LOGP_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
MASK_KEYS = ("reward_mask_chosen", "reward_mask_rejected", "kl_mask_chosen", "kl_mask_rejected")


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def batch(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The hand-checked batch from the module docstring (inputs of tdpo_loss)."""
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], dtype),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]], dtype),
        "ref_chosen_logps": t([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]], dtype),
        "ref_rejected_logps": t([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]], dtype),
        "kl_chosen": t([[0.2, 0.4, 0.0], [0.1, 0.1, 0.3]], dtype),
        "kl_rejected": t([[0.5, 0.3, 0.2], [0.3, 0.0, 0.0]], dtype),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
    }


def hand_masks(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Non-trivial masks for the hand batch; the large values sit at padded positions and must not count.

    reward chosen   [[2.0, 1.0, (9.0)], [0.0, 1.0, 0.5]]    ‖·‖₁ = [3.0, 1.5]
    reward rejected [[1.0, 0.0,  0.5 ], [0.5, (7), (7)]]    ‖·‖₁ = [1.5, 0.5]
    kl chosen       [[0.5, 1.0, (3.0)], [1.0, 0.0, 2.0]]    ‖·‖₁ = [1.5, 3.0]
    kl rejected     [[0.0, 1.0,  1.0 ], [2.0, (5), (5)]]    ‖·‖₁ = [2.0, 2.0]
    """
    return {
        "reward_mask_chosen": t([[2.0, 1.0, 9.0], [0.0, 1.0, 0.5]], dtype),
        "reward_mask_rejected": t([[1.0, 0.0, 0.5], [0.5, 7.0, 7.0]], dtype),
        "kl_mask_chosen": t([[0.5, 1.0, 3.0], [1.0, 0.0, 2.0]], dtype),
        "kl_mask_rejected": t([[0.0, 1.0, 1.0], [2.0, 5.0, 5.0]], dtype),
    }


def random_batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random log-probs and non-negative KLs, B=4, T=5, zero at padding; every row keeps one token."""
    g = torch.Generator().manual_seed(seed)
    lengths_c, lengths_r = torch.tensor([5, 3, 1, 4]), torch.tensor([2, 5, 4, 1])
    mask_c = torch.arange(5) < lengths_c[:, None]
    mask_r = torch.arange(5) < lengths_r[:, None]

    def rand(mask: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * torch.rand(mask.shape, generator=g, dtype=dtype) * mask

    return {
        "policy_chosen_logps": rand(mask_c, -3.0),
        "policy_rejected_logps": rand(mask_r, -3.0),
        "ref_chosen_logps": rand(mask_c, -3.0),
        "ref_rejected_logps": rand(mask_r, -3.0),
        "kl_chosen": rand(mask_c, 0.5),
        "kl_rejected": rand(mask_r, 0.5),
        "mask_chosen": mask_c,
        "mask_rejected": mask_r,
    }


def random_masks(
    seed: int = 0, shape: tuple[int, int] = (4, 5), dtype=torch.float64
) -> dict[str, torch.Tensor]:
    """Random mask values in [0, 2) with some exact zeros (like ReLU outputs)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in MASK_KEYS:
        values = 2 * torch.rand(shape, generator=g, dtype=dtype)
        out[key] = torch.where(values < 0.4, torch.zeros_like(values), values)
    return out


def ones_masks(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shape, dtype = b["kl_chosen"].shape, b["kl_chosen"].dtype
    return {key: torch.ones(shape, dtype=dtype) for key in MASK_KEYS}


# --- TDPO by hand --------------------------------------------------------------------------------------


def test_tdpo1_by_hand():
    """β = 0.5. TDPO1 logit = β[(S_w − S_l) − (K_l − K_w)]:

      pair 1: 0.5 · [(0.5 + 0.5) − (1.0 − 0.6)] = 0.5 · 0.6 = 0.3
      pair 2: 0.5 · [(1.0 + 1.0) − (0.3 − 0.5)] = 0.5 · 2.2 = 1.1
    loss_i = −log σ(logit_i) = softplus(−logit_i).
    reward part β(S_w − S_l) = [0.5, 1.0] → mean 0.75; KL part β(K_w − K_l) = [−0.2, 0.1] → mean −0.05.
    rewards β·S: chosen mean(0.25, 0.5) = 0.375, rejected −0.375. kl/chosen = mean(0.6, 0.5) = 0.55,
    kl/rejected = mean(1.0, 0.3) = 0.65.
    """
    out = tdpo_loss(**batch(), beta=0.5)
    expected = t([softplus(-0.3), softplus(-1.1)])
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    m = out.metrics
    assert m.keys() == TDPO_KEYS
    assert_close(m["logits/reward_part"], torch.tensor(0.75))
    assert_close(m["logits/kl_part"], torch.tensor(-0.05))
    assert_close(m["rewards/chosen"], torch.tensor(0.375))
    assert_close(m["rewards/rejected"], torch.tensor(-0.375))
    assert_close(m["rewards/accuracies"], torch.tensor(1.0))
    assert_close(m["kl/chosen"], torch.tensor(0.55))
    assert_close(m["kl/rejected"], torch.tensor(0.65))
    assert_close(m["logps/chosen"], torch.tensor(-2.5))
    assert_close(m["logps/rejected"], torch.tensor(-3.5))


def test_tdpo2_by_hand():
    """β = 0.5, α = 0.5. TDPO2 logit = β[(S_w − S_l) − α(K_l − K_w)]:

      pair 1: 0.5 · [1.0 − 0.5 · 0.4] = 0.5 · 0.8 = 0.4
      pair 2: 0.5 · [2.0 − 0.5 · (−0.2)] = 0.5 · 2.1 = 1.05
    KL part βα(K_w − K_l) = [−0.1, 0.05] → mean −0.025.
    """
    out = tdpo_loss(**batch(), beta=0.5, alpha=0.5)
    assert_close(out.per_example, t([softplus(-0.4), softplus(-1.05)]))
    assert_close(out.metrics["logits/kl_part"], torch.tensor(-0.025))
    assert_close(out.metrics["logits/reward_part"], torch.tensor(0.75))


def test_tdpo2_alpha_one_has_tdpo1_value():
    """With α = 1 the values agree; only the gradient differs (stop-gradient on the chosen KL)."""
    b = random_batch(seed=5)
    assert_close(tdpo_loss(**b, beta=0.3, alpha=1.0).per_example, tdpo_loss(**b, beta=0.3).per_example)


def test_tdpo2_stop_gradient_on_chosen_kl():
    b = {k: v.clone() for k, v in random_batch(seed=6).items()}
    b["kl_chosen"].requires_grad_(True)
    b["kl_rejected"].requires_grad_(True)
    loss = tdpo_loss(**b, beta=0.5, alpha=0.5).loss
    grad_w, grad_l = torch.autograd.grad(
        loss, [b["kl_chosen"], b["kl_rejected"]], allow_unused=True, materialize_grads=True
    )
    assert torch.equal(grad_w, torch.zeros_like(grad_w))
    assert (grad_l[b["mask_rejected"]] > 0).all()
    assert (grad_l[~b["mask_rejected"]] == 0).all()


def test_tdpo1_gradient_reaches_both_kls():
    """TDPO1 has no stop-gradient: d loss / d KL_w < 0 (a larger chosen KL raises the logit), d / d KL_l > 0."""
    b = {k: v.clone() for k, v in random_batch(seed=6).items()}
    b["kl_chosen"].requires_grad_(True)
    b["kl_rejected"].requires_grad_(True)
    tdpo_loss(**b, beta=0.5).loss.backward()
    assert (b["kl_chosen"].grad[b["mask_chosen"]] < 0).all()
    assert (b["kl_rejected"].grad[b["mask_rejected"]] > 0).all()


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_tdpo_zero_kl_is_dpo(alpha: float | None):
    b = random_batch(seed=7)
    b["kl_chosen"] = torch.zeros_like(b["kl_chosen"])
    b["kl_rejected"] = torch.zeros_like(b["kl_rejected"])
    out = tdpo_loss(**b, beta=0.4, alpha=alpha)
    dpo = dpo_loss(*(b[k] for k in LOGP_KEYS), b["mask_chosen"], b["mask_rejected"], beta=0.4)
    assert_close(out.per_example, dpo.per_example)
    for key in PAIRED_KEYS:
        assert_close(out.metrics[key], dpo.metrics[key])


def test_tdpo_rejects_negative_alpha():
    with pytest.raises(ValueError, match="alpha"):
        tdpo_loss(**batch(), alpha=-0.1)


# --- SparsePO by hand ----------------------------------------------------------------------------------


def test_sparsepo_by_hand():
    """β = 0.5, masks of :func:`hand_masks`, λ_u = 0.1, λ_d = 0.2, independent masks.

    U = Σ m_u Δ:  U_w = [2·0.5 + 1·0.0, 0·0.5 + 1·0.5 + 0.5·0.0] = [1.0, 0.5]
                  U_l = [1·(−0.5) + 0 + 0.5·0, 0.5·(−1.0)]       = [−0.5, −0.5]
    K = Σ m_d KL: K_w = [0.5·0.2 + 1·0.4, 1·0.1 + 0·0.1 + 2·0.3] = [0.5, 0.7]
                  K_l = [0·0.5 + 1·0.3 + 1·0.2, 2·0.3]           = [0.5, 0.6]
    z = (U_w + K_w) − (U_l + K_l) = [1.5 − 0.0, 1.2 − 0.1] = [1.5, 1.1];  βz = [0.75, 0.55]
    L1 = λ_u(‖m_u,w‖ + ‖m_u,l‖) + λ_d(‖m_d,w‖ + ‖m_d,l‖)
       = [0.1·(3.0 + 1.5) + 0.2·(1.5 + 2.0), 0.1·(1.5 + 0.5) + 0.2·(3.0 + 2.0)] = [1.15, 1.2]
    loss_i = softplus(−βz_i) + L1_i.

    Metrics: rewards β·U: chosen mean(0.5, 0.25) = 0.375, rejected mean(−0.25, −0.25) = −0.25, accuracy 1.
    reward part β(U_w − U_l) = [0.75, 0.5] → 0.625; KL part β(K_w − K_l) = [0.0, 0.05] → 0.025 (> 0:
    the chosen side's masked KL is larger, which *raises* the logit, as in the loss).
    kl/chosen, kl/rejected: unmasked summed KL means 0.55 and 0.65. l1_penalty = mean(1.15, 1.2) = 1.175.
    Mask statistics over the response tokens (5 chosen, 4 rejected):
      reward chosen  [2, 1 | 0, 1, 0.5]: 1 zero → 20 %, mean 4.5 / 5 = 0.9
      reward rej.    [1, 0, 0.5 | 0.5]:  1 zero → 25 %, mean 2.0 / 4 = 0.5
      kl chosen      [0.5, 1 | 1, 0, 2]: 1 zero → 20 %, mean 4.5 / 5 = 0.9
      kl rejected    [0, 1, 1 | 2]:      1 zero → 25 %, mean 4.0 / 4 = 1.0
    """
    out = sparsepo_loss(**batch(), **hand_masks(), beta=0.5, l1_reward=0.1, l1_kl=0.2)
    expected = t([softplus(-0.75) + 1.15, softplus(-0.55) + 1.2])
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    m = out.metrics
    assert m.keys() == SPARSEPO_KEYS
    # the per-side masked KL terms (beta * K) add up to the KL part of the logit
    assert_close(m["masked_kl/chosen"] - m["masked_kl/rejected"], m["logits/kl_part"])
    expected_metrics = {
        "rewards/chosen": 0.375,
        "rewards/rejected": -0.25,
        "rewards/margins": 0.625,
        "rewards/accuracies": 1.0,
        "logps/chosen": -2.5,
        "logps/rejected": -3.5,
        "logits/reward_part": 0.625,
        "logits/kl_part": 0.025,
        "kl/chosen": 0.55,
        "kl/rejected": 0.65,
        "l1_penalty": 1.175,
        "mask/sparsity_reward_chosen": 20.0,
        "mask/sparsity_reward_rejected": 25.0,
        "mask/sparsity_kl_chosen": 20.0,
        "mask/sparsity_kl_rejected": 25.0,
        "mask/mean_reward_chosen": 0.9,
        "mask/mean_reward_rejected": 0.5,
        "mask/mean_kl_chosen": 0.9,
        "mask/mean_kl_rejected": 1.0,
    }
    for key, value in expected_metrics.items():
        assert_close(m[key], torch.tensor(value), msg=key)
    assert m["logits/kl_part"] > 0


def test_sparsepo_shared_mask_by_hand():
    """One mask m = the reward masks of :func:`hand_masks` for both terms, λ_u = λ_d = 0.1, β = 0.5.

    U as before: U_w = [1.0, 0.5], U_l = [−0.5, −0.5].
    K = Σ m KL:  K_w = [2·0.2 + 1·0.4, 0·0.1 + 1·0.1 + 0.5·0.3] = [0.8, 0.25]
                 K_l = [1·0.5 + 0·0.3 + 0.5·0.2, 0.5·0.3]       = [0.6, 0.15]
    z = [(1.0 + 0.8) − (−0.5 + 0.6), (0.5 + 0.25) − (−0.5 + 0.15)] = [1.7, 1.1];  βz = [0.85, 0.55]
    Shared: each λ halved, so L1 = 0.05·(‖m_w‖ + ‖m_l‖) · 2 = 0.1·(‖m_w‖ + ‖m_l‖) = 0.1·[4.5, 2.0] = [0.45, 0.2]
    (unshared it would be twice that, [0.9, 0.4]).
    """
    masks = hand_masks()
    shared = {
        "reward_mask_chosen": masks["reward_mask_chosen"],
        "reward_mask_rejected": masks["reward_mask_rejected"],
        "kl_mask_chosen": masks["reward_mask_chosen"],
        "kl_mask_rejected": masks["reward_mask_rejected"],
    }
    out = sparsepo_loss(**batch(), **shared, beta=0.5, l1_reward=0.1, l1_kl=0.1, shared_mask=True)
    assert_close(out.per_example, t([softplus(-0.85) + 0.45, softplus(-0.55) + 0.2]))
    assert_close(out.metrics["l1_penalty"], torch.tensor(0.325))
    unshared = sparsepo_loss(**batch(), **shared, beta=0.5, l1_reward=0.1, l1_kl=0.1)
    assert_close(unshared.per_example - out.per_example, t([0.45, 0.2]))


@pytest.mark.parametrize(("l1_reward", "l1_kl"), [(0.3, 0.0), (0.0, 0.3)])
def test_sparsepo_each_l1_weight_alone(l1_reward: float, l1_kl: float):
    """Each λ multiplies the L1 norms of its own masks only: [4.5, 2.0] (reward), [3.5, 5.0] (KL)."""
    b, masks = batch(), hand_masks()
    base = sparsepo_loss(**b, **masks, beta=0.5).per_example
    out = sparsepo_loss(**b, **masks, beta=0.5, l1_reward=l1_reward, l1_kl=l1_kl)
    norms = t([4.5, 2.0]) if l1_reward else t([3.5, 5.0])
    assert_close(out.per_example - base, 0.3 * norms)
    halved = sparsepo_loss(**b, **masks, beta=0.5, l1_reward=l1_reward, l1_kl=l1_kl, shared_mask=True)
    assert_close(halved.per_example - base, 0.15 * norms)


# --- SparsePO identities -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bool])
def test_sparsepo_all_ones_is_tdpo1_exactly(mask_dtype: torch.dtype):
    b = random_batch(seed=8)
    ones = {k: v.to(mask_dtype) for k, v in ones_masks(b).items()}
    for shared in (False, True):
        out = sparsepo_loss(**b, **ones, beta=0.3, shared_mask=shared)
        tdpo = tdpo_loss(**b, beta=0.3)
        assert_close(out.per_example, tdpo.per_example, rtol=0, atol=0)
        assert_close(out.loss, tdpo.loss, rtol=0, atol=0)
        for key in TDPO_KEYS:
            assert_close(out.metrics[key], tdpo.metrics[key], rtol=0, atol=0, msg=key)
        assert out.metrics["l1_penalty"] == 0
        assert out.metrics["mask/sparsity_reward_chosen"] == 0
        assert out.metrics["mask/mean_kl_rejected"] == 1


def test_sparsepo_no_kl_mask_is_dpo():
    """m_u ≡ 1, m_d ≡ 0 gives DPO (spec §2.3)."""
    b = random_batch(seed=9)
    masks = ones_masks(b)
    masks["kl_mask_chosen"] = torch.zeros_like(masks["kl_mask_chosen"])
    masks["kl_mask_rejected"] = torch.zeros_like(masks["kl_mask_rejected"])
    out = sparsepo_loss(**b, **masks, beta=0.3)
    dpo = dpo_loss(*(b[k] for k in LOGP_KEYS), b["mask_chosen"], b["mask_rejected"], beta=0.3)
    assert_close(out.per_example, dpo.per_example)


def test_sparsepo_at_reference_is_log2_plus_l1():
    """Policy = reference and zero KL: z = 0 whatever the masks, so loss = log 2 + the L1 term."""
    b = random_batch(seed=10)
    b["ref_chosen_logps"] = b["policy_chosen_logps"].clone()
    b["ref_rejected_logps"] = b["policy_rejected_logps"].clone()
    b["kl_chosen"] = torch.zeros_like(b["kl_chosen"])
    b["kl_rejected"] = torch.zeros_like(b["kl_rejected"])
    masks = random_masks(seed=10)
    out = sparsepo_loss(**b, **masks, beta=0.7, l1_reward=0.01, l1_kl=0.02)
    l1 = 0.01 * (
        masked_sum(masks["reward_mask_chosen"], b["mask_chosen"])
        + masked_sum(masks["reward_mask_rejected"], b["mask_rejected"])
    ) + 0.02 * (
        masked_sum(masks["kl_mask_chosen"], b["mask_chosen"])
        + masked_sum(masks["kl_mask_rejected"], b["mask_rejected"])
    )
    assert_close(out.per_example, math.log(2) + l1)


def test_sparsepo_kl_sign_convention():
    """One token per side, Δ = 0, KL_w = 2, KL_l = 0, β = 1: z = (0 + 2) − (0 + 0) = 2.

    loss = softplus(−2); the KL part β(K_w − K_l) = 2 > 0. Raising the chosen KL lowers the loss, raising
    the rejected KL raises it (z = (U_w + K_w) − (U_l + K_l), not the paper code's logged β(U − K)).
    """
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    inputs = {**dict.fromkeys(LOGP_KEYS, zero), **dict.fromkeys(MASK_KEYS, one)}

    def run(kl_w: float, kl_l: float) -> LossOutput:
        sides = {
            "kl_chosen": t([[kl_w]]),
            "kl_rejected": t([[kl_l]]),
            "mask_chosen": one,
            "mask_rejected": one,
        }
        return sparsepo_loss(**inputs, **sides, beta=1.0)

    out = run(2.0, 0.0)
    assert_close(out.loss, torch.tensor(softplus(-2.0)))
    assert_close(out.metrics["logits/kl_part"], torch.tensor(2.0))
    assert_close(out.metrics["logits/reward_part"], torch.tensor(0.0))
    assert run(3.0, 0.0).loss < out.loss < run(2.0, 1.0).loss


def test_sparsepo_rejects_negative_l1():
    with pytest.raises(ValueError, match="L1"):
        sparsepo_loss(**batch(), **hand_masks(), l1_kl=-1.0)


# --- padding -------------------------------------------------------------------------------------------


LOSSES = {
    "tdpo1": (lambda b: tdpo_loss(**b, beta=0.5), False),
    "tdpo2": (lambda b: tdpo_loss(**b, beta=0.5, alpha=0.3), False),
    "sparsepo": (lambda b: sparsepo_loss(**b, beta=0.5, l1_reward=0.1, l1_kl=0.2), True),
    "sparsepo_shared": (
        lambda b: sparsepo_loss(**b, beta=0.5, l1_reward=0.1, l1_kl=0.1, shared_mask=True),
        True,
    ),
}


def _inputs(with_masks: bool) -> dict[str, torch.Tensor]:
    return {**batch(), **hand_masks()} if with_masks else batch()


@pytest.mark.parametrize("name", list(LOSSES))
def test_extra_padding_column_changes_nothing(name: str):
    """Appending one more padded position (junk values, mask 0) to every tensor leaves everything unchanged."""
    fn, with_masks = LOSSES[name]
    b = _inputs(with_masks)
    padded = {
        k: torch.cat(
            [v, torch.zeros_like(v[:, :1]) if v.dtype == torch.bool else torch.full_like(v[:, :1], 3.0)], 1
        )
        for k, v in b.items()
    }
    out, out_padded = fn(b), fn(padded)
    assert_close(out_padded.per_example, out.per_example)
    assert out_padded.metrics.keys() == out.metrics.keys()
    for key, value in out.metrics.items():
        assert_close(out_padded.metrics[key], value, msg=key)


@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_token_is_ignored(name: str):
    """Junk at a padded position (chosen[0, 2]) in every chosen-side input does not leak in."""
    fn, with_masks = LOSSES[name]
    b = _inputs(with_masks)
    junk = {k: v.clone() for k, v in b.items()}
    for key, value in junk.items():
        if value.is_floating_point() and "chosen" in key:
            value[0, 2] = -7.0 if "logps" in key else 11.0
    out, out_junk = fn(b), fn(junk)
    assert_close(out_junk.per_example, out.per_example)
    for key, value in out.metrics.items():
        assert_close(out_junk.metrics[key], value, msg=key)


# --- gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_gradcheck_tdpo(alpha: float | None):
    """TDPO2 leaves out kl_chosen: its stop-gradient makes the analytic gradient 0 on purpose while the
    value still depends on it (tested separately above)."""
    b = random_batch(seed=11)
    keys = [*LOGP_KEYS, "kl_rejected"] + (["kl_chosen"] if alpha is None else [])
    inputs = tuple(b[k].clone().requires_grad_(True) for k in keys)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return tdpo_loss(**{**b, **dict(zip(keys, tensors, strict=True))}, beta=0.7, alpha=alpha).per_example

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_sparsepo(shared: bool):
    """Gradients w.r.t. log-probs, KLs and all four masks (the masks are strictly positive here, so the
    finite differences do not cross a kink)."""
    b = {**random_batch(seed=12), **{k: v + 0.1 for k, v in random_masks(seed=12).items()}}
    keys = [*LOGP_KEYS, "kl_chosen", "kl_rejected", *MASK_KEYS]
    inputs = tuple(b[k].clone().requires_grad_(True) for k in keys)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        args = {**b, **dict(zip(keys, tensors, strict=True))}
        return sparsepo_loss(**args, beta=0.7, l1_reward=0.05, l1_kl=0.02, shared_mask=shared).per_example

    assert torch.autograd.gradcheck(fn, inputs)


def test_sparsepo_mask_gradient_signs():
    """Spec §2.5: d loss / d m_d(y_w) ∝ −KL_w, d / d m_d(y_l) ∝ +KL_l, d / d m_u ∝ ∓Δ (no L1 here)."""
    b = random_batch(seed=13)
    masks = {k: v.clone().requires_grad_(True) for k, v in ones_masks(b).items()}
    sparsepo_loss(**b, **masks, beta=0.5).loss.backward()
    mc, mr = b["mask_chosen"], b["mask_rejected"]
    assert (masks["kl_mask_chosen"].grad[mc] < 0).all()
    assert (masks["kl_mask_rejected"].grad[mr] > 0).all()
    delta_w = (b["policy_chosen_logps"] - b["ref_chosen_logps"])[mc]
    delta_l = (b["policy_rejected_logps"] - b["ref_rejected_logps"])[mr]
    assert (torch.sign(masks["reward_mask_chosen"].grad[mc]) == -torch.sign(delta_w)).all()
    assert (torch.sign(masks["reward_mask_rejected"].grad[mr]) == torch.sign(delta_l)).all()
    for key, mask in (("reward_mask_chosen", mc), ("kl_mask_rejected", mr)):
        assert (masks[key].grad[~mask] == 0).all()


# --- metrics and shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_output_shapes(name: str):
    fn, with_masks = LOSSES[name]
    b = {**random_batch(), **(random_masks() if with_masks else {})}
    b = {k: v.float().requires_grad_(True) if v.is_floating_point() else v for k, v in b.items()}
    out = fn(b)
    assert isinstance(out, LossOutput)
    assert out.per_example.shape == (4,)
    assert out.loss.shape == ()
    assert out.loss.requires_grad
    assert_close(out.loss, out.per_example.mean())
    assert out.metrics.keys() == (SPARSEPO_KEYS if with_masks else TDPO_KEYS)
    for value in out.metrics.values():
        assert value.shape == () and not value.requires_grad


def test_shape_mismatch_raises():
    b = {**batch(), **hand_masks()}
    b["kl_mask_rejected"] = b["kl_mask_rejected"][:, :2]
    with pytest.raises(ValueError, match="shape mismatch"):
        sparsepo_loss(**b)
    b = batch()
    b["kl_chosen"] = b["kl_chosen"][:1]
    with pytest.raises(ValueError, match="shape mismatch"):
        tdpo_loss(**b)
