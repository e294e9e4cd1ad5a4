"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on paired data or binary feedback (labelled items:
``kto_unpaired_loss``), and KTO-zero (HALOs' KTOZero: the reference point fixed at 0, so no mismatched
forward)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparsealign.config import Config, ConfigError
from sparsealign.losses import LossOutput, kto_loss, kto_reference_point, kto_unpaired_loss, kto_weight_ratio
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class KTOOptions(MethodOptions):
    beta: float = option("Inverse temperature β of the value function.", 0.1)
    desirable_weight: float = option("λ_D, weight of the desirable (chosen) examples' losses.", 1.0)
    undesirable_weight: float = option("λ_U, weight of the undesirable (rejected) examples' losses.", 1.0)


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process's rows (``values.mean()`` in a single process), so that all
    processes use the same KTO reference point, as TRL and HALOs do."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.mean()
    totals = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp_min(1)).to(values.dtype)


def _kto(out: StepOutputs, options: KTOOptions, z0: torch.Tensor | float) -> LossOutput:
    if out.labels is not None:  # binary feedback: the rows are the items' completions
        (pc, _), (rc, _) = out.policy_pair(), out.reference_pair()
        return kto_unpaired_loss(
            pc.logps, rc.logps, pc.mask, out.labels, z0,
            beta=options.beta, desirable_weight=options.desirable_weight,
            undesirable_weight=options.undesirable_weight,
        )  # fmt: skip
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    return kto_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, z0,
        beta=options.beta, desirable_weight=options.desirable_weight,
        undesirable_weight=options.undesirable_weight,
    )  # fmt: skip


def kto(out: StepOutputs, options: KTOOptions) -> LossOutput:
    mp, mr = out.mismatched_policy, out.mismatched_reference
    if mp is None or mr is None:
        raise ValueError("KTO needs the log-probs of the mismatched responses")
    z0 = kto_reference_point(mp.logps, mr.logps, mp.mask, average=mean_over_processes)
    return _kto(out, options, z0)


def kto_zero(out: StepOutputs, options: KTOOptions) -> LossOutput:
    return _kto(out, options, 0.0)


def _check(config: Config) -> None:
    m = config.method
    if m.desirable_weight < 0 or m.undesirable_weight < 0:
        raise ConfigError("'method.desirable_weight' and 'method.undesirable_weight' must be >= 0.")


RECOMMENDED_RATIO = (1.0, 4 / 3)
"""The KTO paper's advice for λ_D·n_D / (λ_U·n_U) (Ethayarajh et al. 2024, §4.2)."""

logger = logging.getLogger("sparsealign.methods")


def check_class_balance(labels: list[bool], options: KTOOptions) -> None:
    """Warn when the training data's class balance, weighted, is outside the paper's advice:
    λ_D·n_D / (λ_U·n_U) (:func:`~sparsealign.losses.kto_weight_ratio`) in [1, 4/3]; the warning names
    the ``method.desirable_weight`` values that bring it into range with the current λ_U."""
    n_desirable = sum(labels)
    n_undesirable = len(labels) - n_desirable
    lam_d, lam_u = options.desirable_weight, options.undesirable_weight
    ratio = kto_weight_ratio(n_desirable, n_undesirable, lam_d, lam_u)
    low, high = RECOMMENDED_RATIO
    if low <= ratio <= high:
        return
    if n_desirable == 0 or n_undesirable == 0:
        kind = "desirable" if n_desirable == 0 else "undesirable"
        logger.warning(
            "KTO: the training data has no %s items (%d desirable, %d undesirable); KTO needs both kinds.",
            kind, n_desirable, n_undesirable,
        )  # fmt: skip
        return
    fix_low = low * lam_u * n_undesirable / n_desirable
    fix_high = high * lam_u * n_undesirable / n_desirable
    logger.warning(
        "KTO: λ_D·n_D / (λ_U·n_U) = %.3g·%d / (%.3g·%d) = %.3g for the training data's %d desirable and %d "
        "undesirable items; the KTO paper recommends [1, 4/3]. Set method.desirable_weight in [%.3g, %.3g] "
        "(with method.undesirable_weight=%.3g), or method.undesirable_weight in [%.3g, %.3g] (with "
        "method.desirable_weight=%.3g).",
        lam_d, n_desirable, lam_u, n_undesirable, ratio, n_desirable, n_undesirable,
        fix_low, fix_high, lam_u,
        lam_d * n_desirable / (high * n_undesirable), lam_d * n_desirable / (low * n_undesirable), lam_d,
    )  # fmt: skip


KTO_CITATION = (
    "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization, arXiv:2402.01306"
)

register(
    Method(
        "kto",
        kto,
        KTOOptions,
        {Need.REFERENCE_LOGPS, Need.MISMATCHED},
        "KTO (Ethayarajh et al. 2024)",
        check=_check,
        citation=KTO_CITATION,
        binary_feedback=check_class_balance,
    )
)
register(
    Method(
        "kto-zero",
        kto_zero,
        KTOOptions,
        {Need.REFERENCE_LOGPS},
        "KTO with the reference point fixed at 0 (HALOs' KTOZero)",
        check=_check,
        citation=KTO_CITATION,
        binary_feedback=check_class_balance,
    )
)
