"""Tests for the token masks: MaPO's activation maps and SparsePO's learned mask networks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sparsealign.losses import sparsepo_loss, tdpo_loss
from sparsealign.masks import MASK_KINDS, MaskModel, activation_mask, build_mask_model

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def widen(token_values: list[list[list[float]]]) -> torch.Tensor:
    """``[B, T, W]`` activations from explicit per-token width vectors."""
    return torch.tensor(token_values, dtype=torch.float32)


# --- activation_mask -----------------------------------------------------------------------------------


def test_activation_mask_by_hand():
    """Two types: ``mlp`` with two tensors (W = 2), ``resid`` with one (W = 3); mask rows of 3 and 2 tokens.

    Width means ā (padded positions hold junk that must not count):
      mlp A1: row 1 [1, 3, 5 | 100]  → min-max [0, 0.5, 1];   row 2 [1, 3 | −50, 9] → [0, 1]
      mlp A2: row 1 [2, 0, 1 | −9]   → [1, 0, 0.5];           row 2 [5, 5 | …]     → constant → [1, 1]
      resid:  row 1 [0, 4, 2 | 7]    → [0, 1, 0.5];           row 2 [−1, 1 | …]    → [0, 1]
    Type maps: mlp = (A1 + A2) / 2 = row 1 [0.5, 0.25, 0.75], row 2 [0.5, 1.0]; resid as above.
    Mask = (mlp + resid) / 2 = row 1 [0.25, 0.625, 0.625, 0], row 2 [0.25, 1.0, 0, 0].
    """
    a1 = widen(
        [
            [[0.0, 2.0], [2.0, 4.0], [4.0, 6.0], [100.0, 100.0]],
            [[1.0, 1.0], [3.0, 3.0], [-50.0, -50.0], [8.0, 10.0]],
        ]
    )
    a2 = widen(
        [
            [[2.0, 2.0], [-1.0, 1.0], [0.0, 2.0], [-9.0, -9.0]],
            [[4.0, 6.0], [5.0, 5.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    )
    resid = widen(
        [
            [[0.0, 0.0, 0.0], [4.0, 4.0, 4.0], [1.0, 2.0, 3.0], [7.0, 7.0, 7.0]],
            [[-1.0, -2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    out = activation_mask({"mlp": [a1, a2], "resid": [resid]}, MASK)
    expected = torch.tensor([[0.25, 0.625, 0.625, 0.0], [0.25, 1.0, 0.0, 0.0]])
    assert out.dtype == torch.float32
    assert_close(out, expected)


def test_activation_mask_range_zero_outside_and_detached():
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(7) < torch.tensor([7, 4, 2, 5])[:, None]
    groups = {
        "attn": [torch.randn(4, 7, 12, generator=g, requires_grad=True) for _ in range(3)],
        "logits": [torch.randn(4, 7, 50, generator=g)],
        "mlp": [],  # a type whose hooks did not fire is skipped
    }
    out = activation_mask(groups, mask)
    assert out.shape == (4, 7)
    assert not out.requires_grad and out.grad_fn is None
    assert (out >= 0).all() and (out <= 1).all()
    assert (out[~mask] == 0).all()
    # Each single map reaches 0 and 1 on every sequence; with one type and one tensor so does the mask.
    single = activation_mask({"logits": groups["logits"]}, mask)
    assert_close(single.masked_fill(~mask, 2.0).amin(-1), torch.zeros(4))
    assert_close(single.amax(-1), torch.ones(4))


def test_activation_mask_degenerate_cases_are_one():
    """A one-token response and constant activations both give 1.0 (neutral, TDPO1's weighting)."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    act = torch.tensor(
        [[[3.0, 1.0], [9.0, 9.0], [0.0, 0.0]], [[2.0, 2.0], [1.0, 3.0], [0.0, 4.0]], [[1.0] * 2] * 3]
    )
    out = activation_mask({"resid": [act]}, mask)
    assert torch.isfinite(out).all()
    assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_activation_mask_rounding_noise_counts_as_constant():
    """Token means that differ only by rounding noise (1e-12 relative, as a LayerNorm output with uniform
    γ) are constant, not stretched to a full-range [0, 1] mask."""
    g = torch.Generator().manual_seed(1)
    act = 1.0 + 1e-12 * torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    assert_close(activation_mask({"resid": [act]}, MASK), MASK.float())


