"""MaPO activation capture through forward hooks, on seven tiny random architectures built in code.

The captured values are checked against independent computations: the HF ``hidden_states`` and
``logits`` of a plain forward, the layer's own projections applied to the captured tensors (the residual
update of each layer must be reproduced exactly from the captured attention output and MLP activation),
the q/k/v projections of the normed layer input, and the gated MLP recomputed from its input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tr
from torch import nn

from sparsealign.data.collate import Batch, collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.masks.activation import activation_mask, token_map
from sparsealign.models.activations import (
    ActivationSpec,
    capture_activations,
    decoder_layers,
    hook_points,
    resolve_activation_types,
)
from sparsealign.models.logprobs import TokenModel, unwrap_causal_lm
from tiny_models import VOCAB, random_pairs, tiny_gpt2, tiny_llama

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
    assert resolve_activation_types("all") == ActivationSpec(("mlp", "attn", "resid", "logits"), "compact")
    assert resolve_activation_types("attn, mlp").types == ("attn", "mlp")
    assert resolve_activation_types(["logits", "all", "mlp"]).types == ("logits", "mlp", "attn", "resid")
    assert resolve_activation_types("resid,resid").types == ("resid",)
    uniform = resolve_activation_types("uniform")
    assert uniform.types == () and not uniform and resolve_activation_types("mlp")
    with pytest.raises(ValueError, match="did you mean 'mlp'"):
        resolve_activation_types("mpl")
    with pytest.raises(ValueError, match="did you mean 'logits'"):
        resolve_activation_types(["attn", "logit"])
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_activation_types("uniform,mlp")
    with pytest.raises(ValueError, match="no activation type"):
        resolve_activation_types(" , ")


def test_resolve_original():
    spec = resolve_activation_types("original")
    assert spec == ActivationSpec(("mlp", "attn", "resid", "logits"), "original") and spec
    assert resolve_activation_types(["original"]) == spec
    assert resolve_activation_types(" original : attn, resid ") == ActivationSpec(
        ("attn", "resid"), "original"
    )
    assert resolve_activation_types("original:all") == spec
    assert resolve_activation_types(spec) is spec
    with pytest.raises(ValueError, match="write original:attn"):
        resolve_activation_types("original,attn")
    with pytest.raises(ValueError, match="did you mean 'original'"):
        resolve_activation_types("orignal")
    with pytest.raises(ValueError, match="unknown hook set 'compact'"):
        resolve_activation_types("compact:attn")
    with pytest.raises(ValueError, match="without a hook set"):
        resolve_activation_types("original:uniform")
    with pytest.raises(ValueError, match="no activation type"):
        resolve_activation_types("original:")
    with pytest.raises(ValueError, match="did you mean 'attn'"):
        resolve_activation_types("original:atn")


# --- the original code's hook points ------------------------------------------------------------------

ORIGINAL_ARCHS: dict[str, Callable[[], tr.PretrainedConfig]] = {
    "llama": ARCHS["llama"].config,
    "qwen2": ARCHS["qwen2"].config,
    "gpt2": ARCHS["gpt2"].config,
    "gpt_bigcode": ARCHS["gpt_bigcode"].config,  # multi-query
    "gpt_bigcode_mha": lambda: tr.GPTBigCodeConfig(**GPT_LIKE, multi_query=False),
    "gptj": ARCHS["gptj"].config,
    "gpt_neox": ARCHS["gpt_neox"].config,  # parallel residual
    "gpt_neox_sequential": lambda: tr.GPTNeoXConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        use_parallel_residual=False,
        **IDS,
    ),
}

RESID = "resid.torso."
GPT_RESID = [
    ("input_ln_attn", "ln_1", False),
    ("post_ln_attn", "ln_2", False),
    ("delta_attn", "ln_2", True),
    ("delta_mlp", "mlp", False),
    ("post_mlp", "", False),
]
NEOX_RESID = [
    ("input_ln_attn", "input_layernorm", False),
    ("post_ln_attn", "post_attention_layernorm", False),
    ("delta_attn", "post_attention_dropout", False),
    ("delta_mlp", "post_mlp_dropout", False),
    ("post_mlp", "", False),
]
LLAMA_RESID = [
    ("input_ln_attn", "input_layernorm", False),
    ("post_ln_attn", "post_attention_layernorm", False),
    ("delta_attn", "self_attn", False),
    ("post_attn", "post_attention_layernorm", True),
    ("delta_mlp", "mlp", False),
    ("post_mlp", "", False),
]
ROTARY = [("post_rota_emb_q", None, False), ("post_rota_emb_k", None, False)]


def _qkv(*paths: str) -> list[tuple[str, str, bool]]:
    return [(name, path, False) for name, path in zip("qkv", paths, strict=True)]


@dataclass(frozen=True)
class Original:
    """Per layer, each original hook's name, the hooked module (path relative to the layer; None: computed
    after the forward) and whether its input is read; then the body modules (embeddings, final norm)."""

    attn: list[tuple[str, str | None, bool]]
    mlp: list[tuple[str, str | None, bool]]
    resid: list[tuple[str, str | None, bool]]
    body: tuple[str, str]


GPT2_ORIGINAL = Original(
    attn=[*_qkv("attn.c_attn", "attn.c_attn", "attn.c_attn"), ("v_out", "attn.c_proj", True)],
    mlp=[],  # the original GPT-2 block calls its MLP without hooks
    resid=GPT_RESID,
    body=("drop", "ln_f"),
)
BIGCODE_ORIGINAL = dataclasses.replace(
    GPT2_ORIGINAL, attn=[*_qkv("attn.c_attn", "attn.c_attn", "attn.c_attn"), ("v_out", "attn", False)]
)
NEOX_ORIGINAL = Original(
    attn=[*_qkv(*["attention.query_key_value"] * 3), *ROTARY, ("v_out", "attention.dense", True)],
    mlp=[("post_act", "mlp.dense_4h_to_h", True)],
    resid=NEOX_RESID,
    body=("emb_dropout", "final_layer_norm"),
)
LLAMA_ORIGINAL = Original(
    attn=[
        *_qkv("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        *ROTARY,
        ("v_out", "self_attn.o_proj", True),
    ],
    mlp=[("post_act", "mlp.down_proj", True)],
    resid=LLAMA_RESID,
    body=("embed_tokens", "norm"),
)
ORIGINAL_LAYOUT: dict[str, Original] = {
    "llama": LLAMA_ORIGINAL,
    "qwen2": LLAMA_ORIGINAL,
    "gpt2": GPT2_ORIGINAL,
    "gpt_bigcode": BIGCODE_ORIGINAL,
    "gpt_bigcode_mha": BIGCODE_ORIGINAL,
    "gptj": Original(
        attn=[*_qkv("attn.q_proj", "attn.k_proj", "attn.v_proj"), *ROTARY, ("v_out", "attn", False)],
        mlp=[("post_act", "mlp.fc_out", True)],
        resid=[
            ("input_ln_attn", "ln_1", False),
            ("delta_attn", "attn", False),
            ("delta_mlp", "mlp", False),
            ("post_mlp", "", False),
        ],
        body=("drop", "ln_f"),
    ),
    "gpt_neox": NEOX_ORIGINAL,
    "gpt_neox_sequential": dataclasses.replace(
        NEOX_ORIGINAL,
        resid=[*NEOX_RESID[:3], ("post_attn", "post_attention_layernorm", True), *NEOX_RESID[3:]],
    ),
}


def build_original(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tr.AutoModelForCausalLM.from_config(ORIGINAL_ARCHS[name]()).eval()


def named_values(model: nn.Module, batch: Batch, spec: str = "original") -> dict[str, torch.Tensor]:
    """The captured tensors keyed by their hook point's key (``"layer 0 attn.q"``, ``"resid.post_emb"``)."""
    points = [p for p in hook_points(model, spec) if p.type]
    groups = capture(model, spec, batch)
    assert list(groups) == list(dict.fromkeys(p.type for p in points))
    values = [value for tensors in groups.values() for value in tensors]
    ordered = [p for kind in groups for p in points if p.type == kind]
    return {p.key: v for p, v in zip(ordered, values, strict=True)}


