"""Supervised fine-tuning on the chosen responses (the negative log-likelihood per response token)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.losses import LossOutput, sft_loss
from sparsealign.methods.base import Method, MethodOptions, StepOutputs
from sparsealign.methods.registry import register


@dataclass
class SFTOptions(MethodOptions):
    pass


def sft(out: StepOutputs, options: SFTOptions) -> LossOutput:
    chosen = out.policy.chosen(out.num_pairs)
    return sft_loss(chosen.logps, chosen.mask)


register(
    Method("sft", sft, SFTOptions, summary="supervised fine-tuning on the chosen responses", rows="chosen")
)
