"""TopK SAE training (``sparsealign sae train``): the math, the activation stream, saving, built-ins, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsealign.errors import UserError
from sparsealign.models.builtins import build_tiny_llama
from sparsealign.sae import builtins as sae_builtins
from sparsealign.sae import load_sae
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder
from sparsealign.sae.training import (
    ActivationStream,
    SAETrainConfig,
    TopKSAETrainer,
    auxk_loss,
    default_lr,
    drop_outliers,
    evaluate_sae,
    geometric_median,
    init_topk_sae,
    kept_positions,
    normalized_mse,
    pad_right,
    resolve_prefix,
    run_to_site,
    site_activations,
    tokenize_documents,
    topk_encode,
    train_sae,
)
from sparsealign.sae.training import run as sae_train_run

BOS, PAD = 256, 257  # tiny-random-llama's byte tokenizer: <s> added in front, </s> is EOS and pad


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_llama(0)
    return model.eval(), tokenizer


def _texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["the", "movie", "was", "good", "bad", "plot", "actor", "great", "film", "boring", "fun"]
    texts = []
    for i in range(n):
        length = int(torch.randint(1, 25, (1,), generator=g))
        picks = torch.randint(0, len(words), (length,), generator=g).tolist()
        texts.append(f"doc{i} " + " ".join(words[j] for j in picks))
    return texts


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in texts))
    return path


def _tiny_config(source: Path, **extra) -> SAETrainConfig:
    values = dict(
        model="tiny-random-llama",
        site="resid_post",
        layer=1,
        width=128,
        k=8,
        source=str(source),
        context_length=48,
        tokens=3072,
        batch_tokens=256,
        docs_per_forward=16,
        buffer_forwards=2,
        heldout_tokens=512,
        log_every_s=1e9,
        dtype="float32",  # the same numbers with or without native bf16
    )
    values.update(extra)
    return SAETrainConfig(**values)


# -- (a) synthetic sparse data ------------------------------------------------------------------------


def test_topk_sae_recovers_exactly_sparse_synthetic_data():
    """Each x is a positive combination of k of 256 random unit directions (+ an offset): training takes
    the held-out FVU far below the 1.0 of predicting the mean, and every token uses exactly k latents."""
    d_in, n_dirs, k = 128, 256, 4
    # (Not seed 0: the trainer's seed-0 initialisation would start at these very directions.)
    directions = torch.randn(n_dirs, d_in, generator=torch.Generator().manual_seed(123))
    directions = torch.nn.functional.normalize(directions, dim=1)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        chosen = torch.rand(n, n_dirs, generator=generator).argsort(1)[:, :k]
        coefficients = torch.rand(n, k, generator=generator) + 0.5
        return (coefficients[..., None] * directions[chosen]).sum(1) + 3.0

    data = torch.Generator().manual_seed(1)
    steps = 400
    trainer = TopKSAETrainer(
        d_in,
        n_dirs,
        k,
        total_steps=steps,
        lr=6e-3,
        dead_window=10_000,
        warmup_steps=10,
        decay_fraction=0.2,
        seed=0,
    )
    first = trainer.step(sample(512, data))
    for _ in range(steps - 1):
        last = trainer.step(sample(512, data))
    metrics = evaluate_sae(trainer.result(), sample(4096, torch.Generator().manual_seed(2)))
    assert first.fvu > 0.5
    assert last.fvu < 0.1
    assert metrics["fvu"] < 0.06, metrics  # measured 0.021
    assert metrics["l0"] == k
    assert metrics["dead_fraction"] < 0.05


# -- (b) decoder geometry, initialisation, and the sparse backward --------------------------------------


def test_init_decoder_unit_rows_and_encoder_transpose():
    sae = init_topk_sae(16, 48, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    assert sae.activation == "topk" and sae.k == 4 and sae.apply_b_dec_to_input
    assert default_lr(16384) == pytest.approx(2e-4) and default_lr(4096) == pytest.approx(4e-4)


def test_decoder_rows_stay_unit_norm_and_first_batch_sets_b_dec():
    trainer = TopKSAETrainer(16, 64, 4, total_steps=20, lr=0.05, seed=0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 7 + 2
    trainer.step(x)
    scale = math.sqrt(16 / (x - x.mean(0)).pow(2).sum(1).mean().item())
    assert trainer.scale == pytest.approx(scale, rel=1e-5)
    before = trainer.sae.W_dec.detach().clone()
    for _ in range(5):
        trainer.step(x)
    norms = trainer.sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64), atol=1e-5, rtol=0)
    assert not torch.allclose(before, trainer.sae.W_dec.detach())  # the large lr did move the rows


def test_geometric_median_ignores_outliers():
    points = torch.cat([torch.zeros(20, 3) + torch.randn(20, 3) * 0.01, torch.full((3, 3), 1000.0)])
    assert geometric_median(points).abs().max() < 0.05
    assert points.mean(0).abs().max() > 100


def test_sparse_backward_equals_dense_autograd():
    torch.manual_seed(0)
    sae = init_topk_sae(16, 40, 5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(30, 16) * 2 + 1
    x_hat, values, indices, _ = topk_encode(sae, x)
    normalized_mse(x, x_hat).backward()
    sparse = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    dense = sae(x)
    torch.testing.assert_close(x_hat, dense, atol=1e-5, rtol=1e-5)
    normalized_mse(x, dense).backward()
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert (indices.diff(dim=1) > 0).all()  # sorted within each row, as the CSR products need
    assert values.shape == (30, 5)


def test_parallel_gradient_component_is_removed():
    trainer = TopKSAETrainer(8, 24, 3, total_steps=5, lr=0.0, seed=0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    trainer.step(x)
    grad, rows = trainer.sae.W_dec.grad, trainer.sae.W_dec.detach()
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close((grad * rows).sum(1), torch.zeros(24), atol=1e-7, rtol=0)


# -- (e) AuxK -----------------------------------------------------------------------------------------


def test_auxk_loss_zero_without_dead_latents_positive_with():
    torch.manual_seed(0)
    sae = init_topk_sae(16, 64, 4, torch.Generator().manual_seed(0))
    x = torch.randn(128, 16)
    with torch.no_grad():
        x_hat = topk_encode(sae, x)[0]
    none = auxk_loss(sae, x, x_hat, torch.zeros(64, dtype=torch.bool), k_aux=8)
    assert none.item() == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    loss = auxk_loss(sae, x, x_hat, dead, k_aux=8)
    assert loss.item() > 0
    loss.backward()
    # Only dead latents get gradient, and nothing flows into b_dec (the residual is a constant).
    assert sae.W_dec.grad[~dead].abs().sum() == 0 and sae.W_dec.grad[dead].abs().sum() > 0
    assert sae.W_enc.grad[:, ~dead].abs().sum() == 0
    assert sae.b_dec.grad is None or sae.b_dec.grad.abs().sum() == 0


def test_trainer_marks_latents_dead_after_the_window():
    trainer = TopKSAETrainer(8, 32, 2, total_steps=10, dead_window=200, seed=0)
    with torch.no_grad():
        trainer.sae.b_enc[:8] = -1e4  # these 8 latents can never fire
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    stats = [trainer.step(x) for _ in range(4)]
    # Before each step: 0, 100, 200, 300 tokens without firing; dead from 200 (the window) on.
    assert [s.dead >= 8 for s in stats] == [False, False, True, True]
    assert stats[0].aux == 0.0 and stats[1].aux == 0.0 and stats[2].aux > 0
    assert trainer.dead_mask()[:8].all()


# -- (c) the activation stream --------------------------------------------------------------------------


def _hooked_output(model, module, seq: list[int]) -> torch.Tensor:
    captured: dict[str, object] = {}
    handle = module.register_forward_hook(lambda _m, _a, output: captured.update(h=output))
    try:
        with torch.no_grad():
            model(torch.tensor([seq]))
    finally:
        handle.remove()
    hidden = captured["h"]
    return hidden[0] if isinstance(hidden, tuple) else hidden


def test_site_activations_are_the_block_output_without_bos_or_padding(tiny):
    model, tokenizer = tiny
    texts = _texts(6)
    ids = tokenize_documents(tokenizer, texts, context_length=40)
    assert all(seq[0] == BOS for seq in ids) and len({len(seq) for seq in ids}) > 1
    for layer in (0, 1):
        module = model.model.layers[layer]
        rows = site_activations(model, module, tokenizer, texts, context_length=40)
        expected = []
        for seq in ids:
            with torch.no_grad():
                hidden_states = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            if layer == 0:  # hidden_states[L + 1] is block L's output (for all but the last block)
                expected.append(hidden_states[1][0, 1:])
            else:  # HF's last entry is after the final norm; the site is before it
                block = _hooked_output(model, module, seq)[0, 1:]
                assert not torch.allclose(block, hidden_states[-1][0, 1:], atol=1e-3)
                expected.append(block)
        assert rows.shape == (sum(len(s) - 1 for s in ids), 64)
        torch.testing.assert_close(rows, torch.cat(expected), atol=1e-5, rtol=1e-4)


def test_kept_positions_never_include_bos_or_padding(tiny):
    _, tokenizer = tiny
    ids = tokenize_documents(tokenizer, _texts(9), context_length=30)
    input_ids, mask = pad_right(ids, PAD)
    keep = kept_positions(mask)
    assert (mask.sum() > keep.sum()) and (input_ids == PAD).any()
    kept_tokens = input_ids[keep]
    assert not torch.isin(kept_tokens, torch.tensor([BOS, PAD])).any()
    assert keep.sum().item() == sum(len(s) - 1 for s in ids)


def test_prefix_token_goes_in_front_once(tiny):
    from sparsealign.models.builtins import tiny_gpt2_tokenizer

    _, llama_tokenizer = tiny
    gpt2_tokenizer = tiny_gpt2_tokenizer()  # adds no special token itself; BOS = <|endoftext|> = 256
    texts = ["ab cd", "x"]
    plain = tokenize_documents(gpt2_tokenizer, texts, 10, resolve_prefix(gpt2_tokenizer, "none"))
    assert plain == [list(b"ab cd"), []]  # one token is too short once the first position is dropped
    prefixed = tokenize_documents(gpt2_tokenizer, texts, 4, resolve_prefix(gpt2_tokenizer, "bos"))
    assert prefixed == [[256, *b"ab "], [256, ord("x")]]
    # A tokenizer that adds its BOS itself does not get a second one.
    once = tokenize_documents(llama_tokenizer, texts, 10, resolve_prefix(llama_tokenizer, "bos"))
    assert once == [[BOS, *b"ab cd"], [BOS, ord("x")]]
    explicit = tokenize_documents(llama_tokenizer, texts, 10, resolve_prefix(llama_tokenizer, "</s>"))
    assert explicit[0][:2] == [PAD, BOS]
    with pytest.raises(UserError, match="not a token"):
        resolve_prefix(llama_tokenizer, "<|nope|>")


def test_massive_activation_rows_are_dropped_and_counted():
    rows = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    rows[[3, 50]] *= 100
    kept, dropped = drop_outliers(rows, 10.0)
    assert dropped == 2 and kept.shape == (198, 8)
    assert drop_outliers(rows, None)[1] == 0


def test_forward_stops_after_the_hooked_block(tiny):
    model, tokenizer = tiny
    calls = {"layer0": 0, "layer1": 0, "norm": 0, "head": 0}
    handles = [
        model.model.layers[0].register_forward_hook(
            lambda *_: calls.__setitem__("layer0", calls["layer0"] + 1)
        ),
        model.model.layers[1].register_forward_hook(
            lambda *_: calls.__setitem__("layer1", calls["layer1"] + 1)
        ),
        model.model.norm.register_forward_hook(lambda *_: calls.__setitem__("norm", calls["norm"] + 1)),
        model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1)),
    ]
    try:
        input_ids, mask = pad_right(tokenize_documents(tokenizer, _texts(3), 20), PAD)
        out = run_to_site(model, model.model.layers[0], input_ids, mask)
        assert out.shape == (*input_ids.shape, 64)
        assert calls == {"layer0": 1, "layer1": 0, "norm": 0, "head": 0}
        # The hook is removed afterwards: a normal forward runs everything.
        with torch.no_grad():
            model(input_ids, attention_mask=mask)
        assert calls == {"layer0": 2, "layer1": 1, "norm": 1, "head": 1}
    finally:
        for handle in handles:
            handle.remove()


def test_a_site_the_forward_never_runs_is_named_in_the_error(tiny):
    model, tokenizer = tiny
    input_ids, mask = pad_right(tokenize_documents(tokenizer, _texts(2), 20), PAD)
    # A module of the model that its forward never calls: the error names its path in the model.
    stray = torch.nn.Linear(64, 64)
    model.model.add_module("stray", stray)
    try:
        with pytest.raises(RuntimeError, match=r"never fired.*model\.stray"):
            run_to_site(model, stray, input_ids, mask)
    finally:
        del model.model.stray
    assert not stray._forward_hooks


def test_stream_shuffles_known_rows_and_holds_out_disjoint_documents(tiny):
    model, tokenizer = tiny
    texts = _texts(60, seed=3)
    stream = ActivationStream(
        model,
        tokenizer,
        texts,
        site="resid_post",
        layer=0,
        context_length=24,
        batch_tokens=64,
        docs_per_forward=8,
        buffer_forwards=2,
        seed=0,
    )
    seen: list[list[str]] = []
    forward = stream._forward

    def spy(batch: list[str], split: str = "train") -> torch.Tensor:
        seen.append(list(batch))
        return forward(batch, split)

    stream._forward = spy  # type: ignore[method-assign]
    heldout = stream.heldout(100)
    heldout_texts = {t for batch in seen for t in batch}
    assert heldout.shape == (100, 64) and stream.train_start == len(heldout_texts) < len(texts)
    seen.clear()
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == 8:
            break
    train_texts = {t for batch in seen for t in batch}
    assert train_texts and not (train_texts & heldout_texts)
    assert all(b.shape == (64, 64) for b in batches)
    # Every training row is the activation of one of the training documents' kept positions, and the
    # rows are mixed (not in document order).
    reference = site_activations(model, model.model.layers[0], tokenizer, sorted(train_texts), 24)
    rows = torch.cat(batches)
    exact = "donot_use_mm_for_euclid_dist"
    distance = torch.cdist(rows, reference, compute_mode=exact).min(dim=1).values
    assert distance.max() < 1e-4
    order = torch.cdist(rows[:64], reference, compute_mode=exact).argmin(dim=1)
    assert not (order.diff() >= 0).all()


# -- (d), (f), end to end ----------------------------------------------------------------------------


def test_trained_sae_saves_reloads_and_encodes_identically(tmp_path, tiny):
    texts = _texts(200, seed=1)
    source = _write_jsonl(tmp_path / "docs.jsonl", texts)
    result = train_sae(_tiny_config(source), tmp_path / "sae", progress=None)
    folder = result.folder
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "metrics.json", "sae_weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sae")]  # no temporary folder left
    loaded = load_sae(folder, d_in=64)
    assert (loaded.activation, loaded.k, loaded.d_sae, loaded.apply_b_dec_to_input) == ("topk", 8, 128, True)
    assert (loaded.site, loaded.layer, loaded.model_name) == ("resid_post", 1, "tiny-random-llama")
    assert (
        json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    )
    model, tokenizer = tiny
    x = site_activations(model, model.model.layers[1], tokenizer, texts[:5], 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), result.sae.encode(x), rtol=0, atol=0)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["tokens"] == 3072 and metrics["heldout_tokens"] == 512
    assert 0 < metrics["fvu"] < 1.0 and metrics["l0"] == pytest.approx(8, abs=0.5)
    assert 0 <= metrics["dead_fraction"] <= 1 and 0 <= metrics["dead_fraction_train"] <= 1
    assert metrics["config"]["lr"] == pytest.approx(default_lr(128)) and metrics["config"]["k_aux"] == 32


def test_result_folds_the_input_scale_into_the_biases():
    trainer = TopKSAETrainer(8, 32, 3, total_steps=3, seed=0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 50 + 10
    for _ in range(3):
        trainer.step(x)
    assert trainer.scale < 0.1
    raw = trainer.result()
    with torch.no_grad():
        torch.testing.assert_close(
            raw(x) * trainer.scale, trainer.sae(x * trainer.scale), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(raw.encode(x) * trainer.scale, trainer.sae.encode(x * trainer.scale))


def test_bad_input_is_a_clear_user_error(tmp_path):
    source = _write_jsonl(tmp_path / "docs.jsonl", _texts(50))
    with pytest.raises(UserError, match=r"layer 5 is out of range.*2 decoder layers"):
        train_sae(_tiny_config(source, layer=5), tmp_path / "out", progress=None)
    with pytest.raises(UserError, match=r"k=200 is larger than the width"):
        train_sae(_tiny_config(source, k=200), tmp_path / "out", progress=None)
    with pytest.raises(UserError, match=r"did you mean 'resid_post'"):
        train_sae(_tiny_config(source, site="resid_pots"), tmp_path / "out", progress=None)
    with pytest.raises(UserError, match=r"neither 'imdb' nor an existing file"):
        train_sae(_tiny_config(tmp_path / "missing.jsonl"), tmp_path / "out", progress=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 has no string field 'text'"):
        train_sae(_tiny_config(bad), tmp_path / "out", progress=None)
    with pytest.raises(UserError, match=r"tokens=100 is less than one batch"):
        train_sae(_tiny_config(source, tokens=100), tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()


# -- built-ins ----------------------------------------------------------------------------------------


def test_builtin_sae_is_resolved_never_trained_by_loading_and_built_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    source = _write_jsonl(tmp_path / "docs.jsonl", _texts(120, seed=2))
    entry = sae_builtins.BuiltinSAE("tiny-test-sae", "test", lambda: _tiny_config(source, tokens=1024))
    monkeypatch.setitem(sae_builtins.BUILTIN_SAES, "tiny-test-sae", entry)
    saes = tmp_path / "cache" / "saes"

    # Not built: resolving says how to build it, and load_sae (files only) refuses the name; neither trains.
    def no_training(*_args, **_kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(sae_train_run, "train_sae", no_training)
    with pytest.raises(UserError, match=r"not built yet.*sparsealign sae train --builtin tiny-test-sae"):
        sae_builtins.resolve_builtin_sae("tiny-test-sae")
    with pytest.raises(UserError, match=r"built-in SAE name, not a path.*resolve_builtin_sae"):
        load_sae("tiny-test-sae")
    with pytest.raises(UserError, match="did you mean 'tiny-test-sae'"):
        sae_builtins.resolve_builtin_sae("tiny-test-sea")
    with pytest.raises(UserError, match="did you mean 'tiny-test-sae'"):
        sae_builtins.ensure_builtin_sae("tiny-test-sea")
    monkeypatch.undo()

    # An interrupted training leaves nothing behind.
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sae_builtins.BUILTIN_SAES, "tiny-test-sae", entry)

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sae_train_run, "evaluate_sae", boom)
    with pytest.raises(KeyboardInterrupt):
        sae_builtins.ensure_builtin_sae("tiny-test-sae")
    assert not saes.exists() or not list(saes.iterdir())
    monkeypatch.undo()

    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sae_builtins.BUILTIN_SAES, "tiny-test-sae", entry)
    folder = sae_builtins.ensure_builtin_sae("tiny-test-sae")
    assert folder == saes / "tiny-test-sae" == sae_builtins.resolve_builtin_sae("tiny-test-sae")
    sae = load_sae(folder)
    assert isinstance(sae, SparseAutoencoder) and sae.layer == 1 and sae.d_sae == 128
    assert sorted(p.name for p in saes.iterdir()) == ["tiny-test-sae"]
    assert (folder / "metrics.json").is_file()

    # Cached: ensuring it again does not train again.
    monkeypatch.setattr(sae_train_run, "train_sae", no_training)
    assert sae_builtins.ensure_builtin_sae("tiny-test-sae") == folder
    torch.testing.assert_close(load_sae(folder).W_dec, sae.W_dec)


def test_smollm2_builtin_is_registered():
    config = sae_builtins.BUILTIN_SAES["smollm2-135m-instruct-imdb"].config()
    config.check()
    assert (config.model, config.site, config.layer, config.source) == (
        "smollm2-135m-instruct",
        "resid_post",
        20,
        "imdb",
    )
    assert sae_builtins.builtin_sae_folder("x").parts[-2:] == ("saes", "x")
    assert SAEMetadata().site is None  # metadata defaults unchanged


# -- (g) CLI ------------------------------------------------------------------------------------------


def test_cli_sae_train_writes_the_sae_and_metrics(tmp_path, capsys):
    from sparsealign.cli import main

    source = _write_jsonl(tmp_path / "docs.jsonl", _texts(150, seed=4))
    out = tmp_path / "cli-sae"
    args = ["sae", "train", "--model", "tiny-random-llama", "--site", "resid_post", "--layer", "1"]
    args += ["--width", "96", "--k", "6", "--source", str(source), "--context", "40", "--tokens", "2048"]
    args += ["--batch-tokens", "256", "--heldout-tokens", "512", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (
        "held-out FVU" in printed and "L0" in printed and "dead fraction" in printed and str(out) in printed
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fvu", "l0", "dead_fraction"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key])
    assert 0 < metrics["fvu"] < 1.5 and metrics["l0"] <= 6
    assert load_sae(out).d_sae == 96

    assert (
        main(
            [
                "sae",
                "train",
                "--model",
                "tiny-random-llama",
                "--layer",
                "7",
                "--source",
                str(source),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "out of range" in capsys.readouterr().err
    assert main(["sae", "train", "--builtin", "smollm2-135m-instruct-imdb", "--k", "3"]) == 2
    assert main(["sae", "train", "--model", "tiny-random-llama"]) == 2
    assert "--out" in capsys.readouterr().err
