"""MaPO activation capture through forward hooks, on seven tiny random architectures built in code.

The captured values are checked against independent computations: the HF ``hidden_states`` and
``logits`` of a plain forward, the layer's own projections applied to the captured tensors (the residual
update of each layer must be reproduced exactly from the captured attention output and MLP activation),
the q/k/v projections of the normed layer input, and the gated MLP recomputed from its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tr
from torch import nn

from sparsealign.data.collate import Batch, collate_pairs
from sparsealign.masks.activation import activation_mask
from sparsealign.models.activations import (
    capture_activations,
    decoder_layers,
    hook_points,
    resolve_activation_types,
)
from sparsealign.models.logprobs import TokenModel, unwrap_causal_lm
from tiny_models import VOCAB, random_pairs

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 32, 2, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
IDS = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
LLAMA_LIKE = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 64,
    **IDS,
}
GPT_LIKE = {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTER, "n_positions": 64, **IDS}
SEPARATE = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Arch:
    """A tiny config and the module layout the capture is expected to find (paths relative to a layer)."""

    config: Callable[[], tr.PretrainedConfig]
    qkv: tuple[str, ...]
    qkv_widths: tuple[int, ...]
    attn_out: str
    mlp_out: str
    attn_norm: str
    final_norm: str  # relative to the decoder
    post_norms: tuple[str, str] | None = None  # Gemma-2 normalises both branch outputs


def _llama_like(config: Callable[..., tr.PretrainedConfig], **extra: object) -> Arch:
    return Arch(
        config=lambda: config(**LLAMA_LIKE, **extra),
        qkv=tuple(f"self_attn.{name}" for name in SEPARATE),
        qkv_widths=(HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM),
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        attn_norm="input_layernorm",
        final_norm="norm",
    )


ARCHS: dict[str, Arch] = {
    "llama": _llama_like(tr.LlamaConfig),
    "qwen2": _llama_like(tr.Qwen2Config),
    "gemma2": Arch(
        config=lambda: tr.Gemma2Config(**LLAMA_LIKE, head_dim=HEAD_DIM),
        qkv=tuple(f"self_attn.{name}" for name in SEPARATE),
        qkv_widths=(HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM),
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        attn_norm="input_layernorm",
        final_norm="norm",
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
    "gpt2": Arch(
        config=lambda: tr.GPT2Config(**GPT_LIKE),
        qkv=("attn.c_attn",),
        qkv_widths=(3 * HIDDEN,),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        attn_norm="ln_1",
        final_norm="ln_f",
    ),
    "gpt_bigcode": Arch(  # multi-query: one shared key/value head
        config=lambda: tr.GPTBigCodeConfig(**GPT_LIKE),
        qkv=("attn.c_attn",),
        qkv_widths=(HIDDEN + 2 * HEAD_DIM,),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        attn_norm="ln_1",
        final_norm="ln_f",
    ),
    "gptj": Arch(  # parallel attention + MLP
        config=lambda: tr.GPTJConfig(**GPT_LIKE, rotary_dim=4),
        qkv=tuple(f"attn.{name}" for name in SEPARATE),
        qkv_widths=(HIDDEN, HIDDEN, HIDDEN),
        attn_out="attn.out_proj",
        mlp_out="mlp.fc_out",
        attn_norm="ln_1",
        final_norm="ln_f",
    ),
    "gpt_neox": Arch(  # parallel residual (the default)
        config=lambda: tr.GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
            **IDS,
        ),
        qkv=("attention.query_key_value",),
        qkv_widths=(3 * HIDDEN,),
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        attn_norm="input_layernorm",
        final_norm="final_layer_norm",
    ),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tr.AutoModelForCausalLM.from_config(ARCHS[name].config()).eval()


def make_batch(padding_side: str = "right", n: int = 3) -> Batch:
    return collate_pairs(random_pairs(n, seed=5), pad_id=2, padding_side=padding_side)


def capture(model: nn.Module, types, batch: Batch) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad(), capture_activations(model, types, batch) as groups:
        TokenModel(model)(batch)
    return groups


def gather(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[N, L, W]`` -> response-aligned ``[N, T, W]``, zero outside the response mask."""
    rows = torch.arange(values.shape[0]).unsqueeze(1)
    return values[rows, batch.response_index] * batch.response_mask.unsqueeze(-1)