def test_activation_mask_float16_is_finite():
    """fp16 inputs (the paper code NaN'd: σ, min and max were cast to fp16): large values whose width sum
    overflows fp16, constant rows, and a one-token response all give a finite float32 mask in [0, 1]."""
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    big = (60000 * torch.rand(3, 4, 256, generator=g)).half()
    constant = torch.full((3, 4, 64), 0.25).half()
    tiny = (1e-4 * torch.randn(3, 4, 64, generator=g)).half()
    out = activation_mask({"mlp": [big], "resid": [constant, tiny]}, mask)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1).all()
    assert (out[~mask] == 0).all()
    assert_close(out[1, 0], torch.tensor(1.0))  # one token: every map is 1


def test_activation_mask_errors():
    good = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="no activations"):
        activation_mask({"mlp": []}, MASK)
    with pytest.raises(ValueError, match="unknown activation type"):
        activation_mask({"mpl": [good]}, MASK)
    with pytest.raises(ValueError, match=r"must be \[B, T, W\]"):
        activation_mask({"mlp": [torch.zeros(2, 3, 3)]}, MASK)
    bad = good.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite activations .* attn\[1\]"):
        activation_mask({"attn": [good, bad]}, MASK)
    bad[0, 1, 2] = 0.0
    bad[1, 3, 0] = float("inf")  # outside the mask: ignored
    assert torch.isfinite(activation_mask({"attn": [bad]}, MASK)).all()


