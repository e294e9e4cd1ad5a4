"""Padding-free batches: the packed layout by hand, and every output of a packed forward equal to the padded
forward's (log-probs, token KL, hidden states, activations, SAE features, each method's loss, metrics and
gradients) on the tiny Llama, GPT-2 and a SmolLM2-shaped model, with right and left padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsealign.data.collate import PACK_BELOW, apply_packing, collate_pairs, collate_sequences
from sparsealign.data.packing import first_fit_decreasing, pack
from sparsealign.errors import TrainingError
from sparsealign.masks import activation_mask
from sparsealign.methods import METHODS, Need
from sparsealign.models.activations import capture_activations
from sparsealign.models.logprobs import TokenModel, output_head, packing_is_exact, resolve_packing
from sparsealign.recipes.load import load_config
from sparsealign.sae.probe import FeatureProbe
from sparsealign.train.loop import build
from sparsealign.train.step import compute_loss, step_inputs
from tiny_models import VOCAB, random_pairs, random_sae, saved_random_sae, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def tiny_smollm2(seed: int = 0) -> LlamaForCausalLM:
    """SmolLM2's shape at toy size: tied embeddings, 3 query heads per key/value head, head dim 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "smollm2": tiny_smollm2}


def assert_equal_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "") -> None:
    """Equal up to ``rel`` of the tensor's largest magnitude: float32 sums taken in another order (a packed
    row's matrix products) differ by rounding relative to the values summed, not to each element."""
    scale = want.abs().max().clamp_min(1e-12)
    assert got.shape == want.shape, what
    assert ((got - want).abs().max() / scale) <= rel, f"{what}: {((got - want).abs().max() / scale):.2e}"


# -- the layout ------------------------------------------------------------------------------------


