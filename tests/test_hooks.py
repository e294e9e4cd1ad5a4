"""The one hook-capture mechanism (``sparsealign.models.hooks``): taps, transforms, gradients, early stop,
hook removal, and the module lookups (decoder layers, SAE sites), on tiny random models built in code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import transformers as tr
from torch import nn

from sparsealign.models.hooks import (
    SITES,
    Tap,
    at_positions,
    capture,
    decoder_layers,
    first_tensor,
    site_module,
)
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 13, 2, 2], [1, 7, 3, 4, 8, 11]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def forward(model: nn.Module, **kwargs):
    return model(input_ids=IDS, attention_mask=MASK, use_cache=False, output_hidden_states=True, **kwargs)


def test_outputs_inputs_and_selectors_match_a_plain_forward():
    model = tiny_llama()
    layers = decoder_layers(model)
    taps = {
        "block0": Tap(layers[0]),  # a layer's output (a tensor in transformers 5, a tuple before)
        "o_proj_in": Tap(layers[1].self_attn.o_proj, "input"),
        "attn_in": Tap(layers[1].self_attn, "input"),  # called with hidden_states=... only
        "q_first8": Tap(layers[1].self_attn.q_proj, select=lambda out: out[..., :8]),
        "norm": Tap(model.model.norm),
    }
    with torch.no_grad(), capture(taps) as got:
        out = forward(model)
    assert list(got) == ["block0", "attn_in", "q_first8", "o_proj_in", "norm"]  # in firing order
    torch.testing.assert_close(got["block0"], out.hidden_states[1])
    torch.testing.assert_close(got["norm"], out.hidden_states[-1])
    with torch.no_grad():
        normed = layers[1].input_layernorm(out.hidden_states[1])
        torch.testing.assert_close(got["attn_in"], normed)
        torch.testing.assert_close(got["q_first8"], layers[1].self_attn.q_proj(normed)[..., :8])
        # the o_proj input is the attention output: o_proj(it) + residual = post-attention stream
        post_attn = out.hidden_states[1] + layers[1].self_attn.o_proj(got["o_proj_in"])
        mlp = layers[1].mlp(layers[1].post_attention_layernorm(post_attn))
        torch.testing.assert_close(model.model.norm(post_attn + mlp), out.hidden_states[-1])
    assert got["o_proj_in"].shape == (2, 6, 64) and got["q_first8"].shape == (2, 6, 8)


def test_detach_and_gradient():
    model = tiny_gpt2()
    layer = decoder_layers(model)[0]
    with capture({"x": Tap(layer.mlp)}) as got:
        forward(model)
    assert not got["x"].requires_grad
    with capture({"x": Tap(layer.mlp)}, detach=False) as got:
        forward(model)
    assert got["x"].requires_grad
    got["x"].sum().backward()
    assert layer.mlp.c_fc.weight.grad is not None and layer.mlp.c_fc.weight.grad.abs().sum() > 0
    assert decoder_layers(model)[1].mlp.c_fc.weight.grad is None  # after the tap: not in its graph


def test_transform_runs_in_the_hook_and_keeps_gradient():
    model = tiny_gpt2()
    index = torch.tensor([[0, 2], [5, 1]])
    keep = torch.tensor([[True, False], [True, True]])
    layer = decoder_layers(model)[0]
    with capture({"x": Tap(layer)}, transform=at_positions(index, keep), detach=False) as got:
        out = forward(model)
    assert got["x"].shape == (2, 2, 64) and got["x"].requires_grad
    full = out.hidden_states[1].detach()
    torch.testing.assert_close(got["x"][0, 0], full[0, 0])
    torch.testing.assert_close(got["x"][1, 0], full[1, 5])
    torch.testing.assert_close(got["x"][1, 1], full[1, 1])
    assert torch.all(got["x"][0, 1] == 0)  # masked out
    got["x"].sum().backward()
    assert layer.attn.c_attn.weight.grad.abs().sum() > 0


def test_at_positions_by_hand():
    value = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    index = torch.tensor([[3, 0], [1, 1]])
    mask = torch.tensor([[True, True], [True, False]])
    out = at_positions(index, mask)(value)
    expected = torch.tensor([[[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]], [[15.0, 16.0, 17.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(at_positions(index)(value)[1, 1], value[1, 1])
    # [N·L, W] with the length given; a batch dimension of 1 broadcast to N rows
    torch.testing.assert_close(at_positions(index, mask, length=4)(value.reshape(8, 3)), expected)
    shared = torch.arange(4.0).reshape(1, 4, 1)
    torch.testing.assert_close(at_positions(index)(shared), torch.tensor([[[3.0], [0.0]], [[1.0], [1.0]]]))
    # packed rows: output row n read from value row rows[n] (three sequences in two rows)
    packed = at_positions(torch.tensor([[0, 2], [1, 3], [2, 2]]), rows=torch.tensor([1, 0, 1]), num_rows=2)
    torch.testing.assert_close(packed(value)[:, :, 0], torch.tensor([[12.0, 18.0], [3.0, 9.0], [18.0, 18.0]]))
    with pytest.raises(ValueError, match=r"expected \[R, L, W\] with R = 2, L = 5"):
        at_positions(index, length=5)(value)
    with pytest.raises(ValueError, match=r"L >= 4"):
        at_positions(index)(value[:, :3])
    with pytest.raises(ValueError, match="R = 2"):
        at_positions(index)(value[:, :, 0])


def test_stop_ends_the_forward_after_the_last_tap():
    model = tiny_llama()
    layers = decoder_layers(model)
    ran: list[int] = []
    counters = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)
    ]
    after = []
    try:
        with torch.no_grad(), capture({"a": Tap(layers[0].mlp), "b": Tap(layers[0])}, stop=True) as got:
            forward(model)
            after.append("not reached")
        assert ran == [0] and after == []
        with torch.no_grad():
            full = forward(model)
    finally:
        for handle in counters:
            handle.remove()
    torch.testing.assert_close(got["b"], full.hidden_states[1])
    assert set(got) == {"a", "b"}


def test_hooks_removed_on_exit_on_error_and_on_a_failing_transform():
    model = tiny_gpt2()
    layers = decoder_layers(model)
    forward(model)  # any hooks transformers installs lazily are in place before counting
    before = hook_count(model)
    taps = {"mlp": Tap(layers[0].mlp), "in": Tap(layers[1].attn.c_proj, "input")}
    with capture(taps):
        assert hook_count(model) == before + 2
        forward(model)
    assert hook_count(model) == before
    with pytest.raises(KeyError, match="boom"), capture(taps):
        raise KeyError("boom")
    assert hook_count(model) == before

    def bad(value: torch.Tensor) -> torch.Tensor:
        raise ValueError("wrong shape")

    with pytest.raises(ValueError, match="mlp: wrong shape"), capture(taps, transform=bad):
        forward(model)
    assert hook_count(model) == before


def test_a_tap_that_never_fires_raises_unless_allowed():
    model = tiny_gpt2()
    unused = nn.Linear(4, 4)
    taps = {"used": Tap(decoder_layers(model)[0]), "unused": Tap(unused)}
    with pytest.raises(RuntimeError, match="1 hook.*never fired.*unused"), capture(taps):
        forward(model)
    with capture(taps, require_all=False) as got:
        forward(model)
    assert list(got) == ["used"]
    with pytest.raises(RuntimeError, match="never fired"), capture({"x": Tap(unused)}):
        pass  # forgot to run the model


def test_a_later_forward_overwrites():
    model = tiny_gpt2()
    layer = decoder_layers(model)[0]
    with torch.no_grad(), capture({"x": Tap(layer)}) as got:
        forward(model)
        first = got["x"]
        model(input_ids=IDS[:1], use_cache=False)
    assert first.shape[0] == 2 and got["x"].shape[0] == 1


def test_first_tensor():
    t = torch.ones(2)
    assert first_tensor(t) is t
    assert first_tensor((t, None)) is t
    assert first_tensor(tr.modeling_outputs.BaseModelOutput(last_hidden_state=t)) is t
    with pytest.raises(TypeError, match="NoneType"):
        first_tensor(None)


def test_site_module_on_llama_gpt2_and_gemma2():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert SITES == ("resid_post", "mlp_out")
    assert site_module(llama, "resid_post", 1) is decoder_layers(llama)[1]
    assert site_module(llama, "mlp_out", 0) is decoder_layers(llama)[0].mlp
    assert site_module(gpt2, "mlp_out", 1) is decoder_layers(gpt2)[1].mlp
    gemma = tr.Gemma2ForCausalLM(
        tr.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    assert site_module(gemma, "mlp_out", 1) is decoder_layers(gemma)[1].post_feedforward_layernorm
    with pytest.raises(ValueError, match="did you mean 'resid_post'"):
        site_module(llama, "resid_pst", 0)
    with pytest.raises(ValueError, match="out of range"):
        site_module(llama, "resid_post", 2)
    with pytest.raises(ValueError, match="out of range"):
        site_module(llama, "resid_post", True)
    del decoder_layers(llama)[0].mlp
    with pytest.raises(ValueError, match="cannot find the MLP of decoder layer 0"):
        site_module(llama, "mlp_out", 0)


def test_decoder_layers_error_lists_the_module_lists():
    model = tiny_llama()
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match=r"layers \(length 2\)"):
        decoder_layers(model)


def test_models_hooks_is_the_only_module_that_registers_forward_hooks():
    """One hook mechanism: every forward (pre-)hook of the package is registered by ``models/hooks.py``."""
    import sparsealign

    root = Path(sparsealign.__file__).parent
    registering = {"register_forward_hook", "register_forward_pre_hook"}
    found = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        calls = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in registering
        ]
        if calls:
            found[path.relative_to(root).as_posix()] = calls
    assert list(found) == ["models/hooks.py"], found
