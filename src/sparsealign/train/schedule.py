"""Learning-rate schedules: linear warm-up from 0, then constant, linear decay or cosine decay to 0."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{kind}'")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, kind: str) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, kind))
