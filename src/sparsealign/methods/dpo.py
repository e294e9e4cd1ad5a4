"""DPO (Rafailov et al. 2023, arXiv:2305.18290) and conservative DPO (cDPO, Mitchell 2023: labels flipped
with probability ``label_smoothing``)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.config import Config, ConfigError
from sparsealign.losses import LossOutput, dpo_loss
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class DPOOptions(MethodOptions):
    beta: float = option("Inverse temperature of the implicit reward β·log(π/π_ref).", 0.1)
    label_smoothing: float = option(
        "cDPO: assumed probability that a preference label is flipped (0: plain DPO).", 0.0
    )


def dpo(out: StepOutputs, options: DPOOptions) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    return dpo_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, options.beta, options.label_smoothing
    )


def _check_cdpo(config: Config) -> None:
    if not 0.0 < config.method.label_smoothing < 0.5:
        raise ConfigError(
            "'method.label_smoothing' must be in (0, 0.5) for cdpo (e.g. method.label_smoothing=0.1)."
        )


DPO_CITATION = (
    "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model, "
    "arXiv:2305.18290"
)

register(
    Method(
        "dpo",
        dpo,
        DPOOptions,
        {Need.REFERENCE_LOGPS},
        "DPO (Rafailov et al. 2023)",
        trl_loss_type="sigmoid",
        citation=DPO_CITATION,
    )
)
register(
    Method(
        "cdpo",
        dpo,
        DPOOptions,
        {Need.REFERENCE_LOGPS},
        "conservative DPO (Mitchell 2023)",
        check=_check_cdpo,
        citation=(
            "Mitchell 2023, A note on DPO with noisy preferences and relationship to IPO, "
            "https://ericmitchell.ai/cdpo.pdf"
        ),
    )
)
