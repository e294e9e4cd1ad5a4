"""ORPO: odds-ratio preference optimisation, reference-free, with the SFT term built in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum, paired_metrics

__all__ = ["log_odds", "orpo_loss"]

_LOG_HALF = -math.log(2.0)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 − p)) for p = exp(ā), from the mean per-token log-prob ā ≤ 0, computed stably:

        log-odds(ā) = ā − log(1 − exp(ā)),

    with log(1 − exp(ā)) as log(−expm1(ā)) for ā > −log 2 and log1p(−exp(ā)) below (Mächler 2012,
    "Accurately computing log(1 − exp(−|a|))"), each branch accurate where the other loses digits.
    p → 1 (ā → 0) sends the log-odds to +∞: ā is first capped at −ε (ε the dtype's machine epsilon),
    so the log-odds stay finite (about 16 in float32, 36 in float64) and a response the model
    already reproduces exactly gets no gradient from this term (its ā is at the cap).
    """
    eps = torch.finfo(mean_logps.dtype).eps
    a = mean_logps.clamp_max(-eps)
    log1mexp = torch.where(a > _LOG_HALF, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    return a - log1mexp


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    lam: float = 0.1,
) -> LossOutput:
    """Odds Ratio Preference Optimisation (Hong et al. 2024, arXiv:2403.07691), no reference model.

    With ā the mean per-token log-prob of a response (so P(y|x) = exp(ā), the paper's length-normalised
    likelihood) and log-odds(ā) = ā − log(1 − exp(ā)) (:func:`log_odds`),

        loss = −ā_w + λ · (−log σ(log-odds(ā_w) − log-odds(ā_l))),

    the SFT term on the chosen response plus λ times the odds-ratio term, averaged over pairs.
    λ = ``lam`` (the paper's λ; TRL's ``beta``, HALOs' ``OR_scale``).

    Metrics (TRL's ORPO names): ``rewards/*`` are λ · ā of each side; ``logps/*`` are the summed log-probs
    (as every loss here reports them; TRL's ORPO logs the mean); ``nll_loss`` is mean −ā_w;
    ``log_odds_ratio`` is mean log σ(log-odds difference) and ``log_odds_chosen`` the mean log-odds
    difference itself.
    """
    check_shapes(policy_chosen_logps, policy_rejected_logps, mask_chosen, mask_rejected)
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    mean_chosen = masked_mean(policy_chosen_logps, mask_chosen)
    mean_rejected = masked_mean(policy_rejected_logps, mask_rejected)

    log_odds_diff = log_odds(mean_chosen) - log_odds(mean_rejected)
    log_sigmoid = F.logsigmoid(log_odds_diff)
    nll = -mean_chosen
    per_example = nll - lam * log_sigmoid

    metrics = paired_metrics(
        lam * mean_chosen,
        lam * mean_rejected,
        masked_sum(policy_chosen_logps, mask_chosen),
        masked_sum(policy_rejected_logps, mask_rejected),
    )
    metrics["nll_loss"] = nll.mean().detach()
    metrics["log_odds_ratio"] = log_sigmoid.mean().detach()
    metrics["log_odds_chosen"] = log_odds_diff.mean().detach()
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
