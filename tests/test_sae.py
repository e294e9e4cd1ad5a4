"""Pretrained-SAE loading (SAELens flat / 6.x, Gemma Scope npz, sparsify) and the format registry, SAE math,
hook sites, and the feature probe (pooling positions, ``build_feature_probe``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sparsealign.errors import UserError
from sparsealign.models.hooks import site_module
from sparsealign.sae import (
    FeatureProbe,
    SAEError,
    SAEFormat,
    SparseAutoencoder,
    available_formats,
    build_feature_probe,
    load_sae,
    parse_gemma_scope_path,
    register_format,
    save_sae,
)
from sparsealign.sae.formats import get_format
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

D_IN, D_SAE = 8, 16


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    g = _rng(seed)
    return {
        "W_enc": g.standard_normal((D_IN, D_SAE)).astype(np.float32),
        "b_enc": g.standard_normal(D_SAE).astype(np.float32) * 0.1,
        "W_dec": g.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "b_dec": g.standard_normal(D_IN).astype(np.float32),
        "threshold": np.abs(g.standard_normal(D_SAE)).astype(np.float32) * 0.5,
    }


def _x(seed: int = 1) -> np.ndarray:
    return _rng(seed).standard_normal((3, 5, D_IN)).astype(np.float32)


def _write_saelens(
    folder: Path, w: dict[str, np.ndarray], cfg: dict, keys=("W_enc", "b_enc", "W_dec", "b_dec")
):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(w[k])) for k in keys},
        str(folder / "sae_weights.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _flat_cfg(**extra) -> dict:
    return {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "tiny",
        "hook_name": "blocks.1.hook_resid_post",
        "hook_layer": 1,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "sae_lens_training_version": "3.13.1",
        **extra,
    }


def _v6_cfg(**extra) -> dict:
    return {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "model_name": "tiny-v6",
            "hook_name": "blocks.0.hook_mlp_out",
            "hook_head_index": None,
            "sae_lens_version": "6.5.1",
        },
    }


def _encode(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return sae.encode(torch.from_numpy(x)).numpy()


# -- formats -----------------------------------------------------------------------------------------


def test_saelens_flat_relu(tmp_path):
    w = _weights()
    sae = load_sae(_write_saelens(tmp_path / "flat", w, _flat_cfg()))
    x = _x()
    expected = np.maximum(x @ w["W_enc"] + w["b_enc"], 0)
    np.testing.assert_allclose(_encode(sae, x), expected, rtol=1e-5, atol=1e-5)
    assert sae.activation == "relu" and not sae.apply_b_dec_to_input
    assert (sae.site, sae.layer, sae.model_name, sae.format) == ("resid_post", 1, "tiny", "saelens")
    assert (expected > 0).any() and (expected == 0).any()


def test_saelens_v6_relu_with_b_dec_subtraction_and_decode(tmp_path):
    w = _weights(1)
    sae = load_sae(_write_saelens(tmp_path / "v6", w, _v6_cfg()), d_in=D_IN)
    x = _x(2)
    expected = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    np.testing.assert_allclose(_encode(sae, x), expected, rtol=1e-5, atol=1e-5)
    assert sae.apply_b_dec_to_input
    assert (sae.site, sae.layer, sae.model_name) == ("mlp_out", 0, "tiny-v6")
    codes = _rng(3).standard_normal((4, D_SAE)).astype(np.float32)
    with torch.no_grad():
        decoded = sae.decode(torch.from_numpy(codes)).numpy()
    np.testing.assert_allclose(decoded, codes @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    recon = sae(torch.from_numpy(x).double())
    assert recon.dtype == torch.float64 and recon.shape == x.shape


def test_saelens_legacy_topk_and_jumprelu(tmp_path):
    w = _weights(4)
    topk = load_sae(
        _write_saelens(
            tmp_path / "topk",
            w,
            _flat_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 3}),
        )
    )
    assert topk.activation == "topk" and topk.k == 3
    codes = _encode(topk, _x())
    assert ((codes != 0).sum(-1) <= 3).all()
    cfg = _flat_cfg(architecture="jumprelu")
    keys = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    jump = load_sae(_write_saelens(tmp_path / "jump", w, cfg, keys))
    x = _x()
    pre = x @ w["W_enc"] + w["b_enc"]
    np.testing.assert_allclose(_encode(jump, x), np.maximum(pre, 0) * (pre > w["threshold"]), atol=1e-5)


def test_gemma_scope_npz_jumprelu_with_path_metadata(tmp_path):
    w = _weights(5)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **w)
    x = _x(6) * 3
    pre = x @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction
    expected = np.maximum(pre, 0) * (pre > w["threshold"])
    for target in (folder, folder / "params.npz"):
        sae = load_sae(target, d_in=D_IN)
        np.testing.assert_allclose(_encode(sae, x), expected, rtol=1e-5, atol=1e-5)
        assert sae.activation == "jumprelu" and not sae.apply_b_dec_to_input
        assert (sae.layer, sae.d_sae, sae.site, sae.format) == (3, 16, "resid_post", "gemma_scope")
        assert sae.metadata.average_l0 == 5.0 and sae.model_name == "google/gemma-2-2b"
    # values in (0, threshold] are zeroed: the comparison is strict
    assert ((pre > 0) & (pre <= w["threshold"])).any()
    assert (expected[(pre > 0) & (pre <= w["threshold"])] == 0).all()
    info = parse_gemma_scope_path("x/gemma-scope-9b-pt-mlp/layer_41/width_16k/average_l0_52/params.npz")
    assert info == {
        "layer": 41,
        "width": 16384,
        "average_l0": 52.0,
        "site": "mlp_out",
        "model_name": "google/gemma-2-9b",
    }
    assert parse_gemma_scope_path("layer_0/width_1m/average_l0_9")["width"] == 1 << 20


def test_gemma_scope_width_mismatch(tmp_path):
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **_weights())
    with pytest.raises(SAEError, match=r"width 16384"):
        load_sae(folder)


def test_sparsify_topk_transposed_encoder(tmp_path):
    w = _weights(7)
    folder = tmp_path / "sae-repo" / "layers.1"
    folder.mkdir(parents=True)
    tensors = {
        "encoder.weight": torch.from_numpy(np.ascontiguousarray(w["W_enc"].T)),  # [d_sae, d_in]
        "encoder.bias": torch.from_numpy(w["b_enc"]),
        "W_dec": torch.from_numpy(w["W_dec"]),
        "b_dec": torch.from_numpy(w["b_dec"]),
    }
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "normalize_decoder": True, "k": 4}))
    (folder.parent / "config.json").write_text(json.dumps({"model": "tiny/llama"}))
    sae = load_sae(folder, d_in=D_IN)  # d_in inferred from b_dec, num_latents = d_in * expansion_factor
    x = _x(8)
    # sparsify: ReLU((x - b_dec) @ encoder.weight^T + encoder.bias), keep the top k
    acts = np.maximum((x - w["b_dec"]) @ tensors["encoder.weight"].numpy().T + w["b_enc"], 0)
    kth = np.sort(acts, axis=-1)[..., -4][..., None]
    expected = np.where(acts >= kth, acts, 0)
    np.testing.assert_allclose(_encode(sae, x), expected, rtol=1e-5, atol=1e-5)
    assert ((expected != 0).sum(-1) <= 4).all()
    assert (sae.activation, sae.k, sae.apply_b_dec_to_input) == ("topk", 4, True)
    assert (sae.site, sae.layer, sae.model_name, sae.format) == ("resid_post", 1, "tiny/llama", "sparsify")
    # decode: Σ_j f_j W_dec[j] + b_dec
    codes = _encode(sae, x)
    with torch.no_grad():
        decoded = sae.decode(torch.from_numpy(codes)).numpy()
    np.testing.assert_allclose(decoded, codes @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)
    # a sparsify encoder stored in the SAELens orientation is reported as transposed
    tensors["encoder.weight"] = torch.from_numpy(w["W_enc"])
    save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(
        SAEError, match=r"'encoder.weight' has shape \[8, 16\], expected \[16, 8\].*transposed"
    ):
        load_sae(folder)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_save_load_round_trip(tmp_path, activation):
    w = _weights(9)
    sae = SparseAutoencoder(
        D_IN, D_SAE, activation, k=5 if activation == "topk" else None, apply_b_dec_to_input=True
    )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.from_numpy(w[name]))
        if activation == "jumprelu":
            sae.threshold.copy_(torch.from_numpy(w["threshold"]))
    sae.metadata.site, sae.metadata.layer, sae.metadata.model_name = "mlp_out", 2, "m"
    loaded = load_sae(sae.save(tmp_path / "saved"))
    assert (loaded.activation, loaded.k, loaded.apply_b_dec_to_input) == (activation, sae.k, True)
    assert (loaded.site, loaded.layer, loaded.model_name) == ("mlp_out", 2, "m")
    for (name, a), (_, b) in zip(sae.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    x = torch.from_numpy(_x())
    assert torch.equal(sae.encode(x), loaded.encode(x))
    cfg = json.loads((tmp_path / "saved" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_mlp_out"


# -- errors ------------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path):
    w = _weights()
    bad = dict(w, W_dec=w["W_dec"][:, :5])
    folder = _write_saelens(tmp_path / "shape", bad, _flat_cfg())
    with pytest.raises(
        SAEError, match=r"sae_weights.safetensors: tensor 'W_dec' has shape \[16, 5\], expected \[16, 8\]"
    ):
        load_sae(folder)
    folder = _write_saelens(tmp_path / "nokey", w, _flat_cfg(), keys=("W_enc", "b_enc", "W_dec"))
    with pytest.raises(SAEError, match=r"has no tensor 'b_dec'"):
        load_sae(folder)
    (tmp_path / "nofile").mkdir()
    (tmp_path / "nofile" / "cfg.json").write_text(json.dumps(_flat_cfg()))
    with pytest.raises(SAEError, match=r"no sae_weights.safetensors"):
        load_sae(tmp_path / "nofile")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match=r"not an SAE folder.*params.npz"):
        load_sae(tmp_path / "empty")
    folder = _write_saelens(tmp_path / "ok", w, _flat_cfg())
    with pytest.raises(SAEError, match=r"d_in=8.*width 12"):
        load_sae(folder, d_in=12)
    gemma = tmp_path / "layer_0" / "width_16" / "average_l0_2"
    gemma.mkdir(parents=True)
    np.savez(gemma / "params.npz", **{k: v for k, v in w.items() if k != "threshold"})
    with pytest.raises(SAEError, match=r"params.npz has no tensor 'threshold'"):
        load_sae(gemma)
    with pytest.raises(SAEError, match=r"d_in=8"):
        np.savez(gemma / "params.npz", **w)
        load_sae(gemma, d_in=4)
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "missing")
    with pytest.raises(SAEError, match="normalize_activations"):
        load_sae(_write_saelens(tmp_path / "norm", w, _flat_cfg(normalize_activations="layer_norm")))
    assert issubclass(SAEError, UserError)


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEError, match=r"hub is offline.*local folder"):
        load_sae("google/gemma-scope-2b-pt-res/layer_25/width_16k/average_l0_55")


# -- gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_frozen_sae_passes_gradient_to_input(activation):
    torch.manual_seed(0)
    sae = SparseAutoencoder(D_IN, D_SAE, activation, k=4 if activation == "topk" else None)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if sae.threshold is not None:
            sae.threshold.abs_().mul_(0.1)
    sae.freeze()
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, requires_grad=True)
    codes = sae.encode(x)
    assert codes.dtype == torch.float32 and codes.shape == (2, 3, D_SAE)
    codes.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in sae.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_widths_and_config():
    sae = SparseAutoencoder(D_IN, D_SAE)
    with pytest.raises(ValueError, match="last dimension 5, expected 8"):
        sae.encode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="k"):
        SparseAutoencoder(D_IN, D_SAE, "topk")
    with pytest.raises(ValueError, match="unknown SAE activation"):
        SparseAutoencoder(D_IN, D_SAE, "gated")


# -- hooks -------------------------------------------------------------------------------------------


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def probe_capture(model: torch.nn.Module, site: str, layer: int):
    """The probe's capture of ``site`` / ``layer`` (an SAE of the tiny models' width, 64)."""
    return FeatureProbe(SparseAutoencoder(64, 32), site, layer).capture(model)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_resid_post_matches_hidden_states_and_pre_norm(name):
    model = tiny_llama() if name == "llama" else tiny_gpt2()
    final_norm = model.model.norm if name == "llama" else model.transformer.ln_f
    layers = model.model.layers if name == "llama" else model.transformer.h
    ids = _ids()
    model(ids, output_hidden_states=True)  # transformers installs its own capture hooks on first use
    for layer in range(len(layers)):
        before = dict(layers[layer]._forward_hooks)
        with probe_capture(model, "resid_post", layer) as captured:
            assert len(layers[layer]._forward_hooks) == len(before) + 1
            out = model(ids, output_hidden_states=True)
        acts = captured["activations"]
        assert acts.shape == (2, 7, 64) and acts.requires_grad
        if layer < len(layers) - 1:
            torch.testing.assert_close(acts, out.hidden_states[layer + 1])
        else:
            assert not torch.allclose(acts, out.hidden_states[-1])
            torch.testing.assert_close(final_norm(acts), out.hidden_states[-1])
        assert dict(layers[layer]._forward_hooks) == before  # removed on exit


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mlp_out_and_gradient_into_model(name):
    model = tiny_llama() if name == "llama" else tiny_gpt2()
    layers = model.model.layers if name == "llama" else model.transformer.h
    model(_ids())
    before = dict(layers[0].mlp._forward_hooks)
    mine = {}
    handle = layers[0].mlp.register_forward_hook(lambda m, a, o: mine.__setitem__("out", o))
    try:
        with probe_capture(model, "mlp_out", 0) as captured:
            model(_ids())
    finally:
        handle.remove()
    torch.testing.assert_close(captured["activations"], mine["out"])
    assert dict(layers[0].mlp._forward_hooks) == before
    sae = SparseAutoencoder(64, 32).freeze()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    with probe_capture(model, "resid_post", 1) as captured:
        model(_ids())
    sae.encode(captured["activations"]).sum().backward()
    grads = [p.grad for p in layers[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_hook_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"unknown SAE hook site 'resid_pst'.*'resid_post'"):
        site_module(model, "resid_pst", 0)
    with pytest.raises(ValueError, match=r"out of range.*2 decoder layers"):
        site_module(model, "resid_post", 2)
    with pytest.raises(ValueError, match="out of range"), probe_capture(model, "mlp_out", -1):
        pass
    # A block without the forward: the site never fired, which is an error, not a missing key later.
    with pytest.raises(RuntimeError, match="never fired"), probe_capture(model, "resid_post", 0):
        pass
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


# -- the format registry ------------------------------------------------------------------------------


def test_every_module_of_the_formats_package_registers_its_format():
    import pkgutil

    from sparsealign.sae import formats

    names = {fmt.name for fmt in available_formats()}
    assert names == {"saelens", "gemma_scope", "sparsify"}
    modules = {m.name for m in pkgutil.iter_modules(formats.__path__)} - {"common"}
    assert modules == names, "a format module that registers nothing, or a format without its module"
    assert get_format("saelens").save is not None and get_format("gemma_scope").save is None
    with pytest.raises(SAEError, match=r"unknown SAE format 'npz'.*gemma_scope"):
        get_format("npz")


def _toy_format():
    """A format for one test: ``toy.json`` holding ``{"d": D}``, loaded as a ReLU SAE, identity encoder."""

    def detect(path: Path) -> bool:
        file = path if path.is_file() else path / "toy.json"
        return file.name == "toy.json" and file.is_file()

    def load(path: Path, *, d_in, dtype, device) -> SparseAutoencoder:
        file = path if path.is_file() else path / "toy.json"
        d = json.loads(file.read_text())["d"]
        sae = SparseAutoencoder(d, d, dtype=dtype or torch.float32, device=device)
        with torch.no_grad():
            sae.W_enc.copy_(torch.eye(d))
        sae.metadata.format = "toy"
        return sae

    return SAEFormat("toy", "toy.json", detect, load)


def test_a_registered_format_is_detected_by_load_sae(tmp_path, monkeypatch):
    from sparsealign.sae import formats

    toy = _toy_format()
    monkeypatch.setitem(formats._REGISTRY, "toy", toy)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.json").write_text('{"d": 3}')
    for target in (tmp_path / "toy", tmp_path / "toy" / "toy.json"):
        sae = load_sae(target, dtype=torch.float64)
        assert sae.format == "toy" and sae.dtype == torch.float64
        assert torch.equal(sae.encode(torch.tensor([1.0, -2.0, 3.0])), torch.tensor([1.0, 0.0, 3.0]).double())
    with pytest.raises(ValueError, match="already registered"):
        register_format(SAEFormat("toy", "other", toy.detect, lambda path, **_: None))
    assert register_format(toy) is toy  # the same format again (a module reload) is fine
    with pytest.raises(SAEError, match=r"'toy' cannot be written \(writable: saelens\)"):
        save_sae(SparseAutoencoder(2, 2), tmp_path / "out", format="toy")
    # A folder that two formats claim is refused rather than read by whichever comes first.
    _write_saelens(tmp_path / "toy", _weights(), _flat_cfg())
    with pytest.raises(SAEError, match=r"matches several SAE formats \(saelens, toy\)"):
        load_sae(tmp_path / "toy")
    # Errors list every registered format's files.
    with pytest.raises(SAEError, match=r"not an SAE folder.*toy\.json \(toy\)"):
        load_sae(tmp_path)


def test_save_sae_is_the_saelens_writer(tmp_path):
    sae = SparseAutoencoder(D_IN, D_SAE)
    assert save_sae(sae, tmp_path / "a") == tmp_path / "a"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert load_sae(tmp_path / "a").format == "saelens"


def test_sparsify_repository_folder_lists_its_hookpoints(tmp_path):
    for name in ("layers.0", "layers.1"):
        (tmp_path / "repo" / name).mkdir(parents=True)
        (tmp_path / "repo" / name / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "k": 4}))
    with pytest.raises(SAEError, match=r"one SAE per hookpoint \(layers.0, layers.1\)"):
        load_sae(tmp_path / "repo")
    with pytest.raises(SAEError, match=r"sparsify cfg.json but no weights file sae.safetensors"):
        load_sae(tmp_path / "repo" / "layers.0")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(SAEError, match=r"file.bin is not a known SAE file.*params.npz \(gemma_scope\)"):
        load_sae(tmp_path / "file.bin")


# -- the feature probe --------------------------------------------------------------------------------


def _position_probe(width: int, positions: str) -> FeatureProbe:
    """A probe whose SAE is the identity (ReLU, W_enc = I): its codes are its input."""
    sae = SparseAutoencoder(width, width)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(width))
    return FeatureProbe(sae, "resid_post", 0, positions=positions)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_probe_pools_over_the_response_or_the_predicting_positions(padding_side):
    from sparsealign.data.collate import collate_sequences

    # Row 0: prompt [BOS, 5, 6] and response [7, 8, EOS] -> positions 0..5 (right padding).
    # Row 1: prompt [BOS, 9] and response [10, EOS]      -> positions 0..3, then 2 pads (right).
    batch = collate_sequences([[1, 5, 6], [1, 9]], [[7, 8, 2], [10, 2]], pad_id=0, padding_side=padding_side)
    n, length = batch.input_ids.shape
    assert (n, length) == (2, 6)
    # The activation at input position p is the one-hot vector e_p: the pooled code shows which positions
    # were averaged, and with what weight.
    activations = torch.eye(length).expand(n, length, length).clone()
    shift = 2 if padding_side == "left" else 0  # row 1 starts 2 positions later under left padding
    expected = {
        # the response tokens' own positions (today's default): 3, 4, 5 and 2, 3
        "response": [[3, 4, 5], [2 + shift, 3 + shift]],
        # the positions predicting them (the released FPO code): the last prompt token in, the EOS out
        "predicting": [[2, 3, 4], [1 + shift, 2 + shift]],
    }
    for positions, rows in expected.items():
        pooled = _position_probe(length, positions).pooled(activations, batch)
        want = torch.zeros(n, length)
        for row, kept in enumerate(rows):
            want[row, kept] = 1.0 / len(kept)
        torch.testing.assert_close(pooled, want, msg=positions)
    assert FeatureProbe(SparseAutoencoder(2, 2), "resid_post", 0).positions == "response"
    with pytest.raises(ValueError, match="unknown pooling positions 'prompt'"):
        FeatureProbe(SparseAutoencoder(2, 2), "resid_post", 0, positions="prompt")


def test_probe_inside_a_forward_reads_the_hidden_states_at_its_positions():
    from sparsealign.data.collate import collate_sequences

    model = tiny_llama()
    batch = collate_sequences([[1, 5, 6], [1, 9]], [[7, 8, 2], [10, 2]], pad_id=0)
    sae = SparseAutoencoder(64, 32, "relu")
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    with torch.no_grad():
        hidden = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    h = hidden.hidden_states[1]  # the output of block 0 = resid_post of layer 0
    for positions, index in (("response", [[3, 4, 5], [2, 3]]), ("predicting", [[2, 3, 4], [1, 2]])):
        probe = FeatureProbe(sae, "resid_post", 0, positions=positions)
        with torch.no_grad(), probe.capture(model) as captured:
            model(batch.input_ids, attention_mask=batch.attention_mask)
            pooled = probe.pooled(captured["activations"], batch)
        want = torch.stack([sae.encode(h[row, kept]).mean(0) for row, kept in enumerate(index)])
        torch.testing.assert_close(pooled, want)


def test_build_feature_probe_checks_the_sae_against_the_model(tmp_path):
    from sparsealign.config import SAEConfig
    from sparsealign.errors import TrainingError

    model = tiny_llama()
    sae = SparseAutoencoder(64, 32)
    sae.metadata.site, sae.metadata.layer = "resid_post", 1
    folder = sae.save(tmp_path / "sae")
    probe = build_feature_probe(SAEConfig(path=str(folder)), model, "cpu", positions="predicting")
    assert (probe.site, probe.layer, probe.positions, probe.sae.d_sae) == ("resid_post", 1, "predicting", 32)
    assert not any(p.requires_grad for p in probe.parameters())
    assert build_feature_probe(SAEConfig(path=str(folder), layer=0), model, "cpu").layer == 0
    with pytest.raises(TrainingError, match=r"sae.site=resid_post sae.layer=7: .*out of range"):
        build_feature_probe(SAEConfig(path=str(folder), layer=7), model, "cpu")
    sae.metadata.layer = None
    with pytest.raises(TrainingError, match="records no layer: set sae.layer"):
        build_feature_probe(SAEConfig(path=str(sae.save(tmp_path / "nolayer"))), model, "cpu")
    with pytest.raises(SAEError, match=r"d_in=32.*width 64"):
        build_feature_probe(SAEConfig(path=str(SparseAutoencoder(32, 8).save(tmp_path / "w"))), model, "cpu")
    with pytest.raises(SAEError, match="set sae.path"):
        build_feature_probe(SAEConfig(), model, "cpu")


def test_build_feature_probe_builds_a_missing_builtin_once_and_says_so(tmp_path, monkeypatch, caplog):
    from sparsealign.config import SAEConfig
    from sparsealign.sae import builtins, probe

    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(builtins.BUILTIN_SAES, "tiny-sae", builtins.BuiltinSAE("tiny-sae", "test", None))
    built = []

    def fake_ensure(name: str) -> Path:  # stands in for the training run (tested in test_sae_train.py)
        built.append(name)
        sae = SparseAutoencoder(64, 16)
        sae.metadata.site, sae.metadata.layer = "resid_post", 0
        return sae.save(builtins.builtin_sae_folder(name))

    monkeypatch.setattr(probe, "ensure_builtin_sae", fake_ensure)
    model = tiny_llama()
    with caplog.at_level("WARNING", logger="sparsealign.sae.probe"):
        first = build_feature_probe(SAEConfig(path="tiny-sae"), model, "cpu")
    assert built == ["tiny-sae"] and "sparsealign sae train --builtin tiny-sae" in caplog.text
    assert first.sae.metadata.source == str(tmp_path / "cache" / "saes" / "tiny-sae")
    caplog.clear()
    second = build_feature_probe(SAEConfig(path="tiny-sae"), model, "cpu")
    assert built == ["tiny-sae"] and not caplog.text, "cached: resolved, not built again"
    assert second.layer == 0
