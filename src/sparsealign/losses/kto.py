"""KTO: Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, arXiv:2402.01306), on paired data.

Each pair gives one desirable example (the chosen response) and one undesirable example (the rejected
response). The reference point z₀ is an estimate of KL(π ‖ π_ref) from *mismatched* responses: each
prompt x paired with a response written for another prompt, as in the paper, HALOs and TRL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_sum, paired_metrics

__all__ = ["kto_loss", "kto_reference_point", "kto_unpaired_loss", "kto_weight_ratio"]


def kto_reference_point(
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    average: Callable[[Tensor], Tensor] = torch.mean,
) -> Tensor:
    """z₀ = max(0, mean_i Σ_t (π − ref)) over the mismatched rows ``[M, T]``, detached (no gradient flows
    through the reference point, as in the paper). For a batch of B pairs M = 2B: each pair's chosen and
    rejected rows, continued by other prompts' responses (:mod:`sparsealign.data.mismatched`), as TRL and
    HALOs do. ``average`` turns the ``[M]`` per-row log-ratios into their mean; a multi-process run passes
    the mean over all processes' rows. A scalar tensor."""
    check_shapes(policy_logps, ref_logps, mask)
    logratios = masked_sum(policy_logps - ref_logps, mask).detach()
    return average(logratios).clamp_min(0)


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    reference_point: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO's loss with the sigmoid value function.

    With log-ratios summed over response tokens, r = Σ_t (π − ref), and the reference point z₀
    (:func:`kto_reference_point`),

        loss_w = λ_D · (1 − σ(β (r_w − z₀))),    loss_l = λ_U · (1 − σ(β (z₀ − r_l))),

    and the loss is the mean over all 2B examples, i.e. ``per_example = (loss_w + loss_l) / 2`` per pair: the
    chosen and rejected rows are :func:`kto_unpaired_loss`'s desirable and undesirable items.
    λ_D = ``desirable_weight``, λ_U = ``undesirable_weight``; the paper recommends
    λ_D n_D / (λ_U n_U) in [1, 4/3] (1 for paired data with equal weights).

    Rewards are β · r of each side; ``kl`` is z₀ (TRL's metric name).
    """
    check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        mask_chosen,
        mask_rejected,
    )
    batch = policy_chosen_logps.shape[0]
    items = (
        kto_unpaired_loss(  # the chosen rows are the desirable items, the rejected rows the undesirable ones
            torch.cat([policy_chosen_logps, policy_rejected_logps]),
            torch.cat([ref_chosen_logps, ref_rejected_logps]),
            torch.cat([mask_chosen, mask_rejected]),
            torch.arange(2 * batch, device=policy_chosen_logps.device) < batch,
            reference_point,
            beta,
            desirable_weight,
            undesirable_weight,
        )
    )
    per_example = (items.per_example[:batch] + items.per_example[batch:]) / 2
    policy_chosen = masked_sum(policy_chosen_logps, mask_chosen)
    policy_rejected = masked_sum(policy_rejected_logps, mask_rejected)
    chosen_logratio = policy_chosen - masked_sum(ref_chosen_logps, mask_chosen)
    rejected_logratio = policy_rejected - masked_sum(ref_rejected_logps, mask_rejected)
    metrics = paired_metrics(beta * chosen_logratio, beta * rejected_logratio, policy_chosen, policy_rejected)
    metrics["kl"] = items.metrics["kl"]
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)


def kto_unpaired_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO on binary feedback: N items ``[N, T]``, each a completion labelled desirable or not (``desirable``,
    a bool ``[N]``), with no pairing (Ethayarajh et al. 2024; TRL's unpaired format, HALOs' binary feedback).

    With each item's summed log-ratio r = Σ_t (π − ref) and the reference point z₀
    (:func:`kto_reference_point`, from mismatched items),

        desirable:   λ_D · (1 − σ(β (r − z₀))),    undesirable:   λ_U · (1 − σ(β (z₀ − r))),

    and the loss is the mean over the N items. λ_D = ``desirable_weight``, λ_U = ``undesirable_weight``; the
    paper recommends λ_D n_D / (λ_U n_U) in [1, 4/3] (:func:`kto_weight_ratio` checks a dataset's balance).
    Metrics: ``rewards/chosen`` and ``rewards/rejected`` (mean β·r of the batch's desirable and undesirable
    items, 0 when there are none), ``kl`` (z₀), ``count/desirable``.
    """
    check_shapes(policy_logps, ref_logps, mask)
    if desirable.shape != policy_logps.shape[:1] or desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor of shape [{policy_logps.shape[0]}]")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must be non-negative")
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device)
    logratio = masked_sum(policy_logps - ref_logps, mask)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    per_example = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = (beta * logratio).detach()
    n_desirable = desirable.sum()
    n_undesirable = (~desirable).sum()
    metrics = {
        "rewards/chosen": (rewards * desirable).sum() / n_desirable.clamp_min(1),
        "rewards/rejected": (rewards * ~desirable).sum() / n_undesirable.clamp_min(1),
        "kl": z0.detach(),
        "count/desirable": n_desirable.to(policy_logps.dtype),
    }
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)


def kto_weight_ratio(
    n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> float:
    """λ_D·n_D / (λ_U·n_U), which the KTO paper advises keeping in [1, 4/3] for the data's actual class
    balance (``inf`` without undesirable weight)."""
    denominator = undesirable_weight * n_undesirable
    return float("inf") if denominator == 0 else desirable_weight * n_desirable / denominator
