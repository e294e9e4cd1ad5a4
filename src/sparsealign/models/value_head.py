"""The value head of offline PPO: a scalar value for each response token, from the policy's hidden state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ValueHead"]


class ValueHead(nn.Module):
    """HALOs' PPO value head (``models.ValueHead``): an MLP from a final hidden state to a scalar,

        V(h) = W₃ · ReLU(drop(W₂ · ReLU(drop(W₁ h + b₁)) + b₂)) + b₃,    W₁, W₂: d × d,  W₃: 1 × d,

    with dropout p = ``dropout`` (HALOs' ``summary_dropout_prob``, 0.1) and PyTorch's default ``nn.Linear``
    initialisation (HALOs' default init strategy). As in HALOs, the hidden states are **detached** (the
    critic's loss trains the head only, never the language model) and the head is built in float32 and
    runs in its parameters' dtype whatever the policy's (HALOs: fp32 matters for good value estimates;
    keep it out of a bf16 cast of the policy; autocast is off inside it). The values are returned in float32.

    Feed it the final hidden rows that predict the response tokens, i.e. the rows whose logits give the
    response log-probs (``TokenOutputs.head_inputs``, ``[M, d]``), so that value t is aligned with
    log-prob t; ``hidden_size`` is their width d. Any leading shape works: ``[..., d] -> [...]``.
    Saved and loaded with ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_size = hidden_size
        self.summary = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """Values ``[...]`` (float32) of hidden states ``[..., d]``; no gradient reaches ``hidden``."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden states of width {self.hidden_size}, got {hidden.shape[-1]}")
        weight = self.summary[0].weight
        with torch.autocast(hidden.device.type, enabled=False):  # no bf16/fp16 matmuls under mixed precision
            values = self.summary(hidden.detach().to(weight.dtype))
        return values.squeeze(-1).to(torch.float32)