@pytest.mark.parametrize("name", ORIGINAL_ARCHS)
def test_original_hook_points_per_architecture(name):
    """Which modules are hooked (input or output), in which order, and how many activations per type."""
    layout = ORIGINAL_LAYOUT[name]
    model = build_original(name)
    points = hook_points(model, "original")
    decoder = unwrap_causal_lm(model).get_decoder()
    layers = decoder_layers(model)
    kinds = [kind for kind in ("mlp", "attn", "resid") if getattr(layout, kind)] + ["logits"]
    assert list(dict.fromkeys(p.type for p in points if p.type)) == kinds
    for kind in ("mlp", "attn", "resid"):
        mine = [p for p in points if p.type == kind]
        expected = [
            (i, f"{kind}.{n}" if kind != "resid" else RESID + n, path, pre)
            for i in range(LAYERS)
            for n, path, pre in getattr(layout, kind)
        ]
        if kind == "resid":
            embeddings, final = layout.body
            expected = [
                (None, "resid.post_emb", embeddings, False),
                *expected,
                (None, "resid.post_ln_f", final, False),
            ]
        assert [(p.layer, p.name) for p in mine] == [(i, n) for i, n, _, _ in expected]
        for point, (index, _, path, pre) in zip(mine, expected, strict=True):
            root = decoder if index is None else layers[index]
            if path is None:
                assert point.module is None and point.derive is not None  # rotary: computed
            else:
                assert point.module is (root.get_submodule(path) if path else root), point.key
                assert point.pre is pre, point.key
    assert [p.name for p in points if p.type == "logits"] == ["logits"]
    n, t = make_batch().response_mask.shape
    groups = capture(model, "original", make_batch())
    counts = {
        kind: len(getattr(layout, kind)) * LAYERS + (2 if kind == "resid" else 0)
        for kind in ("mlp", "attn", "resid")
    }
    assert {k: len(v) for k, v in groups.items()} == {**{k: c for k, c in counts.items() if c}, "logits": 1}
    for tensors in groups.values():
        assert all(value.shape[:2] == (n, t) and not value.requires_grad for value in tensors)


