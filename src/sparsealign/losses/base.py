"""Shared pieces of the loss functions: the output record and masked reductions over response tokens.

Every per-token tensor is ``[B, T]``: row b, column t holds the value for response token t of example b,
and is zero wherever the matching mask is 0 (padding). Masks are ``[B, T]``, bool or float 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["LossOutput", "check_shapes", "masked_mean", "masked_sum", "paired_metrics"]


@dataclass
class LossOutput:
    """What every loss returns.

    ``loss`` is the scalar to backpropagate (mean of ``per_example``), ``per_example`` is ``[B]`` (one
    value per pair or example) and ``metrics`` maps TRL-style names to detached scalar tensors.
    """

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` over the tokens where ``mask`` is set: ``[B, T] -> [B]``."""
    return (values * mask.to(values.dtype)).sum(dim=-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the tokens where ``mask`` is set: ``[B, T] -> [B]``.

    A row with no tokens gives 0 (its length is clamped to 1).
    """
    lengths = mask.to(values.dtype).sum(dim=-1).clamp_min(1)
    return masked_sum(values, mask) / lengths


def check_shapes(*tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all tensors are 2-D ``[B, T]`` with one shape."""
    shape = tensors[0].shape
    if len(shape) != 2:
        raise ValueError(f"expected [B, T] tensors, got shape {tuple(shape)}")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs {tuple(shape)}")


def paired_metrics(
    rewards_chosen: Tensor, rewards_rejected: Tensor, logps_chosen: Tensor, logps_rejected: Tensor
) -> dict[str, Tensor]:
    """Batch means of the ``[B]`` per-pair rewards and summed log-probs, under TRL's metric names."""
    metrics = {
        "rewards/chosen": rewards_chosen.mean(),
        "rewards/rejected": rewards_rejected.mean(),
        "rewards/margins": (rewards_chosen - rewards_rejected).mean(),
        "rewards/accuracies": (rewards_chosen > rewards_rejected).to(rewards_chosen.dtype).mean(),
        "logps/chosen": logps_chosen.mean(),
        "logps/rejected": logps_rejected.mean(),
    }
    return {name: value.detach() for name, value in metrics.items()}
