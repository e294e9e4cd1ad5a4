"""Offline PPO (HALOs): terminal rewards, GAE and whitening by hand, the clipped objective by hand, masking,
gradients, and the value head (shape, dtype, detached input, state_dict round trip, on a tiny model); then the
method: its step against a closed-form GAE, the value head's own gradient clip, and the value head saved in
``final/``, loaded, and resumed with the policy."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from sparsealign.losses import LossOutput, gae_advantages, ppo_loss, terminal_rewards
from sparsealign.models.value_head import ValueHead

F64 = torch.float64


def t(values: list, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def whiten(values: list[float]) -> list[float]:
    """(x − mean) / sqrt(var + 1e−8), biased variance, in plain Python."""
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / len(values)
    return [(x - mean) / math.sqrt(var + 1e-8) for x in values]


# --- rewards --------------------------------------------------------------------------------------------


def test_terminal_rewards_on_the_last_response_token():
    """+1 / −1 / +1 on each row's last real token; the empty row gets nothing."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    rewards = terminal_rewards(t([1.0, -1.0, 1.0]), mask)
    assert_close(rewards, t([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_terminal_rewards_refuses_wrong_score_shape():
    with pytest.raises(ValueError, match="scores"):
        terminal_rewards(t([1.0]), torch.ones(2, 3, dtype=torch.bool))


# --- GAE ------------------------------------------------------------------------------------------------


def test_gae_1x4_by_hand():
    """γ = λ = 0.5 (γλ = 0.25), V = [1, 0.5, 0.25, 0.5], reward +1 on the last token.

    δ₃ = 1 + 0.5·0 − 0.5 = 0.5           A₃ = 0.5
    δ₂ = 0 + 0.5·0.5 − 0.25 = 0          A₂ = 0 + 0.25·0.5 = 0.125
    δ₁ = 0 + 0.5·0.25 − 0.5 = −0.375     A₁ = −0.375 + 0.25·0.125 = −0.34375
    δ₀ = 0 + 0.5·0.5 − 1 = −0.75         A₀ = −0.75 + 0.25·(−0.34375) = −0.8359375
    Returns G_t = γ^{3−t}: [0.125, 0.25, 0.5, 1]. Advantages are whitened over the 4 tokens.
    """
    mask = torch.ones(1, 4, dtype=torch.bool)
    rewards = terminal_rewards(t([1.0]), mask)
    advantages, returns = gae_advantages(rewards, t([[1.0, 0.5, 0.25, 0.5]]), mask, gamma=0.5, lam=0.5)
    assert_close(advantages, t([whiten([-0.8359375, -0.34375, 0.125, 0.5])]))
    assert_close(returns, t([[0.125, 0.25, 0.5, 1.0]]))


def test_gae_2x3_with_padding_by_hand():
    """γ = λ = 0.5. Row 0: V = [0.5, 0.5, 0.5], reward +1 at t = 2. Row 1: two tokens, V = [1, −0.5] and a
    junk value 9 at the padded position (ignored), reward −1 at t = 1.

    Row 0: δ = [0.5·0.5 − 0.5, 0.5·0.5 − 0.5, 1 − 0.5] = [−0.25, −0.25, 0.5]
           A₂ = 0.5, A₁ = −0.25 + 0.25·0.5 = −0.125, A₀ = −0.25 + 0.25·(−0.125) = −0.28125
           G = [0.25, 0.5, 1]
    Row 1: the padded position is terminal (V there counts as 0):
           δ₁ = −1 + 0 + 0.5 = −0.5 → A₁ = −0.5;  δ₀ = 0.5·(−0.5) − 1 = −1.25 → A₀ = −1.25 + 0.25·(−0.5) = −1.375
           G = [−0.5, −1, 0]
    Whitening uses the 5 real tokens; padding stays 0.
    """
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards = terminal_rewards(t([1.0, -1.0]), mask)
    values = t([[0.5, 0.5, 0.5], [1.0, -0.5, 9.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    w = whiten([-0.28125, -0.125, 0.5, -1.375, -0.5])
    assert_close(advantages, t([[w[0], w[1], w[2]], [w[3], w[4], 0.0]]))
    assert_close(returns, t([[0.25, 0.5, 1.0], [-0.5, -1.0, 0.0]]))


def test_gae_with_zero_values_is_discounted_reward():
    """HALOs' defaults γ = 0.99, λ = 0.95. With V = 0 every δ is 0 but the last, so A_t = (γλ)^{L−t} R and
    G_t = γ^{L−t} R (L the last token). Row 0: L = 3, R = 1; row 1: L = 1, R = −1 (two padded columns)."""
    gamma, lam = 0.99, 0.95
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    rewards = terminal_rewards(t([1.0, -1.0]), mask)
    advantages, returns = gae_advantages(rewards, torch.zeros(2, 4, dtype=F64), mask)
    raw = [(gamma * lam) ** (3 - i) for i in range(4)] + [-((gamma * lam) ** (1 - i)) for i in range(2)]
    w = whiten(raw)
    assert_close(advantages, t([w[:4], [*w[4:], 0.0, 0.0]]))
    assert_close(returns, t([[gamma**3, gamma**2, gamma, 1.0], [-gamma, -1.0, 0.0, 0.0]]))


def test_gae_ignores_extra_padding_and_has_no_gradient():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards = terminal_rewards(t([1.0, -1.0]), mask)
    values = t([[0.3, -0.2, 0.1], [0.4, 0.7, 0.0]]).requires_grad_(True)
    advantages, returns = gae_advantages(rewards, values, mask)
    assert not advantages.requires_grad and not returns.requires_grad
    pad = torch.zeros(2, 1, dtype=F64)
    more = gae_advantages(
        torch.cat([rewards, pad], 1),
        torch.cat([values.detach(), pad + 5], 1),
        torch.cat([mask, pad.bool()], 1),
    )
    assert_close(more[0][:, :3], advantages)
    assert_close(more[1][:, :3], returns)
    assert (more[0][:, 3] == 0).all() and (more[1][:, 3] == 0).all()


def test_gae_refuses_bad_settings():
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(torch.zeros(1, 2), torch.zeros(1, 2), mask, gamma=1.5)


# --- the PPO loss ---------------------------------------------------------------------------------------

LOG_RATIOS = [[math.log(3.0), math.log(0.25), math.log(1.5)], [math.log(3.0), math.log(0.25), 0.0]]


def ppo_batch() -> dict[str, torch.Tensor]:
    """Ratios ρ = [[3, 0.25, 1.5], [3, 0.25, pad]], advantages [[1, 1, 1], [−2, −2, pad]].

    Reference log-probs −2 everywhere, policy = ref + log ρ; padding holds junk.
    """
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    ref = t([[-2.0, -2.0, -2.0], [-2.0, -2.0, -9.0]])
    policy = ref + t(LOG_RATIOS)
    policy[1, 2] = 5.0
    return {
        "policy_logps": policy,
        "ref_logps": ref,
        "values": t([[0.5, 0.0, 1.0], [-1.0, 2.0, 3.0]]),
        "advantages": t([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]]),
        "returns": t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        "mask": mask,
    }


def test_clipped_objective_by_hand():
    """c = 0.5 clips ρ to [0.5, 2]. Per token max(−Âρ, −Â clip(ρ)):

    Â = +1, ρ = 3:    max(−3, −2) = −2        (clipped: no credit beyond ρ = 2)
    Â = +1, ρ = 0.25: max(−0.25, −0.5) = −0.25
    Â = +1, ρ = 1.5:  −1.5                    (inside the range)
    Â = −2, ρ = 3:    max(6, 4) = 6           (the pessimistic, unclipped term)
    Â = −2, ρ = 0.25: max(0.5, 1) = 1         (clipped)
    policy = (−2 − 0.25 − 1.5 + 6 + 1) / 5 = 0.65; clipfrac = 2/5.
    critic = ½ · mean((V − G)²) = ½ · (0.25 + 0 + 1 + 1 + 1) / 5 = 0.325.
    kl = mean(log ρ) over the 5 tokens.
    """
    out = ppo_loss(**ppo_batch(), ratio_clip=0.5, critic_weight=0.01, kl_weight=0.1)
    kl = (2 * math.log(3.0) + 2 * math.log(0.25) + math.log(1.5)) / 5
    assert_close(out.metrics["ppo/loss/policy"], t(0.65))
    assert_close(out.metrics["ppo/loss/value"], t(0.325))
    assert_close(out.metrics["ppo/policy/kl"], t(kl))
    assert_close(out.loss, t(0.65 + 0.01 * 0.325 + 0.1 * kl))
    assert_close(out.metrics["ppo/loss/total"], out.loss.detach())
    assert_close(out.metrics["ppo/policy/clipfrac"], t(0.4))
    assert_close(out.metrics["ppo/policy/ratio"], t((3 + 0.25 + 1.5 + 3 + 0.25) / 5))
    assert_close(out.metrics["ppo/returns/mean"], t(0.4))
    assert_close(out.metrics["ppo/returns/var"], t((0.36 + 0.16 + 0.16 + 0.16 + 0.36) / 5))
    assert_close(out.metrics["ppo/val/mean"], t(0.5))
    assert_close(out.metrics["ppo/val/var"], t((0 + 0.25 + 0.25 + 2.25 + 2.25) / 5))
    # per row: N · (row's token sum) / (all tokens); row 0 tokens: policy −2 − 0.25 − 1.5, critic ½(0.25 + 0 + 1)
    row0 = 2 * (-3.75 + 0.01 * 0.625 + 0.1 * (math.log(3.0) + math.log(0.25) + math.log(1.5))) / 5
    assert_close(out.per_example[0], t(row0))
    assert_close(out.per_example.mean(), out.loss)


def test_clipped_tokens_get_no_policy_gradient():
    """With kl_weight = 0 the policy gradient is −Âρ / N at unclipped tokens and 0 at clipped ones; the
    value gradient is critic_weight · (V − G) / N; padding gets nothing."""
    b = ppo_batch()
    b["policy_logps"].requires_grad_(True)
    b["values"].requires_grad_(True)
    ppo_loss(**b, ratio_clip=0.5, critic_weight=0.01, kl_weight=0.0).loss.backward()
    assert_close(b["policy_logps"].grad, t([[0.0, -0.25 / 5, -1.5 / 5], [6.0 / 5, 0.0, 0.0]]))
    assert_close(b["values"].grad, 0.01 * t([[-0.5, 0.0, 1.0], [-1.0, 1.0, 0.0]]) / 5)


def test_ratio_one_is_minus_mean_advantage():
    """At π = ref no clipping: policy = mean(−Â), kl = 0; whitened advantages have mean 0, so policy = 0."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    values = t([[0.2, 0.1, -0.3], [0.5, 0.0, 0.0]])
    advantages, returns = gae_advantages(terminal_rewards(t([1.0, -1.0]), mask), values, mask)
    logps = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    out = ppo_loss(logps, logps, values, advantages, returns, mask)
    assert_close(out.metrics["ppo/loss/policy"], t(0.0))
    assert_close(out.metrics["ppo/policy/kl"], t(0.0))
    assert_close(out.metrics["ppo/policy/clipfrac"], t(0.0))


def test_extra_padding_column_changes_nothing():
    b = ppo_batch()
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1) for k, v in b.items()}
    out, out_padded = ppo_loss(**b), ppo_loss(**padded)
    assert_close(out_padded.per_example, out.per_example)
    for key, value in out.metrics.items():
        assert_close(out_padded.metrics[key], value)


def test_gradcheck():
    """Float64 finite differences w.r.t. policy log-probs and values, ratios away from the clip edges."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(5) < torch.tensor([5, 3, 1, 4])[:, None]
    ref = -3 * torch.rand(4, 5, generator=g, dtype=F64) * mask
    # log ρ on both sides of the clip edges ±log 2 ≈ ±0.69, never on them
    log_ratio = t([-1.2, -0.4, 0.1, 0.5, 1.0, 0.3, -0.9, 0.8, -0.1, 1.1] * 2).view(4, 5) * mask
    values = torch.randn(4, 5, generator=g, dtype=F64) * mask
    advantages, returns = gae_advantages(terminal_rewards(t([1.0, -1.0, 1.0, -1.0]), mask), values, mask)

    def fn(policy: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ppo_loss(policy, ref, v, advantages, returns, mask, critic_weight=0.5).per_example

    inputs = ((ref + log_ratio).requires_grad_(True), (values + 0.1).requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)


def test_output_shapes_and_detached_metrics():
    b = ppo_batch()
    b["policy_logps"].requires_grad_(True)
    out = ppo_loss(**b)
    assert isinstance(out, LossOutput)
    assert out.per_example.shape == (2,) and out.loss.shape == () and out.loss.requires_grad
    assert all(k.startswith("ppo/") for k in out.metrics)
    assert all(v.shape == () and not v.requires_grad for v in out.metrics.values())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ratio_clip"):
        ppo_loss(**ppo_batch(), ratio_clip=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        ppo_loss(**ppo_batch(), critic_weight=-1.0)


# --- the value head -------------------------------------------------------------------------------------


def test_value_head_shapes_dtype_and_detached_input():
    torch.manual_seed(0)
    head = ValueHead(8, dropout=0.0)
    hidden = torch.randn(3, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    values = head(hidden)
    assert values.shape == (3, 5) and values.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in head.parameters())
    values.sum().backward()
    assert hidden.grad is None  # the critic never trains the language model
    assert all(p.grad is not None for p in head.parameters())
    assert head(torch.randn(4, 8)).shape == (4,)
    with pytest.raises(ValueError, match="width"):
        head(torch.randn(2, 7))


def test_value_head_state_dict_round_trip(tmp_path: Path):
    """Saved as safetensors and loaded into a fresh head (other seed), it gives the same values."""
    torch.manual_seed(1)
    head = ValueHead(16).eval()
    save_file(head.state_dict(), tmp_path / "value_head.safetensors")
    torch.manual_seed(2)
    fresh = ValueHead(16).eval()
    hidden = torch.randn(6, 16)
    assert not torch.equal(fresh(hidden), head(hidden))
    fresh.load_state_dict(load_file(tmp_path / "value_head.safetensors"))
    assert torch.equal(fresh(hidden), head(hidden))


def test_value_head_dropout_only_in_training():
    torch.manual_seed(3)
    head = ValueHead(32, dropout=0.5)
    hidden = torch.randn(64, 32)
    head.eval()
    assert torch.equal(head(hidden), head(hidden))
    head.train()
    assert not torch.equal(head(hidden), head(hidden))


def test_ppo_step_on_a_tiny_model():
    """The pieces together: values from the policy's head inputs, GAE on ±1 terminal rewards, the loss, one
    backward; the value head gets gradients from the critic term, the policy from the policy term."""
    from sparsealign.data.collate import collate_pairs
    from sparsealign.models.logprobs import TokenModel
    from tiny_models import random_pairs, tiny_llama

    model = TokenModel(tiny_llama(seed=0))
    pairs = random_pairs(3, seed=0)
    batch = collate_pairs(pairs, pad_id=2)
    with torch.no_grad():
        ref = model(batch)
    out = model(batch)
    head = ValueHead(out.head_inputs.shape[-1], dropout=0.0)
    mask = out.mask

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        return rows.new_zeros(mask.shape).masked_scatter(mask, rows)

    values = scatter(head(out.head_inputs))
    scores = torch.tensor([1.0] * 3 + [-1.0] * 3)
    advantages, returns = gae_advantages(terminal_rewards(scores, mask), values, mask)
    loss = ppo_loss(out.logps, ref.logps, values, advantages, returns, mask)
    assert_close(loss.metrics["ppo/policy/ratio"], torch.tensor(1.0))  # same weights: ρ = 1
    loss.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- the method: one step through the trainer's step components ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"


def test_method_step_matches_closed_form_gae():
    """The method's step on 3 tiny pairs, policy = reference (ρ = 1, so no token is clipped), γ = 0.9,
    λ = 0.8. Per row of length L with score R (+1 for the 3 chosen rows, −1 for the 3 rejected ones) and the
    value head's own V (V_L = 0):

        δ_t = R·[t = L−1] + γ V_{t+1} − V_t,   A_t = Σ_k (γλ)^k δ_{t+k},   G_t = γ^{L−1−t} R,

    the closed forms of GAE's recursion and of the returns; Â = whiten(A) over the M tokens of the batch. The
    loss then has ∂/∂log π_t = (−Â_t + kl_weight) / M and ∂/∂V_t = critic_weight (V_t − G_t) / M, which
    recovers Â and G token by token from the real step (values, rewards, GAE and loss wired together)."""
    from sparsealign.data.collate import collate_pairs
    from sparsealign.methods import get_method
    from sparsealign.models.loading import ModelBundle
    from sparsealign.models.logprobs import TokenModel
    from sparsealign.train.step import StepInputs, step_outputs
    from tiny_models import random_pairs, tiny_llama

    gamma, lam, critic_weight, kl_weight = 0.9, 0.8, 0.5, 0.1
    method = get_method("ppo")
    options = method.options(
        name="ppo", gamma=gamma, gae_lambda=lam, critic_weight=critic_weight, kl_weight=kl_weight,
        value_head_dropout=0.0,
    )  # fmt: skip
    model = tiny_llama(seed=0)
    bundle = ModelBundle(model, tokenizer=None, reference=copy.deepcopy(model))
    policy = TokenModel(model, extra=method.module(options, model.config, 0)).train()
    pairs = random_pairs(3, seed=1)
    batch = collate_pairs(pairs, pad_id=2)
    out = step_outputs(policy, StepInputs(method, options, batch, pairs, bundle))
    values, logps, mask = out.policy.extra, out.policy.logps, out.policy.mask
    assert_close(values[mask], policy.extra.head(out.policy.head_inputs))  # the head's values, scattered
    assert (values[~mask] == 0).all() and values.dtype == torch.float32
    values.retain_grad()
    logps.retain_grad()
    result = method.loss(out, options)
    result.loss.backward()

    raw, returns = [], []
    for n, length in enumerate(mask.sum(-1).tolist()):
        score = 1.0 if n < 3 else -1.0
        v = values[n, :length].tolist() + [0.0]
        delta = [(score if t == length - 1 else 0.0) + gamma * v[t + 1] - v[t] for t in range(length)]
        raw += [sum((gamma * lam) ** k * delta[t + k] for k in range(length - t)) for t in range(length)]
        returns += [gamma ** (length - 1 - t) * score for t in range(length)]
    tokens = len(raw)
    advantages = t(whiten(raw))
    returns_t = t(returns)
    assert_close(logps.grad[mask].double(), (-advantages + kl_weight) / tokens, atol=1e-6, rtol=1e-5)
    expected = critic_weight * (values[mask].detach().double() - returns_t) / tokens
    assert_close(values.grad[mask].double(), expected, atol=1e-6, rtol=1e-5)
    assert (logps.grad[~mask] == 0).all() and (values.grad[~mask] == 0).all()
    assert_close(result.metrics["ppo/returns/mean"].double(), returns_t.mean(), atol=1e-6, rtol=1e-6)
    assert_close(result.metrics["ppo/policy/ratio"], torch.tensor(1.0))
    assert_close(result.metrics["ppo/loss/policy"], torch.tensor(0.0), atol=1e-6, rtol=0)
    critic = 0.5 * ((values[mask].detach().double() - returns_t) ** 2).mean()
    assert_close(result.loss.double(), critic_weight * critic, atol=1e-6, rtol=1e-5)


def test_value_head_gradient_is_clipped_apart_from_the_policy():
    """With ``value_head_max_grad_norm`` the value head's gradients are clipped to it on their own and the
    language model's to ``train.max_grad_norm`` (the returned norm is the model's alone); with null, all
    together, as for every other method."""
    from accelerate import Accelerator

    from sparsealign.methods import get_method
    from sparsealign.models.logprobs import TokenModel
    from sparsealign.train.step import clip_gradients
    from tiny_models import tiny_llama

    method = get_method("ppo")
    accelerator = Accelerator(cpu=True)

    def norm(params) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    for own in (0.1, None):
        model = tiny_llama(seed=0)
        options = method.options(name="ppo", value_head_max_grad_norm=own)
        policy = TokenModel(model, extra=method.module(options, model.config, 0))
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        for p in policy.extra.parameters():
            p.grad = torch.full_like(p, 0.5)
        lm_norm, head_norm = norm(model.parameters()), norm(policy.extra.parameters())
        assert lm_norm > 1.0 and head_norm > 1.0
        returned = clip_gradients(accelerator, policy, 1.0)
        if own is not None:
            assert float(returned) == pytest.approx(lm_norm, rel=1e-5)
            assert norm(policy.extra.parameters()) == pytest.approx(0.1, rel=1e-4)
            assert norm(model.parameters()) == pytest.approx(1.0, rel=1e-4)
        else:
            assert float(returned) == pytest.approx(math.hypot(lm_norm, head_norm), rel=1e-5)
            assert norm(policy.parameters()) == pytest.approx(1.0, rel=1e-4)
            ratio = norm(policy.extra.parameters()) / norm(model.parameters())
            assert ratio == pytest.approx(head_norm / lm_norm, rel=1e-4)  # one common scale


def test_bad_options_are_refused():
    from sparsealign.config import ConfigError
    from sparsealign.recipes.load import load_config

    for bad, match in (
        ("method.ratio_clip=1.5", "ratio_clip"),
        ("method.gae_lambda=2", "gae_lambda"),
        ("method.value_head_max_grad_norm=0", "value_head_max_grad_norm"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(SMOKE, ["method.name=ppo", bad])


# --- the value head saved, loaded and resumed with the policy -------------------------------------------

COMMON = ["method.name=ppo", "train.max_steps=6", "train.save_every=0", "train.eval_every=0"]


def ppo_smoke(folder: Path, *overrides: str):
    from sparsealign.recipes.load import load_config

    base = [
        f"output_dir={folder}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
    ]
    return load_config(SMOKE, base + COMMON + list(overrides))


def train_losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows if "loss" in m}


def head_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The value head's tensors in a checkpoint, named as in the module (``extra.`` dropped)."""
    weights = load_file(checkpoint / "trainable.safetensors")
    return {k.removeprefix("extra."): v for k, v in weights.items() if k.startswith("extra.")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    from sparsealign.train.loop import train

    folder = tmp_path_factory.mktemp("ppo") / "full"
    result = train(ppo_smoke(folder))
    assert result.steps == 6
    return folder


def test_final_holds_the_trained_value_head_and_loads_it(full_run):
    """``final/`` holds the value head (``method_module.*``) and the options that built it;
    ``load_method_module`` rebuilds it with the trained weights (those of the last checkpoint, and not the
    initial ones)."""
    from transformers import AutoConfig

    from sparsealign.methods import MODULE_CONFIG, MODULE_WEIGHTS, get_method, load_method_module

    final = full_run / "final"
    assert (final / MODULE_WEIGHTS).is_file() and (final / MODULE_CONFIG).is_file()
    config = AutoConfig.from_pretrained(final)
    module, options = load_method_module(final, config)
    assert options.name == "ppo" and (options.gamma, options.gae_lambda) == (0.99, 0.95)
    assert module.max_grad_norm == options.value_head_max_grad_norm == 0.1
    trained = head_weights(full_run / "checkpoints/step-6")
    loaded = module.state_dict()
    assert loaded.keys() == trained.keys() and any(k.startswith("head.summary.") for k in loaded)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    initial = get_method("ppo").module(options, config, 42).state_dict()  # the smoke recipe's seed
    assert any(not torch.equal(initial[k], trained[k]) for k in trained), "the value head did not train"
    hidden = torch.randn(5, config.hidden_size)
    assert torch.isfinite(module.eval().head(hidden)).all()


def test_kill_and_resume_reproduces_losses_and_value_head(full_run, tmp_path, monkeypatch):
    """Ctrl-C during step 4 leaves a checkpoint at step 3; ``train.resume=auto`` finishes the run with the
    uninterrupted run's losses (to 1e-6) and value head (the dropout masks come back with the RNG state)."""
    from sparsealign.train import loop
    from sparsealign.train.checkpoint import list_checkpoints

    original = loop.compute_loss
    calls = {"n": 0}

    def interrupt_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # one micro-batch per step
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", interrupt_at_step_4)
    result = loop.train(ppo_smoke(tmp_path))
    assert result.interrupted and result.steps == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3"]
    assert set(head_weights(tmp_path / "checkpoints/step-3")) == set(
        head_weights(full_run / "checkpoints/step-6")
    )
    monkeypatch.setattr(loop, "compute_loss", original)
    result = loop.train(ppo_smoke(tmp_path, "train.resume=auto"))
    assert result.steps == 6 and not result.interrupted
    full, resumed = train_losses(full_run), train_losses(tmp_path)
    assert sorted(resumed) == sorted(full) == list(range(1, 7))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    expected = head_weights(full_run / "checkpoints/step-6")
    for name, value in head_weights(tmp_path / "checkpoints/step-6").items():
        assert_close(value, expected[name], atol=1e-6, rtol=1e-5)
    final = load_file(tmp_path / "final/method_module.safetensors")
    assert_close(final, load_file(full_run / "final/method_module.safetensors"), atol=1e-6, rtol=1e-5)