def _rebuild_checks(name: str, model: nn.Module, values: dict[str, torch.Tensor], batch: Batch) -> None:
    """Each original point against an independent computation from HF's hidden states and the modules."""
    out = full_forward(model, batch)
    hidden = [gather(h, batch) for h in out.hidden_states]
    decoder = unwrap_causal_lm(model).get_decoder()

    def m(x: torch.Tensor) -> torch.Tensor:
        return masked(x, batch)

    close(values["resid.post_emb"], hidden[0])
    close(values["resid.post_ln_f"], hidden[-1])
    for i, layer in enumerate(decoder_layers(model)):
        v = {
            key.removeprefix(f"layer {i} ").removeprefix(RESID): x
            for key, x in values.items()
            if key.startswith(f"layer {i} ")
        }
        h = hidden[i]
        if i < LAYERS - 1:
            close(v["post_mlp"], hidden[i + 1])
        if name.startswith("gpt_bigcode") or name == "gpt2":
            attn = layer.attn
            close(v["input_ln_attn"], m(layer.ln_1(h)))
            fused = layer.attn.c_attn(v["input_ln_attn"])
            if name == "gpt2":
                parts = fused.split(HIDDEN, dim=-1)
            elif attn.multi_query:
                parts = fused.split((HIDDEN, HEAD_DIM, HEAD_DIM), dim=-1)
            else:
                heads = fused.reshape(*fused.shape[:-1], HEADS, 3 * HEAD_DIM).split(HEAD_DIM, dim=-1)
                parts = [part.reshape(*fused.shape[:-1], -1) for part in heads]
            for n, part in zip("qkv", parts, strict=True):
                close(v[f"attn.{n}"], m(part))
            attn_out = layer.attn.c_proj(v["attn.v_out"]) if name == "gpt2" else v["attn.v_out"]
            close(v["delta_attn"], m(h + attn_out))
            close(v["post_ln_attn"], m(layer.ln_2(v["delta_attn"])))
            close(v["delta_mlp"], m(layer.mlp(v["post_ln_attn"])))
            close(v["post_mlp"], m(v["delta_attn"] + v["delta_mlp"]))
        elif name.startswith("gpt_neox"):
            close(v["input_ln_attn"], m(layer.input_layernorm(h)))
            fused = layer.attention.query_key_value(v["input_ln_attn"])
            heads = fused.reshape(*fused.shape[:-1], HEADS, 3 * HEAD_DIM).split(HEAD_DIM, dim=-1)
            for n, part in zip("qkv", heads, strict=True):
                close(v[f"attn.{n}"], m(part.reshape(*fused.shape[:-1], -1)))
            close(v["delta_attn"], m(layer.attention.dense(v["attn.v_out"])))
            close(v["delta_mlp"], m(layer.mlp.dense_4h_to_h(v["mlp.post_act"])))
            if layer.use_parallel_residual:
                assert "post_attn" not in v
                close(v["post_ln_attn"], m(layer.post_attention_layernorm(h)))
                close(v["post_mlp"], m(h + v["delta_attn"] + v["delta_mlp"]))
            else:
                close(v["post_attn"], m(h + v["delta_attn"]))
                close(v["post_ln_attn"], m(layer.post_attention_layernorm(v["post_attn"])))
                close(v["post_mlp"], m(v["post_attn"] + v["delta_mlp"]))
            close(v["delta_mlp"], m(layer.mlp(v["post_ln_attn"])))
        elif name == "gptj":
            close(v["input_ln_attn"], m(layer.ln_1(h)))
            for n in "qkv":
                close(v[f"attn.{n}"], m(layer.attn.get_submodule(f"{n}_proj")(v["input_ln_attn"])))
            close(v["delta_attn"], v["attn.v_out"])  # both are the attention module's output
            close(v["delta_mlp"], m(layer.mlp(v["input_ln_attn"])))
            close(v["delta_mlp"], m(layer.mlp.fc_out(v["mlp.post_act"])))
            close(v["post_mlp"], m(h + v["delta_attn"] + v["delta_mlp"]))
        else:  # llama-like
            close(v["input_ln_attn"], m(layer.input_layernorm(h)))
            for n in "qkv":
                close(v[f"attn.{n}"], m(layer.self_attn.get_submodule(f"{n}_proj")(v["input_ln_attn"])))
            close(v["delta_attn"], m(layer.self_attn.o_proj(v["attn.v_out"])))
            close(v["post_attn"], m(h + v["delta_attn"]))
            close(v["post_ln_attn"], m(layer.post_attention_layernorm(v["post_attn"])))
            close(v["delta_mlp"], m(layer.mlp(v["post_ln_attn"])))
            close(v["delta_mlp"], m(layer.mlp.down_proj(v["mlp.post_act"])))
            close(v["post_mlp"], m(v["post_attn"] + v["delta_mlp"]))
    final_norm = decoder.get_submodule(ORIGINAL_LAYOUT[name].body[1])
    close(values["resid.post_ln_f"], m(final_norm(values[f"layer {LAYERS - 1} {RESID}post_mlp"])))
    close(values["logits"], gather(out.logits, batch))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", ORIGINAL_ARCHS)
