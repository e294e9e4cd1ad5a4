"""Offline, one-step PPO as in HALOs (Ethayarajh et al. 2024, arXiv:2402.01306, §4 and ``PPOTrainer``).

The responses of the preference data are treated as the episodes of a frozen "old" policy, the reference
model: a chosen response earns +1 and a rejected one −1, on its last token (:func:`terminal_rewards`).
Advantages come from generalised advantage estimation over the values of a value head on the policy
(:func:`gae_advantages`); the policy takes one clipped PPO step against the reference's log-probs and the
value head regresses on the discounted rewards-to-go (:func:`ppo_loss`). PPO: Schulman et al. 2017,
arXiv:1707.06347; GAE: Schulman et al. 2016, arXiv:1506.02438.

All tensors are response-aligned ``[N, T]`` with one row per response (for paired data, the chosen rows
then the rejected rows) and zero where ``mask`` is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes

__all__ = ["gae_advantages", "ppo_loss", "terminal_rewards"]


def _token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over every masked token of the batch (not per row): a scalar; 0 for an empty mask."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def _token_var(values: Tensor, mask: Tensor) -> Tensor:
    """Biased variance over every masked token of the batch, as HALOs' ``masked_var``."""
    return _token_mean((values - _token_mean(values, mask)) ** 2, mask)


def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """``[N]`` scores placed on the last response token of each row: ``[N, T]``, zero elsewhere.

    HALOs' offline PPO scores a chosen response +1 and a rejected one −1. A row with no token gets no reward.
    """
    check_shapes(mask, mask)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"expected [N] scores for {mask.shape[0]} rows, got shape {tuple(scores.shape)}")
    m = mask.to(torch.long)
    last = (m.cumsum(dim=-1) == m.sum(dim=-1, keepdim=True)) & mask.bool()
    return scores.unsqueeze(-1) * last.to(scores.dtype)


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 0.99, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and the critic's targets, without gradients (HALOs'
    ``compute_advantages``). With r and V zeroed where the mask is 0 and V_{T} = 0,

        δ_t = r_t + γ V_{t+1} − V_t,      A_t = δ_t + γλ A_{t+1},      G_t = r_t + γ G_{t+1},

    each recursion restarting at a masked position (so padding after a response is a terminal state).
    The advantages are then whitened over all response tokens of the batch,
    Â = (A − mean A) / sqrt(var A + 1e−8) (biased variance), as HALOs does; the returns G (the discounted
    rewards-to-go, current reward included, as HALOs' current code; its legacy code left out the current
    token's reward) are what the value head regresses on. Both are zero where the mask is 0.

    ``values`` are the value head's outputs before the update (detached here). Returns ``(Â, G)``.
    """
    check_shapes(rewards, values, mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(values.dtype)
    v = values.detach() * m
    r = rewards.detach().to(values.dtype) * m
    advantages, returns = torch.zeros_like(v), torch.zeros_like(v)
    gae, future, next_value = (torch.zeros_like(v[:, 0]) for _ in range(3))
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        gae = (delta + gamma * lam * gae) * m[:, t]
        future = (r[:, t] + gamma * future) * m[:, t]
        advantages[:, t], returns[:, t] = gae, future
        next_value = v[:, t]
    mean, var = _token_mean(advantages, m), _token_var(advantages, m)
    whitened = (advantages - mean) * torch.rsqrt(var + 1e-8) * m
    return whitened, returns


def ppo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    mask: Tensor,
    ratio_clip: float = 0.5,
    critic_weight: float = 0.01,
    kl_weight: float = 0.1,
) -> LossOutput:
    """HALOs' offline one-step PPO loss (``PPOTrainer.loss``).

    The "old" policy of PPO is the reference (the data's frozen policy), so with ρ_t = exp(π_t − ref_t),
    Â and G from :func:`gae_advantages`, V the value head's current outputs and c = ``ratio_clip``:

        policy = mean_t max(−Â_t ρ_t, −Â_t clip(ρ_t, c, 1/c))
        critic = mean_t ½ (V_t − G_t)²
        kl     = mean_t (π_t − ref_t)
        loss   = policy + ``critic_weight`` · critic + ``kl_weight`` · kl

    where mean_t is over all response tokens of the batch (HALOs' ``masked_mean``; longer responses weigh
    more). c = 0.5 clips ρ to [0.5, 2], symmetric in log ρ, as the legacy HALOs code that FPO forked
    (HALOs' current code clips to [1 − c, 1 + c]). The KL term has the sign of KL(π ‖ π_ref), as HALOs'
    current code (the legacy code subtracted it). Defaults: HALOs' ``config/loss/ppo.yaml``.
    ``ref_logps``, ``advantages`` and ``returns`` are detached.

    ``per_example[n]`` is row n's share of the token mean, scaled by N so that ``loss`` is its mean.
    Metrics (TRL's ``ppo/`` names): ``ppo/loss/{total,policy,value}``, ``ppo/policy/kl`` (the KL term),
    ``ppo/policy/clipfrac`` (tokens where the clipped term is the larger), ``ppo/policy/ratio`` (mean ρ),
    ``ppo/returns/{mean,var}``, ``ppo/val/{mean,var}`` (token means and biased variances).
    """
    check_shapes(policy_logps, ref_logps, values, advantages, returns, mask)
    if not 0.0 < ratio_clip < 1.0:
        raise ValueError(f"ratio_clip must be in (0, 1) (the ratio is clipped to [c, 1/c]), got {ratio_clip}")
    if critic_weight < 0 or kl_weight < 0:
        raise ValueError("critic_weight and kl_weight must be non-negative")
    m = mask.to(policy_logps.dtype)
    log_ratio = policy_logps - ref_logps.detach()
    ratio = torch.exp(log_ratio * m)
    advantages, returns = advantages.detach(), returns.detach()

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(ratio_clip, 1.0 / ratio_clip)
    policy_tokens = torch.maximum(unclipped, clipped)
    critic_tokens = 0.5 * (values - returns) ** 2
    per_token = policy_tokens + critic_weight * critic_tokens + kl_weight * log_ratio

    num_rows = policy_logps.shape[0]
    per_example = num_rows * (per_token * m).sum(dim=-1) / m.sum().clamp_min(1)
    policy, critic, kl = (_token_mean(x, m) for x in (policy_tokens, critic_tokens, log_ratio))
    loss = policy + critic_weight * critic + kl_weight * kl

    metrics = {
        "ppo/loss/total": loss,
        "ppo/loss/policy": policy,
        "ppo/loss/value": critic,
        "ppo/policy/kl": kl,
        "ppo/policy/clipfrac": _token_mean((clipped > unclipped).to(m.dtype), m),
        "ppo/policy/ratio": _token_mean(ratio, m),
        "ppo/returns/mean": _token_mean(returns, m),
        "ppo/returns/var": _token_var(returns, m),
        "ppo/val/mean": _token_mean(values, m),
        "ppo/val/var": _token_var(values, m),
    }
    return LossOutput(loss=loss, per_example=per_example, metrics={k: v.detach() for k, v in metrics.items()})