def test_first_fit_decreasing_by_hand():
    # longest first: 5 -> bin 0, 4 -> bin 1, 3 -> bin 1 (4+3 <= 8; bin 0 has 3 left, also fits: first fit), ...
    assert first_fit_decreasing([3, 5, 2, 4, 1], capacity=8) == [[1, 0], [3, 2, 4]]
    assert first_fit_decreasing([2, 2, 2], capacity=2) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="9 tokens"):
        first_fit_decreasing([9], capacity=8)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_layout_by_hand(side):
    # rows of 3, 6 and 2 real tokens, padded to 6
    batch = collate_sequences([[5, 6], [7, 8, 9], [10]], [[11], [12, 13, 14], [15]], 0, side)
    packing = pack(batch.input_ids, batch.attention_mask, width=8)
    # capacity 8, longest first: row 1 (6) -> packed row 0; row 0 (3) -> packed row 1; row 2 (2) -> row 0
    assert packing.input_ids.tolist() == [[7, 8, 9, 12, 13, 14, 10, 15], [5, 6, 11, 0, 0, 0, 0, 0]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert packing.row.tolist() == [1, 0, 0]
    first = [3, 0, 4] if side == "left" else [0, 0, 0]  # padded column of each row's first token
    assert packing.shift.tolist() == [0 - first[0], 0 - first[1], 6 - first[2]]
    # every real token is where gather looks for it
    for n in range(3):
        columns = batch.attention_mask[n].nonzero().squeeze(1)
        got = packing.input_ids[packing.row[n], columns + packing.shift[n]]
        assert got.tolist() == batch.input_ids[n, columns].tolist()


def test_default_width_computes_the_fewest_positions():
    # eight rows of 10 real tokens padded to 16: widths 16 (8 x 16 = 128), 32 (... 3 per row), ... 512
    batch = collate_sequences([[3] * 4] * 8, [[4] * 6] * 7 + [[4] * 12], 0)
    packing = pack(batch.input_ids, batch.attention_mask)
    assert packing.num_positions == 86  # one row: all 86 real tokens, nothing unused
    assert packing.input_ids.shape == (1, 86)


def test_auto_packs_only_when_it_saves_enough():
    even = collate_sequences([[3] * 4] * 4, [[4] * 6] * 4, 0)  # no padding at all
    assert apply_packing(even, "auto").packing is None
    assert apply_packing(even, True).packing is not None
    ragged = collate_sequences([[3] * 4] * 4, [[4] * 20, [4], [4], [4]], 0)
    assert ragged.packed().packing.num_positions <= PACK_BELOW * ragged.input_ids.numel()
    assert apply_packing(ragged, "auto").packing is not None
    assert apply_packing(ragged, False).packing is None


# -- the forward -----------------------------------------------------------------------------------


def _batch(side: str, seed: int = 0):
    return collate_pairs(random_pairs(6, seed=seed), pad_id=2, padding_side=side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_forward_equals_padded(name, side):
    """Log-probs, head rows, hidden states of every layer, the token KL and the reference's log-probs, and
    the gradients of all of them, equal between padded and packed forwards."""
    policy = TokenModel(MODELS[name](seed=0))
    reference = TokenModel(MODELS[name](seed=1))
    padded = _batch(side)
    packed = padded.packed()
    assert packed.packing.num_positions < padded.input_ids.numel()
    assert packed.packing.input_ids.shape[0] < padded.input_ids.shape[0]  # sequences share rows
    results = []
    for batch in (padded, packed):
        policy.zero_grad()
        with torch.no_grad():
            ref = reference(batch, layers=(0, 1, 2), head=False)
        out = policy(batch, layers=(0, 1, 2), reference=ref, reference_head=output_head(reference.model))
        (out.logps.sum() + out.kl.sum() + sum(h.square().sum() for h in out.layers.values())).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
        results.append((out, ref, grads))
    (a, ref_a, grads_a), (b, ref_b, grads_b) = results
    for field in ("logps", "kl", "reference_logps", "head_inputs"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=2e-5, rtol=1e-5)
    for i in (0, 1, 2):
        torch.testing.assert_close(b.layers[i], a.layers[i], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ref_b.layers[i], ref_a.layers[i], atol=2e-5, rtol=1e-5)
    assert a.logps.abs().sum() > 0 and a.kl.abs().sum() > 0  # not trivially equal
    for name_ in grads_a:
        assert_equal_to_scale(grads_b[name_], grads_a[name_], 1e-5, name_)


@pytest.mark.parametrize("spec", ["all", "original"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_activations_and_masks_equal_padded(name, spec):
    """MaPO's activations (every compact and original hook point, rotary q/k included) and the mask built
    from them."""
    model = MODELS[name](seed=0)
    padded = _batch("right", seed=3)
    captured = []
    for batch in (padded, padded.packed()):
        with torch.no_grad(), capture_activations(model, spec, batch) as groups:
            TokenModel(model)(batch)
        captured.append((groups, activation_mask(groups, batch.response_mask)))
    (groups_a, mask_a), (groups_b, mask_b) = captured
    assert groups_a.keys() == groups_b.keys() and groups_a
    for kind in groups_a:
        for x, y in zip(groups_a[kind], groups_b[kind], strict=True):
            torch.testing.assert_close(y, x, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(mask_b, mask_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["response", "predicting"])
def test_packed_sae_features_equal_padded(positions):
    model = tiny_llama()
    probe = FeatureProbe(random_sae(), "resid_post", 1, positions)
    tokens = TokenModel(model, features=probe)
    padded = _batch("left", seed=5)
    features = []
    for batch in (padded, padded.packed()):
        model.zero_grad()
        out = tokens(batch)
        out.features.square().sum().backward()
        features.append((out.features, model.model.layers[0].mlp.down_proj.weight.grad.clone()))
    torch.testing.assert_close(features[1][0], features[0][0], atol=1e-5, rtol=1e-5)
    assert_equal_to_scale(features[1][1], features[0][1], 1e-5)
    assert features[0][0].abs().sum() > 0


def test_a_model_that_ignores_packed_positions_is_detected(monkeypatch):
    """The start-up check fails when attention is not kept within each packed sequence (simulated by
    transformers not finding the packed sequences): auto falls back to padding, true is refused."""
    model = tiny_llama()
    assert packing_is_exact(model)
    assert resolve_packing(True, model) is True and resolve_packing("auto", model) == "auto"
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_is_exact(model)
    assert resolve_packing("auto", model) is False
    with pytest.raises(TrainingError, match="train.packing=false or auto"):
        resolve_packing(True, model)


# -- every method's step -------------------------------------------------------------------------------


EXTRA = {
    "cdpo": ["method.label_smoothing=0.1"],
    "sparsepo-indp-mlp_last": ["method.shared_mask=false", "method.mask_model=mlp_last"],
}


@pytest.mark.parametrize("method", sorted(METHODS) + ["sparsepo-indp-mlp_last"])
def test_every_method_packed_step_equals_padded(tmp_path, method):
    """Each registered method's loss, metrics and gradients (the policy's and its module's) on one batch,
    padded vs packed (mismatched rows, mask networks, activation masks and SAE features included)."""
    extra = EXTRA.get(method, [])
    name = method.split("-")[0] if method not in METHODS else method
    if Need.SAE_FEATURES in METHODS[name].needs:
        extra = ["sae.layer=1", "method.k=8", f"sae.path={saved_random_sae(tmp_path / 'sae')}"]
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
            f"method.name={name}",
            "train.progress=false",
            "train.packing=false",
            *extra,
        ],
    )
    session = build(cfg)
    items = session.data.train[:4]
    pad = session.bundle.tokenizer.pad_token_id
    padded = collate_pairs(items, pad, cfg.data.padding_side, session.method.rows == "chosen")
    packed = padded.packed()
    assert packed.packing.num_positions < padded.input_ids.numel()
    results = []
    for batch, packing in ((padded, False), (packed, True)):
        cfg.train.packing = packing  # the step's own rows (KTO's mismatched rows) follow
        session.policy.zero_grad()
        torch.manual_seed(0)
        out = compute_loss(session.policy, step_inputs(cfg, session.method, session.bundle, batch, items))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in session.policy.named_parameters() if p.grad is not None}
        results.append((out, grads))
    session.lock.release()
    (a, grads_a), (b, grads_b) = results
    assert grads_a and grads_a.keys() == grads_b.keys()
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        torch.testing.assert_close(b.metrics[key], a.metrics[key], atol=2e-5, rtol=1e-4, msg=key)
    for key in grads_a:
        assert_equal_to_scale(grads_b[key], grads_a[key], 1e-5, key)


def test_a_packed_run_has_the_padded_run_s_losses(tmp_path):
    """End to end through the loop (training steps, held-out loss): train.packing=true vs false."""
    import json

    from sparsealign.train.loop import train

    common = [
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        "train.max_steps=3",
        "train.save_every=0",
        "train.eval_every=3",
    ]
    losses = {}
    for packing in ("true", "false"):
        folder = tmp_path / packing
        train(
            load_config(
                ROOT / "configs/smoke.yaml", [f"output_dir={folder}", f"train.packing={packing}", *common]
            )
        )
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses[packing] = [(r["step"], r.get("loss"), r.get("eval/loss")) for r in rows]
    assert len(losses["true"]) == len(losses["false"]) >= 4
    for (step_a, loss_a, eval_a), (step_b, loss_b, eval_b) in zip(
        losses["true"], losses["false"], strict=True
    ):
        assert step_a == step_b
        for a, b in ((loss_a, loss_b), (eval_a, eval_b)):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, abs=1e-5))