def test_original_values_rebuild_each_layer(name, padding_side):
    """Every captured point equals its independent recomputation: a wrong module, a wrong side (input or
    output), a misaligned gather or a q/k/v split that is not the model's own fails here."""
    model = build_original(name)
    batch = make_batch(padding_side)
    values = named_values(model, batch)
    with torch.no_grad():
        _rebuild_checks(name, model, values, batch)


def _library_rotation(name: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, batch: Batch):
    """q and k after RoPE as transformers computes them, from the normed layer input ``x`` ``[N, L, d]``."""
    decoder = unwrap_causal_lm(model).get_decoder()
    n, length = x.shape[:2]
    if name.startswith("gpt_neox"):
        module = tr.models.gpt_neox.modeling_gpt_neox
        qkv = layer.attention.query_key_value(x).view(n, length, -1, 3 * HEAD_DIM).transpose(1, 2)
        q, k, _ = qkv.chunk(3, dim=-1)
        cos, sin = decoder.rotary_emb(x, position_ids=batch.position_ids)
        q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
        return (t.transpose(1, 2).reshape(n, length, -1) for t in (q, k))
    if name == "gptj":
        module = tr.models.gptj.modeling_gptj
        sin, cos = decoder.rotary_emb(x, position_ids=batch.position_ids)
        rotary = layer.attn.rotary_dim
        result = []
        for proj in (layer.attn.q_proj, layer.attn.k_proj):
            t = proj(x).view(n, length, -1, HEAD_DIM)
            t = torch.cat([module.apply_rotary_pos_emb(t[..., :rotary], sin, cos), t[..., rotary:]], dim=-1)
            result.append(t.reshape(n, length, -1))
        return result
    module = tr.models.llama.modeling_llama if name == "llama" else tr.models.qwen2.modeling_qwen2
    attn = layer.self_attn
    q = attn.q_proj(x).view(n, length, -1, HEAD_DIM).transpose(1, 2)
    k = attn.k_proj(x).view(n, length, -1, HEAD_DIM).transpose(1, 2)
    cos, sin = decoder.rotary_emb(x, position_ids=batch.position_ids)
    q, k = module.apply_rotary_pos_emb(q, k, cos, sin)
    return (t.transpose(1, 2).reshape(n, length, -1) for t in (q, k))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gptj", "gpt_neox", "gpt_neox_sequential"])
