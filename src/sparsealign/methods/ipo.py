"""IPO (Azar et al. 2023, arXiv:2310.12036): a squared loss on the length-normalised log-ratio margin."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.losses import LossOutput, ipo_loss
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class IPOOptions(MethodOptions):
    beta: float = option("τ, the regularisation strength: the margin target is 1/(2τ).", 0.1)


def ipo(out: StepOutputs, options: IPOOptions) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    return ipo_loss(pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, tau=options.beta)


# TRL's loss_type="ipo", like ours, squares the length-normalised log-ratio margin minus 1/(2τ).
register(
    Method(
        "ipo",
        ipo,
        IPOOptions,
        {Need.REFERENCE_LOGPS},
        "IPO (Azar et al. 2023)",
        trl_loss_type="ipo",
        citation=(
            "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences, "
            "arXiv:2310.12036"
        ),
    )
)
