"""SLiC-HF: sequence likelihood calibration with a hinge on summed log-probs, reference-free."""

from __future__ import annotations

from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_sum, paired_metrics

__all__ = ["slic_loss"]


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    delta: float = 1.0,
    lam: float = 0.1,
) -> LossOutput:
    """Sequence Likelihood Calibration with human feedback (Zhao et al. 2023, arXiv:2305.10425), as HALOs
    implements it (``SLiCTrainer``): with the log-probs summed over response tokens,

        loss = max(0, δ − (Σ_t π_w − Σ_t π_l)) + λ · (−Σ_t π_w),

    a rank-calibration hinge with margin δ = ``delta`` plus λ = ``lam`` times the NLL of the chosen
    response (the paper's regulariser is the NLL of the SFT target; HALOs, like here, uses the chosen
    response). Averaged over pairs. No reference model.

    Rewards are the summed log-probs of each side (as in HALOs). Extra metrics: ``calibration_loss`` (the
    mean hinge) and ``nll_loss`` (mean −Σ_t π_w).
    """
    check_shapes(policy_chosen_logps, policy_rejected_logps, mask_chosen, mask_rejected)
    if delta < 0:
        raise ValueError(f"delta must be non-negative, got {delta}")
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    chosen = masked_sum(policy_chosen_logps, mask_chosen)
    rejected = masked_sum(policy_rejected_logps, mask_rejected)

    calibration = (delta - (chosen - rejected)).clamp_min(0)
    nll = -chosen
    per_example = calibration + lam * nll

    metrics = paired_metrics(chosen, rejected, chosen, rejected)
    metrics["calibration_loss"] = calibration.mean().detach()
    metrics["nll_loss"] = nll.mean().detach()
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