@pytest.mark.parametrize("method", ["kto", "fpo"])
def test_the_reference_cache_built_packed_equals_the_padded_one(tmp_path, method):
    """The cache builder's forwards (log-probs, KTO's mismatched rows, FPO's SAE codes) packed vs padded."""
    from safetensors.torch import load_file

    from sparsealign.refcache.store import split_file
    from sparsealign.train.reference_cache import cache_run

    extra = [f"method.name={method}"]
    if method == "fpo":
        extra += ["sae.layer=1", "method.k=8", f"sae.path={saved_random_sae(tmp_path / 'sae')}"]
    stored = {}
    for packing in ("true", "false"):
        cache = tmp_path / f"cache-{packing}"
        cfg = load_config(
            ROOT / "configs/smoke.yaml",
            [
                f"output_dir={tmp_path / packing}",
                f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
                f"reference.cache={cache}",
                f"train.packing={packing}",
                *extra,
            ],
        )
        cache_run(cfg)
        stored[packing] = load_file(str(split_file(cache, "train")))
    assert stored["true"].keys() == stored["false"].keys()
    assert any("mismatched" in k for k in stored["true"]) == (method == "kto")
    for key, want in stored["false"].items():
        got = stored["true"][key]
        if want.is_floating_point():
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=key)
        else:
            assert torch.equal(got, want), key