def masked(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    return values * batch.response_mask.unsqueeze(-1)


def full_forward(model: nn.Module, batch: Batch):
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
            use_cache=False,
        )


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_counts_shapes_zeros_and_mask(name):
    arch = ARCHS[name]
    model = build(name)
    batch = make_batch()
    groups = capture(model, "all", batch)
    n, t = batch.response_mask.shape
    assert list(groups) == ["mlp", "attn", "resid", "logits"]
    assert [g.shape for g in groups["mlp"]] == [(n, t, INTER)] * LAYERS
    attn_widths = (*arch.qkv_widths, HIDDEN)
    assert [g.shape[-1] for g in groups["attn"]] == list(attn_widths) * LAYERS
    assert all(g.shape[:2] == (n, t) for g in groups["attn"])
    assert [g.shape for g in groups["resid"]] == [(n, t, HIDDEN)] * LAYERS
    assert [g.shape for g in groups["logits"]] == [(n, t, VOCAB)]
    outside = ~batch.response_mask
    assert outside.any()
    for tensors in groups.values():
        for value in tensors:
            assert not value.requires_grad
            assert torch.all(value[outside] == 0)
            assert value[batch.response_mask].abs().sum() > 0
    token_mask = activation_mask(groups, batch.response_mask)
    assert torch.isfinite(token_mask).all()
    assert token_mask.min() >= 0 and token_mask.max() <= 1
    assert torch.all(token_mask[outside] == 0)
    # The paths found are the expected ones, for every layer.
    points = hook_points(model, ["mlp", "attn"])
    assert [p.name for p in points if p.type == "mlp"] == [arch.mlp_out] * LAYERS
    assert [p.name for p in points if p.type == "attn"] == [*arch.qkv, arch.attn_out] * LAYERS
    assert all(p.pre for p in points if p.name in (arch.mlp_out, arch.attn_out))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", ARCHS)
def test_resid_and_logits_match_a_plain_forward(name, padding_side):
    """resid[i] == hidden_states[i + 1] for i < L-1; HF's last entry is after the final norm."""
    model = build(name)
    batch = make_batch(padding_side)
    groups = capture(model, ["resid", "logits"], batch)
    out = full_forward(model, batch)
    assert len(out.hidden_states) == LAYERS + 1
    for i in range(LAYERS - 1):
        close(groups["resid"][i], gather(out.hidden_states[i + 1], batch))
    decoder = unwrap_causal_lm(model).get_decoder()
    final_norm = decoder.get_submodule(ARCHS[name].final_norm)
    with torch.no_grad():
        close(masked(final_norm(groups["resid"][-1]), batch), gather(out.hidden_states[-1], batch))
    close(groups["logits"][0], gather(out.logits, batch))  # Gemma-2: soft-capped in both


@pytest.mark.parametrize("name", ARCHS)
def test_layer_update_is_rebuilt_from_captured_attention_and_mlp(name):
    """h_out = h_in + out_proj(attn) + mlp_out(mlp) (Gemma-2 with its post-norms), and q/k/v = proj(norm(h_in)).

    Holds for sequential and parallel (GPT-J, NeoX) blocks alike; fails if a capture is the wrong tensor,
    the wrong layer or misaligned."""
    arch = ARCHS[name]
    model = build(name)
    batch = make_batch()
    groups = capture(model, ["mlp", "attn", "resid"], batch)
    hidden = full_forward(model, batch).hidden_states
    per_layer = len(arch.qkv) + 1
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            h_in = gather(hidden[i], batch)
            attn = groups["attn"][i * per_layer : (i + 1) * per_layer]
            attn_update = layer.get_submodule(arch.attn_out)(attn[-1])
            mlp_update = layer.get_submodule(arch.mlp_out)(groups["mlp"][i])
            if arch.post_norms is not None:
                attn_update = layer.get_submodule(arch.post_norms[0])(attn_update)
                mlp_update = layer.get_submodule(arch.post_norms[1])(mlp_update)
            close(groups["resid"][i], masked(h_in + attn_update + mlp_update, batch))
            normed = layer.get_submodule(arch.attn_norm)(h_in)
            for path, value in zip(arch.qkv, attn[:-1], strict=True):
                close(value, masked(layer.get_submodule(path)(normed), batch))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_gated_mlp_activation_matches_manual_computation(name):
    """mlp[i] == act_fn(gate_proj(x)) * up_proj(x), x = the MLP input seen by a hook of the test's own."""
    model = build(name)
    batch = make_batch()
    layers = decoder_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    own = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        groups = capture(model, ["mlp"], batch)
    finally:
        for handle in own:
            handle.remove()
    assert sorted(inputs) == list(range(LAYERS))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            x = inputs[i]
            expected = layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
            close(groups["mlp"][i], gather(expected, batch))


def test_hooks_removed_after_the_block_and_after_an_exception():
    model = build("llama")
    batch = make_batch()
    TokenModel(model)(batch)  # any hooks transformers installs lazily are in place before counting
    before = hook_count(model)
    with torch.no_grad(), capture_activations(model, "all", batch) as groups:
        # mlp + (q, k, v, o) + resid per layer, plus the decoder output for logits
        assert hook_count(model) == before + LAYERS * 6 + 1
        TokenModel(model)(batch)
    assert hook_count(model) == before
    assert len(groups["resid"]) == LAYERS

    with pytest.raises(KeyError, match="boom"), capture_activations(model, "all", batch):
        TokenModel(model)(batch)
        raise KeyError("boom")
    assert hook_count(model) == before

    bad = make_batch(n=2)  # a different batch inside the context: the hook's own error, hooks removed
    with pytest.raises(ValueError, match="expected"), capture_activations(model, "mlp", batch):
        TokenModel(model)(bad)
    assert hook_count(model) == before


