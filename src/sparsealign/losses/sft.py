"""Supervised fine-tuning: negative log-likelihood of the response tokens, with the three normalisations
in use (TRL's token mean, a per-sequence mean, HALOs' per-sequence sum)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum

__all__ = ["SFT_NORMALIZATIONS", "sft_loss"]

SFT_NORMALIZATIONS = ("token", "sequence", "sum")


def sft_loss(
    policy_logps: Tensor, mask: Tensor, normalize: Literal["token", "sequence", "sum"] = "sequence"
) -> LossOutput:
    """Negative log-likelihood of the response tokens ``π_{b,t}`` (log-probs, ``[B, T]``, masked by ``mask``):

    * ``token`` (TRL's ``SFTTrainer``): loss = −Σ_{b,t} π_{b,t} / Σ_{b,t} m_{b,t}, the mean over every response
      token of the batch, so long responses weigh more;
    * ``sequence``: loss = mean_b (−mean_t π_{b,t}), every response weighs the same whatever its length;
    * ``sum`` (HALOs' ``SFTTrainer``): loss = mean_b (−Σ_t π_{b,t}), the summed log-likelihood per response.

    ``per_example`` is each response's contribution (its length-normalised NLL for ``sequence``, its summed
    NLL for ``sum``, its summed NLL over the batch's token count times B for ``token``), whose mean is the
    loss. Metrics: ``nll`` (the loss) and ``logps/chosen`` (batch mean of the summed response log-prob).
    """
    check_shapes(policy_logps, mask)
    summed = masked_sum(policy_logps, mask)
    if normalize == "token":
        per_example = -summed * (summed.numel() / mask.sum().clamp_min(1))
    elif normalize == "sequence":
        per_example = -masked_mean(policy_logps, mask)
    elif normalize == "sum":
        per_example = -summed
    else:
        raise ValueError(f"normalize must be one of {SFT_NORMALIZATIONS}, got {normalize!r}")
    loss = per_example.mean()
    metrics = {"nll": loss.detach(), "logps/chosen": summed.mean().detach()}
    return LossOutput(loss=loss, per_example=per_example, metrics=metrics)
