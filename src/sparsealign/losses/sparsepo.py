"""SparsePO: preference optimisation with per-token reward and divergence masks (SparsePO and MaPO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_sum, paired_metrics

__all__ = ["sparsepo_loss"]


def _mask_stats(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Percentage of response tokens (pooled over the batch) whose mask value is exactly 0, and the mean
    mask value over those tokens. An empty batch gives 0 for both."""
    on = mask.bool()
    count = on.sum().clamp_min(1).to(values.dtype)
    zeros = ((values == 0) & on).sum().to(values.dtype)
    total = torch.where(on, values, torch.zeros_like(values)).sum()
    return (100.0 * zeros / count).detach(), (total / count).detach()


def sparsepo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    kl_chosen: Tensor,
    kl_rejected: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    reward_mask_chosen: Tensor,
    reward_mask_rejected: Tensor,
    kl_mask_chosen: Tensor,
    kl_mask_rejected: Tensor,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    shared_mask: bool = False,
) -> LossOutput:
    """SparsePO (Christopoulou et al. 2024, "SparsePO: Controlling Preference Alignment of LLMs via Sparse
    Token Masks", arXiv:2410.05102).

    ``kl_*`` is the per-token KL(π_ref || π_θ) over the vocabulary (as in :func:`tdpo_loss`);
    ``reward_mask_*`` (m_u) and ``kl_mask_*`` (m_d) are non-negative per-token weights, ``[B, T]`` like the
    other inputs (only their values on response tokens matter). With Δ_t = log π_θ(y_t) − log π_ref(y_t)
    and sums over the response tokens of one sequence,

        U = Σ_t m_u,t · Δ_t,        K = Σ_t m_d,t · KL_t,
        z = (U_w + K_w) − (U_l + K_l) = (U_w − U_l) − (K_l − K_w),
        loss_pair = softplus(−β z)
                    + λ_u (‖m_u(y_w)‖₁ + ‖m_u(y_l)‖₁) + λ_d (‖m_d(y_w)‖₁ + ‖m_d(y_l)‖₁),

    with ‖m‖₁ the plain sum of the mask values over the response tokens (not length-normalised; the masks
    are assumed non-negative, as the ReLU networks of :mod:`sparsealign.masks` produce), λ_u = ``l1_reward``
    and λ_d = ``l1_kl``. With ``shared_mask=True`` the caller passes one mask as both m_u and m_d, and each
    λ is halved so that the shared mask is penalised once (paper code, ``sparse_trainer.py``). The loss is
    the mean over pairs. All-ones masks (and no L1) give TDPO1 exactly; MaPO is this loss with
    ``shared_mask=True``, no L1 and a detached activation mask (:func:`sparsealign.masks.activation_mask`).

    Metrics: the paired metrics with rewards β·U of each side (the *masked* reward, the quantity the loss
    compares); ``logits/reward_part`` = β(U_w − U_l) and ``logits/kl_part`` = β(K_w − K_l), which sum to
    β z (the loss's sign convention, unlike the paper code's logs, which use β(U − K));
    ``kl/chosen``/``kl/rejected``: batch means of the *unmasked* summed token KL over response tokens;
    ``mask/sparsity_{reward,kl}_{chosen,rejected}``: percentage of response tokens whose mask value is
    exactly 0, pooled over the batch; ``mask/mean_{reward,kl}_{chosen,rejected}``: mean mask value over
    response tokens; ``l1_penalty``: batch mean of the L1 term (after halving).
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
        reward_mask_chosen,
        reward_mask_rejected,
        kl_mask_chosen,
        kl_mask_rejected,
    )
    if l1_reward < 0 or l1_kl < 0:
        raise ValueError(f"L1 weights must be non-negative, got l1_reward={l1_reward}, l1_kl={l1_kl}")
    dtype = policy_chosen_logps.dtype
    m_u_w, m_u_l = reward_mask_chosen.to(dtype), reward_mask_rejected.to(dtype)
    m_d_w, m_d_l = kl_mask_chosen.to(dtype), kl_mask_rejected.to(dtype)

    u_w = masked_sum(m_u_w * (policy_chosen_logps - ref_chosen_logps), mask_chosen)
    u_l = masked_sum(m_u_l * (policy_rejected_logps - ref_rejected_logps), mask_rejected)
    k_w = masked_sum(m_d_w * kl_chosen, mask_chosen)
    k_l = masked_sum(m_d_l * kl_rejected, mask_rejected)

    reward_part = beta * (u_w - u_l)
    kl_part = beta * (k_w - k_l)
    logits = reward_part + kl_part
    per_example = -F.logsigmoid(logits)

    scale = 0.5 if shared_mask else 1.0
    penalty = torch.zeros_like(per_example)
    if l1_reward:
        penalty = penalty + scale * l1_reward * (
            masked_sum(m_u_w, mask_chosen) + masked_sum(m_u_l, mask_rejected)
        )
    if l1_kl:
        penalty = penalty + scale * l1_kl * (
            masked_sum(m_d_w, mask_chosen) + masked_sum(m_d_l, mask_rejected)
        )
    per_example = per_example + penalty

    metrics = paired_metrics(
        beta * u_w,
        beta * u_l,
        masked_sum(policy_chosen_logps, mask_chosen),
        masked_sum(policy_rejected_logps, mask_rejected),
    )
    metrics.update(
        {
            "logits/reward_part": reward_part.mean().detach(),
            "logits/kl_part": kl_part.mean().detach(),
            "masked_kl/chosen": (beta * k_w).mean().detach(),  # beta*K_w enters the logit with + sign
            "masked_kl/rejected": (beta * k_l).mean().detach(),  # beta*K_l enters with - sign
            "kl/chosen": masked_sum(kl_chosen, mask_chosen).mean().detach(),
            "kl/rejected": masked_sum(kl_rejected, mask_rejected).mean().detach(),
            "l1_penalty": penalty.mean().detach(),
        }
    )
    for kind, values, mask in (
        ("reward_chosen", m_u_w, mask_chosen),
        ("reward_rejected", m_u_l, mask_rejected),
        ("kl_chosen", m_d_w, mask_chosen),
        ("kl_rejected", m_d_l, mask_rejected),
    ):
        sparsity, mean = _mask_stats(values, mask)
        metrics[f"mask/sparsity_{kind}"] = sparsity
        metrics[f"mask/mean_{kind}"] = mean
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