def test_only_requested_types_are_hooked_and_uniform_hooks_nothing():
    model = build("gpt2")
    batch = make_batch()
    TokenModel(model)(batch)
    before = hook_count(model)
    layers = decoder_layers(model)
    with torch.no_grad(), capture_activations(model, "resid", batch) as groups:
        assert hook_count(model) == before + LAYERS
        assert all(len(layer.mlp.c_proj._forward_pre_hooks) == 0 for layer in layers)
        TokenModel(model)(batch)
    assert list(groups) == ["resid"]
    with torch.no_grad(), capture_activations(model, "uniform", batch) as groups:
        assert hook_count(model) == before
        TokenModel(model)(batch)
    assert groups == {}


def test_peft_lora_wrapped_llama():
    """Hooks go on the LoRA wrappers; with the adapter disabled the capture equals the base model's."""
    peft = pytest.importorskip("peft")
    base = build("llama")
    reference = build("llama")  # same seed: same weights
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(reference, config).eval()
    points = hook_points(model, ["mlp", "attn"])
    wrapped = {p.name for p in points if isinstance(p.module, peft.tuners.lora.LoraLayer)}
    assert wrapped == {"self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"}
    batch = make_batch()
    expected = capture(base, "all", batch)
    with model.disable_adapter():
        disabled = capture(model, "all", batch)
    for kind, tensors in expected.items():
        for a, b in zip(disabled[kind], tensors, strict=True):
            close(a, b)
    enabled = capture(model, "all", batch)
    q0, k0 = enabled["attn"][0], enabled["attn"][1]
    assert not torch.allclose(q0, expected["attn"][0])  # the adapter changes q_proj's output
    close(k0, expected["attn"][1])  # k_proj is not adapted and its input is unchanged in layer 0
    assert not torch.allclose(enabled["resid"][0], expected["resid"][0])


class WrappedMLP(nn.Module):
    """An MLP one level deeper than any known layout (``mlp.inner.down_proj``); the forward still works."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_unsupported_layout_raises_a_helpful_error():
    model = build("llama")
    layer = decoder_layers(model)[0]
    layer.mlp = WrappedMLP(layer.mlp)
    batch = make_batch()
    before = hook_count(model)
    with pytest.raises(ValueError) as info, capture_activations(model, ["attn", "mlp"], batch):
        pass
    message = str(info.value)
    assert "MLP output projection" in message and "layer 0" in message
    assert "mlp.down_proj" in message and "mlp.inner.down_proj (Linear)" in message
    assert hook_count(model) == before
    # types that do not need the missing module still work
    groups = capture(model, ["attn", "resid"], batch)
    assert len(groups["attn"]) == 4 * LAYERS and len(groups["resid"]) == LAYERS
    other = build("gpt2")
    del decoder_layers(other)[1].attn.c_proj
    with pytest.raises(ValueError, match="attention output projection in decoder layer 1"):
        hook_points(other, "attn")


def test_missing_layer_list_and_silent_modules_fail_loudly():
    model = build("llama")
    unwrap_causal_lm(model).config.num_hidden_layers = 5
    with pytest.raises(ValueError, match=r"layers \(length 2\)"):
        decoder_layers(model)

    class SkippingMLP(nn.Module):
        """Has a down_proj but never calls it: its hook cannot fire."""

        def __init__(self) -> None:
            super().__init__()
            self.down_proj = nn.Linear(INTER, HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x)

    model = build("llama")
    decoder_layers(model)[1].mlp = SkippingMLP()
    batch = make_batch()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match=r"never fired.*layer 1 mlp\.down_proj"):
        capture(model, ["mlp"], batch)
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="never fired"), capture_activations(model, "resid", batch):
        pass  # forgot to run the model


def test_resolve_activation_types():
    assert resolve_activation_types("all") == ["mlp", "attn", "resid", "logits"]
    assert resolve_activation_types("attn, mlp") == ["attn", "mlp"]
    assert resolve_activation_types(["logits", "all", "mlp"]) == ["logits", "mlp", "attn", "resid"]
    assert resolve_activation_types("resid,resid") == ["resid"]
    assert resolve_activation_types("uniform") == []
    with pytest.raises(ValueError, match="did you mean 'mlp'"):
        resolve_activation_types("mpl")
    with pytest.raises(ValueError, match="did you mean 'logits'"):
        resolve_activation_types(["attn", "logit"])
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_activation_types("uniform,mlp")
    with pytest.raises(ValueError, match="no activation type"):
        resolve_activation_types(" , ")