def test_original_rotary_q_k_match_the_models_own_rotation(name):
    """post_rota_emb_q/k equal transformers' own ``apply_rotary_pos_emb`` (GPT-J and NeoX: partial rotary,
    rotate-every-two and rotate-half), and differ from the pre-rotary q/k."""
    model = build_original(name)
    batch = make_batch("left")
    values = named_values(model, batch, "original:attn")
    out = full_forward(model, batch)
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            norm = layer.ln_1 if name == "gptj" else layer.input_layernorm
            q, k = _library_rotation(name, model, layer, norm(out.hidden_states[i]), batch)
            close(values[f"layer {i} attn.post_rota_emb_q"], gather(q, batch))
            close(values[f"layer {i} attn.post_rota_emb_k"], gather(k, batch))
            assert not torch.allclose(values[f"layer {i} attn.post_rota_emb_q"], values[f"layer {i} attn.q"])


@pytest.mark.parametrize("build_tiny", [tiny_llama, tiny_gpt2])
def test_original_mask_on_the_tiny_models(build_tiny):
    """The shared tiny Llama and GPT-2: groups, and a finite [0, 1] mask of the batch's shape."""
    model = build_tiny()
    batch = make_batch()
    TokenModel(model)(batch)  # any hooks transformers installs lazily are in place before counting
    before = hook_count(model)
    with torch.no_grad(), capture_activations(model, resolve_activation_types("original"), batch) as groups:
        # Llama: rotary table + 4 attn + 1 mlp + 6 resid per layer + 2 body + decoder output (logits);
        # GPT-2: 4 attn (q, k, v on c_attn, v_out) + 5 resid per layer + 2 body + decoder output.
        added = 11 * LAYERS + 4 if build_tiny is tiny_llama else 9 * LAYERS + 3
        assert hook_count(model) == before + added
        TokenModel(model)(batch)
    assert hook_count(model) == before
    sizes = {k: len(v) for k, v in groups.items()}
    if build_tiny is tiny_llama:
        assert sizes == {"mlp": LAYERS, "attn": 6 * LAYERS, "resid": 6 * LAYERS + 2, "logits": 1}
    else:
        assert sizes == {"attn": 4 * LAYERS, "resid": 5 * LAYERS + 2, "logits": 1}  # no MLP type
    token_mask = activation_mask(groups, batch.response_mask)
    assert token_mask.shape == batch.response_mask.shape
    assert torch.isfinite(token_mask).all() and token_mask.min() >= 0 and token_mask.max() <= 1
    assert torch.all(token_mask[~batch.response_mask] == 0)
    assert token_mask[batch.response_mask].std() > 0


class CraftedQKV(nn.Module):
    """Stands in for GPT-2's ``c_attn``: q, k and v constant over the width, with per-position values."""

    def __init__(self, q: list[float], k: list[float], v: list[float]) -> None:
        super().__init__()
        self.table = torch.tensor([q, k, v])  # [3, positions]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        per_position = self.table[:, :length].T  # [L, 3]
        return per_position.repeat_interleave(width, dim=-1).expand(n, length, 3 * width)


