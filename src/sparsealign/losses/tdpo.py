"""TDPO: token-level DPO with a per-token KL(reference || policy) term (TDPO1 and TDPO2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_sum, paired_metrics

__all__ = ["tdpo_loss"]


def tdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    kl_chosen: Tensor,
    kl_rejected: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    beta: float = 0.1,
    alpha: float | None = None,
) -> LossOutput:
    """Token-level Direct Preference Optimisation (Zeng et al. 2024, "Token-level Direct Preference
    Optimization", ICML 2024, arXiv:2404.11999).

    ``kl_*[b, t]`` is the KL(π_ref || π_θ) over the whole vocabulary at response token t (the
    distributions that predict it), zero outside the mask. Per response, summed over its tokens:

        S = Σ_t (log π_θ(y_t) − log π_ref(y_t)),      K = Σ_t KL_t   (TDPO's sequential KL).

    TDPO1 (``alpha=None``):

        loss = −log σ(β [(S_w − S_l) − (K_l − K_w)]) = softplus(−β [(S_w + K_w) − (S_l + K_l)]),

    TDPO2 (``alpha`` given) stops the gradient of the chosen KL (``sg`` = detach) and weights the KL
    difference by α:

        loss = −log σ(β [(S_w − S_l) − α (K_l − sg(K_w))]).

    Both are the mean over pairs. Metrics: the paired metrics with the rewards β·S of each side,
    ``kl/chosen`` and ``kl/rejected`` (batch means of K) and the two parts of the logit,
    ``logits/reward_part`` = β(S_w − S_l) and ``logits/kl_part`` = β(K_w − K_l) (times α for TDPO2), whose
    sum is the argument of σ.
    """
    check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        kl_chosen,
        kl_rejected,
        mask_chosen,
        mask_rejected,
    )
    if alpha is not None and alpha < 0:
        raise ValueError(f"alpha must be non-negative (or None for TDPO1), got {alpha}")
    # Summed log-ratio as Σ(policy − ref), the same expression sparsepo_loss uses, so that SparsePO with
    # all-ones masks reproduces this loss bit for bit.
    chosen_logratio = masked_sum(policy_chosen_logps - ref_chosen_logps, mask_chosen)
    rejected_logratio = masked_sum(policy_rejected_logps - ref_rejected_logps, mask_rejected)
    kl_w = masked_sum(kl_chosen, mask_chosen)
    kl_l = masked_sum(kl_rejected, mask_rejected)

    reward_part = beta * (chosen_logratio - rejected_logratio)
    kl_part = beta * (kl_w - kl_l) if alpha is None else beta * alpha * (kl_w.detach() - kl_l)
    logits = reward_part + kl_part
    per_example = -F.logsigmoid(logits)

    metrics = paired_metrics(
        beta * chosen_logratio,
        beta * rejected_logratio,
        masked_sum(policy_chosen_logps, mask_chosen),
        masked_sum(policy_rejected_logps, mask_rejected),
    )
    metrics.update(
        {
            "kl/chosen": kl_w.mean().detach(),
            "kl/rejected": kl_l.mean().detach(),
            "logits/reward_part": reward_part.mean().detach(),
            "logits/kl_part": kl_part.mean().detach(),
        }
    )
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
