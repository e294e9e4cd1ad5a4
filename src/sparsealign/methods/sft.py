"""Supervised fine-tuning on the chosen responses (the negative log-likelihood of the response tokens), on
preference pairs' chosen sides or on SFT conversations (``messages`` rows, every assistant turn)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparsealign.losses import LossOutput, sft_loss
from sparsealign.methods.base import Method, MethodOptions, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class SFTOptions(MethodOptions):
    sft_normalize: Literal["token", "sequence", "sum"] = option(
        "How the NLL is averaged: 'token' = mean over the batch's response tokens (TRL's SFTTrainer, the "
        "SparsePO document's SFT step), 'sequence' = per-response mean then batch mean, 'sum' = per-response "
        "sum then batch mean (HALOs, the FPO document's SFT step).",
        "sequence",
    )


def sft(out: StepOutputs, options: SFTOptions) -> LossOutput:
    chosen = out.policy.chosen(out.num_pairs)
    return sft_loss(chosen.logps, chosen.mask, normalize=options.sft_normalize)


register(
    Method("sft", sft, SFTOptions, summary="supervised fine-tuning on the chosen responses", rows="chosen")
)