def test_original_normalises_q_k_v_separately_by_hand():
    """One pair, prompt of 2 tokens, responses of 3: the response tokens are predicted at positions 1..3.

    Width means there: q̄ = [0, 1, 2], k̄ = [2, 1, 0], v̄ = [0, 0, 3]. Separately min-max normalised
    (original): q [0, ½, 1], k [1, ½, 0], v [0, 0, 1], mean [⅓, ⅓, ⅔]. The fused ``c_attn`` output as one
    tensor (compact set) has mean (q̄ + k̄ + v̄)/3 = [⅔, ⅔, 5/3] and map [0, 0, 1].
    """
    model = build("gpt2")
    decoder_layers(model)[0].attn.c_attn = CraftedQKV(
        q=[9.0, 0.0, 1.0, 2.0, -9.0], k=[9.0, 2.0, 1.0, 0.0, -9.0], v=[9.0, 0.0, 0.0, 3.0, -9.0]
    )
    batch = collate_pairs([TokenizedPair([1, 5], [7, 8, 2], [9, 10, 2])], pad_id=2)
    assert batch.response_index.tolist() == [[1, 2, 3], [1, 2, 3]]
    mask = batch.response_mask
    values = named_values(model, batch, "original:attn")
    expected = {"q": [0.0, 0.5, 1.0], "k": [1.0, 0.5, 0.0], "v": [0.0, 0.0, 1.0]}
    for part, row in expected.items():
        close(token_map(values[f"layer 0 attn.{part}"], mask)[0], torch.tensor([row, row]))
    qkv = [values[f"layer 0 attn.{part}"] for part in "qkv"]
    close(activation_mask({"attn": qkv}, mask), torch.tensor([[1 / 3, 1 / 3, 2 / 3]] * 2))
    fused = capture(model, "attn", batch)["attn"][0]  # compact: c_attn's output as one tensor
    assert fused.shape[-1] == 3 * HIDDEN
    close(activation_mask({"attn": [fused]}, mask), torch.tensor([[0.0, 0.0, 1.0]] * 2))


def test_original_errors_and_hook_removal():
    gemma = build("gemma2")
    batch = make_batch()
    before = hook_count(gemma)
    message = "original hook set is defined for the model types.*'gemma2'"
    with pytest.raises(ValueError, match=message), capture_activations(gemma, "original", batch):
        pass
    assert hook_count(gemma) == before
    gpt2 = build("gpt2")
    with pytest.raises(ValueError, match="no 'mlp' activations on gpt2"):
        hook_points(gpt2, "original:mlp,attn")
    assert [p.type for p in hook_points(gpt2, "original:resid")].count("resid") == 5 * LAYERS + 2
    del decoder_layers(gpt2)[1].ln_2
    with pytest.raises(ValueError, match="cannot find 'ln_2' in decoder layer 1"):
        hook_points(gpt2, "original:resid")
    llama = build("llama")
    TokenModel(llama)(batch)
    before = hook_count(llama)
    with pytest.raises(KeyError, match="boom"), capture_activations(llama, "original", batch):
        TokenModel(llama)(batch)
        raise KeyError("boom")
    assert hook_count(llama) == before


def test_original_on_a_peft_wrapped_llama():
    """LoRA wrappers are hooked at the same paths; with the adapter disabled the capture is the base's."""
    peft = pytest.importorskip("peft")
    base = build("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    model = peft.get_peft_model(build("llama"), config).eval()
    batch = make_batch()
    expected = named_values(base, batch)
    with model.disable_adapter():
        disabled = named_values(model, batch)
    assert disabled.keys() == expected.keys()
    for key, value in expected.items():
        close(disabled[key], value)
    enabled = named_values(model, batch)
    assert not torch.allclose(
        enabled["layer 0 attn.post_rota_emb_q"], expected["layer 0 attn.post_rota_emb_q"]
    )
    close(enabled["layer 0 attn.k"], expected["layer 0 attn.k"])
