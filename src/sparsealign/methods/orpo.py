"""ORPO (Hong et al. 2024, arXiv:2403.07691): odds-ratio preference optimisation, reference-free, with the SFT
term built in."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.losses import LossOutput, orpo_loss
from sparsealign.methods.base import Method, MethodOptions, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class ORPOOptions(MethodOptions):
    lam: float = option("λ, weight of the odds-ratio term against the chosen responses' NLL.", 0.1)


def orpo(out: StepOutputs, options: ORPOOptions) -> LossOutput:
    pc, pr = out.policy_pair()
    return orpo_loss(pc.logps, pr.logps, pc.mask, pr.mask, lam=options.lam)


register(
    Method(
        "orpo",
        orpo,
        ORPOOptions,
        summary="ORPO, odds-ratio preference optimisation (Hong et al. 2024)",
        citation=(
            "Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model, "
            "arXiv:2403.07691"
        ),
    )
)
