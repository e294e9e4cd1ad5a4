"""SimPO: reference-free preference optimisation on length-normalised log-probs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum, paired_metrics

__all__ = ["simpo_loss"]


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> LossOutput:
    """Simple Preference Optimisation (Meng et al. 2024, arXiv:2405.14734).

    No reference model; the reward of a response is β times its mean per-token log-prob, and γ is a
    target reward margin:

        loss = −log σ(β · (mean_t π_w − mean_t π_l) − γ).

    Rewards are reported as β · mean_t π of each side.
    """
    check_shapes(policy_chosen_logps, policy_rejected_logps, mask_chosen, mask_rejected)
    rewards_chosen = beta * masked_mean(policy_chosen_logps, mask_chosen)
    rewards_rejected = beta * masked_mean(policy_rejected_logps, mask_rejected)

    per_example = -F.logsigmoid(rewards_chosen - rewards_rejected - gamma)

    metrics = paired_metrics(
        rewards_chosen,
        rewards_rejected,
        masked_sum(policy_chosen_logps, mask_chosen),
        masked_sum(policy_rejected_logps, mask_rejected),
    )
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
