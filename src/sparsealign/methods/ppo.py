"""Offline, one-step PPO as in HALOs (Ethayarajh et al. 2024, arXiv:2402.01306, ``PPOTrainer``).

The preference data are episodes of the frozen reference: each chosen response earns +1 and each rejected one
−1 on its last token. A value head on the policy's final hidden states (:class:`ValueHead`, run inside the
policy's forward as the method's module) gives V_t for every response token; GAE (γ, λ) turns rewards and
values into whitened advantages Â_t and the discounted returns G_t; the loss is

    mean_t max(−Â_t ρ_t, −Â_t clip(ρ_t, c, 1/c)) + critic_weight · mean_t ½ (V_t − G_t)²
                                                 + kl_weight · mean_t (log π_t − log π_ref,t),

with ρ_t = π_t / π_ref,t and mean_t over all response tokens of the batch (``sparsealign.losses.ppo``).

HALOs computes the values for GAE in a gradient-free forward before the update's forward; with one PPO epoch
both forwards see the same weights, so here one forward serves both (GAE detaches its values). The
value head's dropout mask is the only difference: HALOs draws one per forward, here both uses share one.

As HALOs, the value head is float32 whatever the policy's dtype, its input is detached (the critic trains the
head only), it shares the policy's optimizer settings (``train.weight_decay`` on its weight matrices), and its
gradient norm is clipped on its own (HALOs' ``model.v_head_max_grad_norm``, 0.1) rather than with the
language model's (``train.max_grad_norm``): the module sets ``max_grad_norm``, which
``sparsealign.train.step.clip_gradients`` honours for any method's module. Under DeepSpeed the engine clips
every gradient together from its own config, so there the value head has no separate clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsealign.config import Config, ConfigError
from sparsealign.losses import LossOutput, gae_advantages, ppo_loss, terminal_rewards
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register
from sparsealign.models.logprobs import TokenOutputs
from sparsealign.models.value_head import ValueHead


@dataclass
class PPOOptions(MethodOptions):
    gamma: float = option("Discount γ of GAE and of the value head's targets (HALOs' loss.gamma).", 0.99)
    gae_lambda: float = option("λ of generalised advantage estimation (HALOs' loss.lam).", 0.95)
    ratio_clip: float = option(
        "c: the ratio π/π_ref is clipped to [c, 1/c] in the policy term (HALOs' loss.cliprange).", 0.5
    )
    critic_weight: float = option(
        "Weight of the value head's loss ½(V − G)² (HALOs' loss.critic_coef).", 0.01
    )
    kl_weight: float = option(
        "Weight of the KL penalty, the mean of log π − log π_ref over response tokens (HALOs' loss.KL_coef).",
        0.1,
    )
    value_head_dropout: float = option(
        "Dropout of the value head's two hidden layers (HALOs' summary_dropout_prob).", 0.1
    )
    value_head_max_grad_norm: float | None = option(
        "Clip the value head's gradient norm to this, apart from the policy's train.max_grad_norm (HALOs' "
        "model.v_head_max_grad_norm); null: no clip of its own, clipped together with the policy.",
        0.1,
    )


class TokenValues(nn.Module):
    """The value head as the method's module: ``[N, T]`` values V_t (float32) from the policy's final hidden
    rows that predict the response tokens (``policy.head_inputs``), zero where ``policy.mask`` is 0.

    ``max_grad_norm`` (the value head's own gradient clip, or None) is read by the training step."""

    def __init__(self, head: ValueHead, max_grad_norm: float | None) -> None:
        super().__init__()
        self.head = head
        self.max_grad_norm = max_grad_norm

    def forward(self, policy: TokenOutputs, reference: TokenOutputs | None = None) -> torch.Tensor:
        rows = self.head(policy.head_inputs)
        return rows.new_zeros(policy.mask.shape).masked_scatter(policy.mask.bool(), rows)


def value_head(options: PPOOptions, model_config: Any, seed: int) -> nn.Module:
    """A :class:`ValueHead` as wide as the policy's final hidden states (OPT's ``word_embed_proj_dim`` when
    it has one, as HALOs), initialised from ``seed`` without touching the global random state."""
    width = getattr(model_config, "word_embed_proj_dim", None) or model_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ValueHead(width, options.value_head_dropout)
    return TokenValues(head, options.value_head_max_grad_norm)


def ppo(out: StepOutputs, options: PPOOptions) -> LossOutput:
    """Scores +1 (chosen rows) and −1 (rejected rows) on each response's last token, GAE on the value head's
    outputs, then :func:`~sparsealign.losses.ppo_loss` against the reference's log-probs."""
    if out.reference is None or out.reference.logps is None:
        raise ValueError("PPO needs the reference's log-probs: declare Need.REFERENCE_LOGPS")
    policy, values = out.policy, out.policy.extra
    if values is None:
        raise ValueError("PPO needs the value head's outputs: the policy must run the method's module")
    mask, b = policy.mask, out.num_pairs
    scores = torch.cat([values.new_ones(b), -values.new_ones(b)])
    rewards = terminal_rewards(scores, mask)
    advantages, returns = gae_advantages(rewards, values, mask, options.gamma, options.gae_lambda)
    result = ppo_loss(
        policy.logps, out.reference.logps, values, advantages, returns, mask,
        ratio_clip=options.ratio_clip, critic_weight=options.critic_weight, kl_weight=options.kl_weight,
    )  # fmt: skip
    summed = (policy.logps * mask).sum(-1).detach()
    result.metrics["logps/chosen"] = summed[:b].mean()
    result.metrics["logps/rejected"] = summed[b:].mean()
    return result


def _check(config: Config) -> None:
    m = config.method
    if not (0.0 <= m.gamma <= 1.0 and 0.0 <= m.gae_lambda <= 1.0):
        raise ConfigError("'method.gamma' and 'method.gae_lambda' must be in [0, 1].")
    if not 0.0 < m.ratio_clip < 1.0:
        raise ConfigError(
            "'method.ratio_clip' must be in (0, 1): the ratio is clipped to [c, 1/c] (HALOs: 0.5)."
        )
    if m.critic_weight < 0 or m.kl_weight < 0:
        raise ConfigError("'method.critic_weight' and 'method.kl_weight' must be >= 0.")
    if not 0.0 <= m.value_head_dropout < 1.0:
        raise ConfigError("'method.value_head_dropout' must be in [0, 1).")
    if m.value_head_max_grad_norm is not None and m.value_head_max_grad_norm <= 0:
        raise ConfigError(
            "'method.value_head_max_grad_norm' must be positive, or null for no clip of its own."
        )


register(
    Method(
        "ppo",
        ppo,
        PPOOptions,
        {Need.REFERENCE_LOGPS},
        "offline one-step PPO with a value head (HALOs, Ethayarajh et al. 2024)",
        module=value_head,
        citation=(
            "Schulman et al. 2017, Proximal Policy Optimization Algorithms, "
            "arXiv:1707.06347; offline as in HALOs, Ethayarajh et al. 2024, arXiv:2402.01306"
        ),
        check=_check,
    )
)
