"""SimPO (Meng et al. 2024, arXiv:2405.14734): reference-free, length-normalised reward with a target margin."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.losses import LossOutput, simpo_loss
from sparsealign.methods.base import Method, MethodOptions, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class SimPOOptions(MethodOptions):
    beta: float = option("Scale of the length-normalised reward β·mean log π.", 0.1)
    gamma: float = option("Target reward margin γ.", 0.5)


def simpo(out: StepOutputs, options: SimPOOptions) -> LossOutput:
    pc, pr = out.policy_pair()
    return simpo_loss(pc.logps, pr.logps, pc.mask, pr.mask, beta=options.beta, gamma=options.gamma)


register(
    Method(
        "simpo",
        simpo,
        SimPOOptions,
        summary="SimPO (Meng et al. 2024)",
        citation=(
            "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward, "
            "arXiv:2405.14734"
        ),
    )
)
