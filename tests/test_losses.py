"""Tests for the pure loss functions: hand-derived values, identities, gradients and metrics.

Most tests share one batch (B=2, T=3) whose sums and means are easy to do by hand:

    policy_chosen   = [[-1.0, -2.0,  0.0], [-0.5, -0.5, -1.0]]   mask_chosen   = [[1, 1, 0], [1, 1, 1]]
    ref_chosen      = [[-1.5, -2.0,  0.0], [-1.0, -1.0, -1.0]]
    policy_rejected = [[-2.0, -1.0, -1.0], [-3.0,  0.0,  0.0]]   mask_rejected = [[1, 1, 1], [1, 0, 0]]
    ref_rejected    = [[-1.5, -1.0, -1.0], [-2.0,  0.0,  0.0]]

Summed over the response tokens:
    Σ policy_chosen   = [-3.0, -2.0]     Σ ref_chosen   = [-3.5, -3.0]   chosen log-ratio   = [ 0.5,  1.0]
    Σ policy_rejected = [-4.0, -3.0]     Σ ref_rejected = [-3.5, -2.0]   rejected log-ratio = [-0.5, -1.0]
Lengths: chosen [2, 3], rejected [3, 1].
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import (
    LossOutput,
    dpo_loss,
    ipo_loss,
    kto_loss,
    masked_mean,
    masked_sum,
    sft_loss,
    simpo_loss,
)

PAIRED_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def t(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def batch(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The hand-checked batch from the module docstring."""
    return {
        "policy_chosen_logps": t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], dtype),
        "policy_rejected_logps": t([[-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]], dtype),
        "ref_chosen_logps": t([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]], dtype),
        "ref_rejected_logps": t([[-1.5, -1.0, -1.0], [-2.0, 0.0, 0.0]], dtype),
        "mask_chosen": torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        "mask_rejected": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
    }


def without_ref(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if not k.startswith("ref_")}


