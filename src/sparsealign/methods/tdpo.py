"""TDPO1 and TDPO2 (Zeng et al. 2024, arXiv:2404.11999): DPO with a token-level KL term; TDPO2 weights it by α
and stops the gradient through the chosen response's KL."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.losses import LossOutput, tdpo_loss
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class TDPO1Options(MethodOptions):
    beta: float = option("Inverse temperature β of the sequence reward and the token KL.", 0.1)


@dataclass
class TDPO2Options(TDPO1Options):
    alpha: float = option("Weight α of the token-KL term (TDPO2).", 0.5)


def tdpo(out: StepOutputs, options: TDPO1Options) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    alpha = getattr(options, "alpha", None)  # TDPO1: None
    return tdpo_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.kl, pr.kl, pc.mask, pr.mask, options.beta, alpha
    )


NEEDS = {Need.REFERENCE_LOGPS, Need.TOKEN_KL}
TDPO_CITATION = "Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999"

register(Method("tdpo1", tdpo, TDPO1Options, NEEDS, "TDPO1 (Zeng et al. 2024)", citation=TDPO_CITATION))
register(Method("tdpo2", tdpo, TDPO2Options, NEEDS, "TDPO2 (Zeng et al. 2024)", citation=TDPO_CITATION))
