"""SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) as HALOs implements it: a hinge on the summed log-prob margin
of chosen over rejected plus a cross-entropy term on the chosen response; reference-free."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.losses import LossOutput, slic_loss
from sparsealign.methods.base import Method, MethodOptions, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class SLiCOptions(MethodOptions):
    delta: float = option("δ, the hinge margin on Σ log π(y_w) − Σ log π(y_l).", 1.0)
    lam: float = option("λ, weight of the chosen responses' cross-entropy (−Σ log π(y_w)).", 0.1)


def slic(out: StepOutputs, options: SLiCOptions) -> LossOutput:
    pc, pr = out.policy_pair()
    return slic_loss(pc.logps, pr.logps, pc.mask, pr.mask, delta=options.delta, lam=options.lam)


register(
    Method(
        "slic",
        slic,
        SLiCOptions,
        summary="SLiC-HF, calibration hinge plus NLL (Zhao et al. 2023)",
        citation=(
            "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv:2305.10425"
        ),
    )
)