def random_batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random negative log-probs, B=4, T=5, zero at padding; every row keeps at least one token."""
    g = torch.Generator().manual_seed(seed)
    lengths_c, lengths_r = torch.tensor([5, 3, 1, 4]), torch.tensor([2, 5, 4, 1])
    mask_c = torch.arange(5) < lengths_c[:, None]
    mask_r = torch.arange(5) < lengths_r[:, None]

    def logps(mask: torch.Tensor) -> torch.Tensor:
        return -3 * torch.rand(mask.shape, generator=g, dtype=dtype) * mask

    return {
        "policy_chosen_logps": logps(mask_c),
        "policy_rejected_logps": logps(mask_r),
        "ref_chosen_logps": logps(mask_c),
        "ref_rejected_logps": logps(mask_r),
        "mask_chosen": mask_c,
        "mask_rejected": mask_r,
    }


# The losses called on a full paired batch (SFT sees the chosen side only).
LOSSES = {
    "dpo": lambda b: dpo_loss(**b, beta=0.5),
    "cdpo": lambda b: dpo_loss(**b, beta=0.5, label_smoothing=0.25),
    "ipo": lambda b: ipo_loss(**b, tau=0.5),
    "simpo": lambda b: simpo_loss(**without_ref(b), beta=2.0, gamma=0.5),
    "sft": lambda b: sft_loss(b["policy_chosen_logps"], b["mask_chosen"]),
    "kto": lambda b: kto_loss(**b, reference_point=0.25, beta=0.5),
}
PAIRED = [name for name in LOSSES if name != "sft"]


# --- helpers -------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_by_hand():
    values = t([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # float mask; second row is empty
    assert_close(masked_sum(values, mask), t([3.0, 0.0]))
    # 3 / 2 = 1.5; the empty row divides by clamp_min(1) and gives 0, not NaN.
    assert_close(masked_mean(values, mask), t([1.5, 0.0]))


# --- hand-derived values -------------------------------------------------------------------------------


def test_dpo_by_hand():
    """β = 0.5; h = chosen log-ratio − rejected log-ratio = [0.5 − (−0.5), 1.0 − (−1.0)] = [1.0, 2.0].

    β·h = [0.5, 1.0]; loss_i = −log σ(β h_i) = log(1 + e^{−β h_i}).
    rewards/chosen = mean(0.5 · [0.5, 1.0]) = 0.375; rewards/rejected = mean(0.5 · [−0.5, −1.0]) = −0.375.
    logps/chosen = mean([−3, −2]) = −2.5; logps/rejected = mean([−4, −3]) = −3.5.
    """
    out = dpo_loss(**batch(), beta=0.5)
    expected = t([softplus(-0.5), softplus(-1.0)])
    assert_close(out.per_example, expected)
    assert_close(out.loss, expected.mean())
    m = out.metrics
    assert_close(m["rewards/chosen"], torch.tensor(0.375))
    assert_close(m["rewards/rejected"], torch.tensor(-0.375))
    assert_close(m["rewards/margins"], torch.tensor(0.75))
    assert_close(m["rewards/accuracies"], torch.tensor(1.0))
    assert_close(m["logps/chosen"], torch.tensor(-2.5))
    assert_close(m["logps/rejected"], torch.tensor(-3.5))


def test_cdpo_by_hand():
    """ε = 0.25, β·h = [0.5, 1.0] as in the DPO case.

    loss_i = 0.75 · log(1 + e^{−β h_i}) + 0.25 · log(1 + e^{β h_i}).
    """
    out = dpo_loss(**batch(), beta=0.5, label_smoothing=0.25)
    expected = [0.75 * softplus(-x) + 0.25 * softplus(x) for x in (0.5, 1.0)]
    assert_close(out.per_example, t(expected))
    assert_close(out.metrics["rewards/margins"], torch.tensor(0.75))  # rewards do not depend on ε


def test_ipo_by_hand():
    """τ = 0.5, so the target 1/(2τ) = 1.

    Mean per-token log-ratios (policy − ref over the unpadded tokens):
      chosen:   pair 1: [0.5, 0.0] / 2 = 1/4;         pair 2: [0.5, 0.5, 0.0] / 3 = 1/3
      rejected: pair 1: [−0.5, 0.0, 0.0] / 3 = −1/6;  pair 2: [−1.0] / 1 = −1
    h = [1/4 + 1/6, 1/3 + 1] = [5/12, 4/3]
    loss_i = (h_i − 1)² = [(−7/12)², (1/3)²] = [49/144, 16/144]; mean = 65/288.
    """
    out = ipo_loss(**batch(), tau=0.5)
    assert_close(out.per_example, t([49 / 144, 16 / 144]))
    assert_close(out.loss, torch.tensor(65 / 288))
    assert_close(out.metrics["rewards/chosen"], torch.tensor((1 / 4 + 1 / 3) / 2))
    assert_close(out.metrics["rewards/rejected"], torch.tensor((-1 / 6 - 1) / 2))
    assert_close(out.metrics["logps/chosen"], torch.tensor(-2.5))  # summed, not mean, log-probs


def test_simpo_by_hand():
    """β = 2, γ = 0.5; no reference.

    Mean log-probs: chosen [−3/2, −2/3], rejected [−4/3, −3/1].
    Rewards β·mean: chosen [−3, −4/3], rejected [−8/3, −6].
    x = reward_w − reward_l − γ = [−3 + 8/3 − 1/2, −4/3 + 6 − 1/2] = [−5/6, 25/6]
    loss_i = −log σ(x_i) = log(1 + e^{−x_i}) = [log(1 + e^{5/6}), log(1 + e^{−25/6})].
    Pair 1 prefers the rejected answer (−3 < −8/3), pair 2 the chosen one: accuracy 0.5.
    """
    out = simpo_loss(**without_ref(batch()), beta=2.0, gamma=0.5)
    assert_close(out.per_example, t([softplus(5 / 6), softplus(-25 / 6)]))
    assert_close(out.metrics["rewards/chosen"], torch.tensor((-3 - 4 / 3) / 2))
    assert_close(out.metrics["rewards/rejected"], torch.tensor((-8 / 3 - 6) / 2))
    assert_close(out.metrics["rewards/accuracies"], torch.tensor(0.5))


def test_sft_by_hand():
    """Per-token mean NLL of the chosen side: [3/2, 2/3]; loss = (3/2 + 2/3) / 2 = 13/12."""
    b = batch()
    out = sft_loss(b["policy_chosen_logps"], b["mask_chosen"])
    assert_close(out.per_example, t([1.5, 2 / 3]))
    assert_close(out.loss, torch.tensor(13 / 12))
    assert_close(out.metrics["nll"], torch.tensor(13 / 12))
    assert_close(out.metrics["logps/chosen"], torch.tensor(-2.5))


# --- padding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_extra_padding_column_changes_nothing(name: str):
    """Appending one more padded position (value 0, mask 0) to every tensor leaves the result unchanged."""
    b = batch()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1) for k, v in b.items()}
    out, out_padded = LOSSES[name](b), LOSSES[name](padded)
    assert_close(out_padded.per_example, out.per_example)
    for key, value in out.metrics.items():
        assert_close(out_padded.metrics[key], value)


@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_token_is_ignored(name: str):
    """The mask, not the value, decides: junk at a padded position (chosen[0, 2]) does not leak in."""
    b = batch()
    junk = {k: v.clone() for k, v in b.items()}
    for key in ("policy_chosen_logps", "ref_chosen_logps"):
        junk[key][0, 2] = -7.0
    assert_close(LOSSES[name](junk).per_example, LOSSES[name](b).per_example)


# --- identities ----------------------------------------------------------------------------------------


def test_dpo_at_reference_is_log2():
    b = random_batch()
    b["ref_chosen_logps"] = b["policy_chosen_logps"].clone()
    b["ref_rejected_logps"] = b["policy_rejected_logps"].clone()
    out = dpo_loss(**b, beta=0.3)
    assert_close(out.per_example, torch.full((4,), math.log(2), dtype=torch.float64))
    assert_close(out.loss, torch.tensor(math.log(2), dtype=torch.float64))
    # Ties are not counted as correct: accuracy uses a strict reward_chosen > reward_rejected.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_close(out.metrics[key], torch.tensor(0.0, dtype=torch.float64))


def test_dpo_matches_formula_and_smoothing_zero():
    """label_smoothing=0 is plain DPO: −log σ(β h) with h from independently computed sums."""
    b = random_batch(seed=1)
    sums = {k: masked_sum(b[k], b["mask_" + k.split("_")[1]]) for k in b if k.endswith("logps")}
    h = (sums["policy_chosen_logps"] - sums["ref_chosen_logps"]) - (
        sums["policy_rejected_logps"] - sums["ref_rejected_logps"]
    )
    expected = -torch.nn.functional.logsigmoid(0.2 * h)
    assert_close(dpo_loss(**b, beta=0.2, label_smoothing=0.0).per_example, expected)
    assert_close(dpo_loss(**b, beta=0.2).per_example, expected)


def test_cdpo_is_mixture_of_dpo_and_flipped_dpo():
    """cDPO(ε) = (1 − ε) · DPO(w, l) + ε · DPO(l, w): the labels flipped with probability ε."""
    b = random_batch(seed=2)
    flipped = {
        "policy_chosen_logps": b["policy_rejected_logps"],
        "policy_rejected_logps": b["policy_chosen_logps"],
        "ref_chosen_logps": b["ref_rejected_logps"],
        "ref_rejected_logps": b["ref_chosen_logps"],
        "mask_chosen": b["mask_rejected"],
        "mask_rejected": b["mask_chosen"],
    }
    eps = 0.1
    mixture = (1 - eps) * dpo_loss(**b, beta=0.5).per_example + eps * dpo_loss(
        **flipped, beta=0.5
    ).per_example
    assert_close(dpo_loss(**b, beta=0.5, label_smoothing=eps).per_example, mixture)


def test_ipo_at_reference_is_squared_target():
    b = random_batch(seed=3)
    b["ref_chosen_logps"] = b["policy_chosen_logps"].clone()
    b["ref_rejected_logps"] = b["policy_rejected_logps"].clone()
    tau = 0.1
    assert_close(
        ipo_loss(**b, tau=tau).per_example, torch.full((4,), (1 / (2 * tau)) ** 2, dtype=torch.float64)
    )


def test_simpo_equal_means_is_softplus_gamma():
    """Chosen [−1, −1] and rejected [−0.5, −1.5, −1] both have mean −1, so loss = −log σ(−γ) = log(1 + e^γ)."""
    out = simpo_loss(
        t([[-1.0, -1.0, 0.0]]),
        t([[-0.5, -1.5, -1.0]]),
        torch.tensor([[1, 1, 0]]),
        torch.tensor([[1, 1, 1]]),
        beta=2.0,
        gamma=0.7,
    )
    assert_close(out.loss, torch.tensor(softplus(0.7)))
    assert_close(out.metrics["rewards/margins"], torch.tensor(0.0))


# --- gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name: str):
    """Analytic gradients match finite differences (float64) w.r.t. every per-token policy/ref input."""
    b = random_batch(seed=4)
    keys = [k for k in b if k.endswith("logps")]
    if name == "simpo":
        keys = ["policy_chosen_logps", "policy_rejected_logps"]
    elif name == "sft":
        keys = ["policy_chosen_logps"]
    inputs = tuple(b[k].clone().requires_grad_(True) for k in keys)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return LOSSES[name]({**b, **dict(zip(keys, tensors, strict=True))}).per_example

    assert torch.autograd.gradcheck(fn, inputs)


def test_dpo_gradient_direction():
    """Descent raises the chosen log-probs and lowers the rejected ones."""
    b = {k: v.clone() for k, v in batch().items()}
    b["policy_chosen_logps"].requires_grad_(True)
    b["policy_rejected_logps"].requires_grad_(True)
    dpo_loss(**b).loss.backward()
    assert (b["policy_chosen_logps"].grad[b["mask_chosen"]] < 0).all()
    assert (b["policy_rejected_logps"].grad[b["mask_rejected"]] > 0).all()
    assert (b["policy_chosen_logps"].grad[~b["mask_chosen"]] == 0).all()


# --- metrics and shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRED)
def test_paired_metrics_and_accuracy(name: str):
    """One token per response, ref = 0: pair 1 prefers chosen (−1 > −2), pair 2 prefers rejected (−2 < −1).

    Every paired loss orders the two sides the same way here, so accuracy = mean([1, 0]) = 0.5.
    """
    ones = torch.ones(2, 1, dtype=torch.bool)
    b = {
        "policy_chosen_logps": t([[-1.0], [-2.0]]),
        "policy_rejected_logps": t([[-2.0], [-1.0]]),
        "ref_chosen_logps": torch.zeros(2, 1),
        "ref_rejected_logps": torch.zeros(2, 1),
        "mask_chosen": ones,
        "mask_rejected": ones,
    }
    out = LOSSES[name](b)
    assert out.metrics.keys() >= PAIRED_KEYS
    assert_close(out.metrics["rewards/accuracies"], torch.tensor(0.5))
    assert_close(out.metrics["rewards/margins"], torch.tensor(0.0))
    assert_close(out.metrics["logps/chosen"], torch.tensor(-1.5))


@pytest.mark.parametrize("name", list(LOSSES))
def test_output_shapes(name: str):
    b = {k: v.float().requires_grad_(v.is_floating_point()) for k, v in random_batch().items()}
    out = LOSSES[name](b)
    assert isinstance(out, LossOutput)
    assert out.per_example.shape == (4,)
    assert out.loss.shape == ()
    assert out.loss.requires_grad
    assert_close(out.loss, out.per_example.mean())
    for value in out.metrics.values():
        assert value.shape == () and not value.requires_grad


def test_shape_mismatch_raises():
    b = batch()
    b["mask_rejected"] = b["mask_rejected"][:, :2]
    with pytest.raises(ValueError, match="shape mismatch"):
        dpo_loss(**b)