def test_mapo_with_constant_activations_is_tdpo1():
    """MaPO = shared-mask SparsePO with the activation mask; constant activations give ones, i.e. TDPO1."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logps = [-torch.rand(2, 3, generator=g) * mask for _ in range(4)]
    kls = [torch.rand(2, 3, generator=g) * mask for _ in range(2)]
    m = activation_mask({"resid": [torch.ones(2, 3, 5)]}, mask)
    out = sparsepo_loss(*logps, *kls, mask, mask, m, m, m, m, beta=0.2, shared_mask=True)
    assert_close(out.per_example, tdpo_loss(*logps, *kls, mask, mask, beta=0.2).per_example)


# --- mask networks -------------------------------------------------------------------------------------


def hidden_states(num_layers: int, d: int, mask: torch.Tensor, seed: int = 0) -> dict[int, torch.Tensor]:
    """Random ``[N, T, d]`` states for layers 0..L, zero outside the mask (as TokenOutputs.layers)."""
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(*mask.shape, d, generator=g) * mask.unsqueeze(-1) for i in range(num_layers + 1)}


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shared", [True, False])
def test_every_kind_builds_and_runs(kind: str, shared: bool):
    model = build_mask_model(kind, num_layers=3, hidden_size=16, shared=shared, seed=0)
    assert isinstance(model, MaskModel) and model.shared is shared
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 4])[:, None]
    reward, kl = model(hidden_states(3, 16, mask), mask)
    for out in (reward, kl):
        assert out.shape == (4, 6) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert (out >= 0).all()
        assert (out[~mask] == 0).all()
    assert (reward is kl) is shared


def test_layers_needed():
    assert build_mask_model("simple_all", 4, 8, True, 0).layers() == [1, 2, 3, 4]
    assert build_mask_model("mlp_all", 4, 8, False, 0).layers(4) == [1, 2, 3, 4]
    assert build_mask_model("simple_last", 4, 8, True, 0).layers() == [4]
    assert build_mask_model("mlp_last", 4, 8, True, 0).layers() == [4]
    assert build_mask_model("random", 4, 8, True, 0).layers() == []
    with pytest.raises(ValueError, match="built for 4 layers"):
        build_mask_model("simple_all", 4, 8, True, 0).layers(5)


def test_only_needed_layers_are_read_and_missing_ones_raise():
    mask = torch.ones(2, 3, dtype=torch.bool)
    states = hidden_states(2, 8, mask)
    model = build_mask_model("simple_last", 2, 8, True, 0)
    model({2: states[2]}, mask)  # only layer 2 is needed
    with pytest.raises(ValueError, match=r"needs hidden states of layers \[1, 2\]; missing \[1\]"):
        build_mask_model("simple_all", 2, 8, True, 0)({2: states[2]}, mask)
    with pytest.raises(ValueError, match=r"must be \[N, T, d\]"):
        model({2: states[2][:, :2]}, mask)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("kind", "per_network"),
    [
        # LayerNorm 2d, L scorers of d + 1, bias-free mixer of L: L(d + 1) + L + 2d (spec §3.1).
        ("simple_all", 4 * 17 + 4 + 32),
        ("simple_last", 17 + 32),
        # Per layer d·200 + 200 + 200 + 1, plus LayerNorm and mixer.
        ("mlp_all", 4 * (16 * 200 + 200 + 201) + 4 + 32),
        ("mlp_last", 16 * 200 + 200 + 201 + 32),
        ("random", 0),
    ],
)
def test_parameter_counts_shared_and_independent(kind: str, per_network: int):
    assert count(build_mask_model(kind, 4, 16, shared=True, seed=0)) == per_network
    assert count(build_mask_model(kind, 4, 16, shared=False, seed=0)) == 2 * per_network


def test_independent_networks_differ_and_seed_is_deterministic():
    a = build_mask_model("simple_all", 3, 32, shared=False, seed=7)
    b = build_mask_model("simple_all", 3, 32, shared=False, seed=7)
    c = build_mask_model("simple_all", 3, 32, shared=False, seed=8)
    wa, wb, wc = (m.reward.scores[0].out.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(a.reward.scores[0].out.weight, a.kl.scores[0].out.weight)


def test_build_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    build_mask_model("mlp_all", 3, 32, shared=False, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_initialisation_statistics():
    """Spec §3.2: Linear weights ~ N(0, 0.02), biases 0, LayerNorm γ = 1, β = 0."""
    simple = build_mask_model("simple_all", 8, 512, shared=True, seed=0).reward
    weights = torch.cat([score.out.weight.flatten() for score in simple.scores])  # 4096 values
    assert abs(weights.std().item() - 0.02) < 0.002
    assert abs(weights.mean().item()) < 0.002
    for score in simple.scores:
        assert (score.out.bias == 0).all()
    assert simple.mixer.bias is None
    assert (simple.norm.weight == 1).all() and (simple.norm.bias == 0).all()
    mlp = build_mask_model("mlp_last", 4, 256, shared=True, seed=1).reward
    hidden = mlp.scores[0].hidden.weight  # 51 200 values
    assert abs(hidden.std().item() - 0.02) < 0.0005
    assert (mlp.scores[0].hidden.bias == 0).all() and (mlp.scores[0].out.bias == 0).all()


def test_simple_all_matches_formula():
    """m = ReLU(Σ_l a_l · ReLU(w_l · LN(H^l) + b_l)), LN shared, on layers 1..L (not 0)."""
    model = build_mask_model("simple_all", 3, 8, shared=True, seed=3)
    net = model.reward
    with torch.no_grad():
        for score in net.scores:
            score.out.bias.uniform_(-0.5, 0.5)
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.1, 0.1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    states = hidden_states(3, 8, mask, seed=4)
    norm = torch.nn.functional.layer_norm
    scores = [
        torch.relu(
            norm(states[i], (8,), net.norm.weight, net.norm.bias, 1e-5) @ net.scores[i - 1].out.weight.T
            + net.scores[i - 1].out.bias
        )
        for i in (1, 2, 3)
    ]
    expected = torch.relu(torch.cat(scores, dim=-1) @ net.mixer.weight.T).squeeze(-1)
    reward, _ = model(states, mask)
    assert_close(reward, expected.detach())


def test_float32_compute_with_low_precision_inputs_and_parameters():
    model = build_mask_model("simple_all", 2, 32, shared=True, seed=0)
    mask = torch.arange(5) < torch.tensor([5, 2])[:, None]
    states = hidden_states(2, 32, mask)
    reference, _ = model(states, mask)
    low, _ = model({i: h.bfloat16() for i, h in states.items()}, mask)
    assert low.dtype == torch.float32
    assert_close(low, reference, atol=2e-3, rtol=0.05)
    model.to(torch.bfloat16)
    cast, _ = model(states, mask)
    assert cast.dtype == torch.float32 and torch.isfinite(cast).all()


def test_random_masks_are_seeded():
    mask = torch.ones(3, 4, dtype=torch.bool)
    a = build_mask_model("random", 2, 8, shared=False, seed=5)
    b = build_mask_model("random", 2, 8, shared=False, seed=5)
    ra, ka = a({}, mask)
    rb, kb = b({}, mask)
    assert torch.equal(ra, rb) and torch.equal(ka, kb)
    assert not torch.equal(ra, ka)  # the two independent networks have their own streams
    assert ((ra > 0) & (ra < 1)).all()
    assert not torch.equal(a({}, mask)[0], ra)  # a fresh draw on every call


def test_unknown_kind_error_names_valid_kinds():
    with pytest.raises(ValueError, match=r"valid kinds: simple_all, simple_last, mlp_all, mlp_last, random"):
        build_mask_model("simple_al", 2, 8, True, 0)
    with pytest.raises(ValueError, match="Did you mean 'simple_all'"):
        build_mask_model("simple_al", 2, 8, True, 0)
    with pytest.raises(ValueError, match="Did you mean 'mlp_last'"):
        build_mask_model("ml_last", 2, 8, True, 0)
    with pytest.raises(ValueError, match="positive"):
        build_mask_model("simple_all", 0, 8, True, 0)


@pytest.mark.parametrize("shared", [True, False])
def test_gradient_reaches_mask_parameters_through_sparsepo(shared: bool):
    """Masks from the network, loss from sparsepo_loss with Δ ≠ 0 and KL > 0: every parameter gets a
    gradient, and those on the live path (scorers of active layers, LayerNorm, mixer) a non-zero one."""
    num_pairs, length, d = 3, 5, 16
    model = build_mask_model("simple_all", 4, d, shared=shared, seed=0)
    mask = torch.arange(length) < torch.tensor([5, 3, 4, 2, 5, 1])[:, None]
    states = hidden_states(4, d, mask, seed=1)
    reward, kl = model(states, mask)
    assert (reward > 0).any() and (kl > 0).any()  # not a dead initialisation
    g = torch.Generator().manual_seed(2)
    logps = -torch.rand(4, 2 * num_pairs, length, generator=g) * mask
    token_kl = torch.rand(2 * num_pairs, length, generator=g) * mask
    c, r = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    out = sparsepo_loss(
        logps[0, c], logps[1, r], logps[2, c], logps[3, r], token_kl[c], token_kl[r], mask[c], mask[r],
        reward[c], reward[r], kl[c], kl[r], beta=0.5, l1_reward=0.01, l1_kl=0.01, shared_mask=shared,
    )  # fmt: skip
    out.loss.backward()
    networks = [model.reward] if shared else [model.reward, model.kl]
    for net in networks:
        for name, param in net.named_parameters():
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
        assert net.mixer.weight.grad.abs().sum() > 0
        assert net.norm.weight.grad.abs().sum() > 0
