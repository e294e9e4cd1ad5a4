"""DPO (with the cDPO label-smoothing variant) and IPO, from per-token log-probs of policy and reference."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum, paired_metrics

__all__ = ["dpo_loss", "ipo_loss"]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Direct Preference Optimisation (Rafailov et al. 2023, arXiv:2305.18290).

    With log-ratios summed over response tokens,

        h = (Σ_t π_w − Σ_t ref_w) − (Σ_t π_l − Σ_t ref_l),
        loss = (1 − ε) · (−log σ(β h)) + ε · (−log σ(−β h)),

    where ε = ``label_smoothing``. ε = 0 is DPO; ε > 0 is conservative DPO (cDPO, Mitchell 2023,
    "A note on DPO with noisy preferences"), which assumes each label is flipped with probability ε.

    Rewards are the implicit DPO rewards β · (Σ_t π − Σ_t ref) of each side.
    """
    check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        mask_chosen,
        mask_rejected,
    )
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    policy_chosen = masked_sum(policy_chosen_logps, mask_chosen)
    policy_rejected = masked_sum(policy_rejected_logps, mask_rejected)
    chosen_logratio = policy_chosen - masked_sum(ref_chosen_logps, mask_chosen)
    rejected_logratio = policy_rejected - masked_sum(ref_rejected_logps, mask_rejected)

    logits = beta * (chosen_logratio - rejected_logratio)
    per_example = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)

    metrics = paired_metrics(beta * chosen_logratio, beta * rejected_logratio, policy_chosen, policy_rejected)
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    tau: float = 0.1,
) -> LossOutput:
    """Identity Preference Optimisation (Azar et al. 2023, arXiv:2310.12036).

    With length-normalised log-ratios (the mean over response tokens, as HALOs and TRL do),

        h = mean_t(π_w − ref_w) − mean_t(π_l − ref_l),
        loss = (h − 1 / (2τ))².

    The reported rewards are these mean log-ratios of each side (not scaled by τ).
    """
    check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        mask_chosen,
        mask_rejected,
    )
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    chosen_logratio = masked_mean(policy_chosen_logps - ref_chosen_logps, mask_chosen)
    rejected_logratio = masked_mean(policy_rejected_logps - ref_rejected_logps, mask_rejected)

    per_example = (chosen_logratio - rejected_logratio - 1.0 / (2.0 * tau)) ** 2

    metrics = paired_metrics(
        chosen_logratio,
        rejected_logratio,
        masked_sum(policy_chosen_logps, mask_chosen),
        masked_sum(policy_rejected_logps, mask_rejected),
    )
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
