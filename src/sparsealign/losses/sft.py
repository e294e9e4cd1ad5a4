"""Supervised fine-tuning: negative log-likelihood of the response tokens."""

from __future__ import annotations

from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum

__all__ = ["sft_loss"]


def sft_loss(policy_logps: Tensor, mask: Tensor) -> LossOutput:
    """Per-example length-normalised negative log-likelihood:

        loss_b = −mean_t π_b,    loss = mean_b loss_b.

    Every example weighs the same whatever its length (unlike a token-level mean over the whole batch).
    Metrics: ``nll`` (the loss) and ``logps/chosen`` (batch mean of the summed response log-prob).
    """
    check_shapes(policy_logps, mask)
    per_example = -masked_mean(policy_logps, mask)
    loss = per_example.mean()
    metrics = {"nll": loss.detach(), "logps/chosen": masked_sum(policy_logps, mask).mean().detach()}
    return LossOutput(loss=loss, per_example=per_example, metrics=metrics)
