"""The offline reference cache: same losses as a live reference, no reference model, stale caches refused."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from sparsealign.cli import main
from sparsealign.config import ConfigError
from sparsealign.data.examples import TokenizedPair
from sparsealign.methods import Need, cacheable_methods, get_method
from sparsealign.models import loading
from sparsealign.models.digest import weights_digest
from sparsealign.recipes.load import load_config
from sparsealign.refcache import CacheError, describe_mismatch, pair_key
from sparsealign.refcache.build import sparse_code
from sparsealign.refcache.store import read_header, split_file, write_split
from sparsealign.train import step
from sparsealign.train.loop import train
from sparsealign.train.reference_cache import cache_run
from tiny_models import saved_random_sae

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"


def smoke(out: Path, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        "train.max_steps=3",
        "train.save_every=0",
        "train.eval_every=0",
    ]
    return load_config(SMOKE, base + list(overrides))


def losses(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


FPO = ("method.name=fpo", "sae.layer=1", "method.k=8")
CACHE_EXTRA = {"cdpo": ["method.label_smoothing=0.1"]}


@pytest.mark.parametrize("method", cacheable_methods())
def test_training_from_the_cache_matches_the_live_reference(tmp_path, monkeypatch, method):
    extra = [f"method.name={method}", *CACHE_EXTRA.get(method, ())]
    if Need.SAE_FEATURES in get_method(method).needs:
        extra = [*FPO, f"sae.path={saved_random_sae(tmp_path / 'sae')}"]
    train(smoke(tmp_path / "live", *extra))
    cache = tmp_path / "cache"
    folder, built = cache_run(smoke(tmp_path / "c", *extra, f"reference.cache={cache}"))
    assert built and folder == cache and split_file(cache, "train").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was constructed or run")

    monkeypatch.setattr(loading, "frozen_copy", refuse)
    monkeypatch.setattr(step, "reference_forward", refuse)
    monkeypatch.setattr(loading.ModelBundle, "reference_model", refuse)
    train(smoke(tmp_path / "cached", *extra, f"reference.cache={cache}", "reference.build_missing=false"))

    live, cached = losses(tmp_path / "live"), losses(tmp_path / "cached")
    assert len(live) == len(cached) == 4  # 3 steps + the final evaluation
    for a, b in zip(live, cached, strict=True):
        for key, value in a.items():
            if key not in ("tokens_per_s", "grad_norm", "lr", "time", "elapsed_s"):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        if "grad_norm" in a:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    at_reference = {
        "ipo": live[0]["loss"],
        "kto": 0.5,  # 1 − σ(0)
        "kto-zero": 0.5,
        # PPO: ρ = 1 and the whitened advantages have mean 0, so the policy and KL terms vanish and only
        # critic_weight · ½ mean (V − G)² is left
        "ppo": 0.01 * live[0].get("ppo/loss/value", math.nan),
    }.get(method, math.log(2))
    assert live[0]["loss"] == pytest.approx(at_reference, abs=1e-3)


def test_missing_cache_is_built_before_training_then_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train(smoke(tmp_path / "a", f"reference.cache={cache}"))  # builds it (the policy is still the reference)
    assert read_header(split_file(cache, "train"))["pairs"] > 0
    stamp = split_file(cache, "train").stat().st_mtime_ns
    monkeypatch.setattr(loading, "frozen_copy", lambda *a: pytest.fail("reference copied"))
    monkeypatch.setattr(step, "reference_forward", lambda *a, **k: pytest.fail("reference run"))
    train(smoke(tmp_path / "b", f"reference.cache={cache}"))
    assert split_file(cache, "train").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert losses(tmp_path / "a")[-1]["eval/loss"] == pytest.approx(losses(tmp_path / "b")[-1]["eval/loss"])


def test_a_cache_that_does_not_match_is_refused_naming_the_field(tmp_path):
    cache = tmp_path / "cache"
    cache_run(smoke(tmp_path / "c", f"reference.cache={cache}"))
    with pytest.raises(CacheError, match=r"data\.max_length: cache 128, run 100"):
        train(smoke(tmp_path / "r1", f"reference.cache={cache}", "data.max_length=100"))
    with pytest.raises(
        CacheError, match=r"model\.weights"
    ):  # other weights: the tiny model from another seed
        train(smoke(tmp_path / "r2", f"reference.cache={cache}", "train.seed=7"))
    with pytest.raises(
        CacheError, match=r"lacks 1 of this run's 1 pairs"
    ):  # other data, refused before training
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps({"prompt": "Hi", "chosen": " good day", "rejected": " bad day"}) + "\n")
        train(smoke(tmp_path / "r3", f"reference.cache={cache}", f"data.path={other}", "train.batch_size=1"))
    with pytest.raises(CacheError, match=r"sae"):  # a DPO cache has no SAE codes for FPO
        sae = saved_random_sae(tmp_path / "sae")
        train(smoke(tmp_path / "r4", *FPO, f"sae.path={sae}", f"reference.cache={cache}"))
    with pytest.raises(CacheError, match="up to date|does not match"):
        cache_run(smoke(tmp_path / "c", f"reference.cache={cache}", "data.max_length=100"))


def test_missing_cache_without_build_says_how_to_build_it(tmp_path):
    with pytest.raises(CacheError, match="sparsealign cache"):
        train(smoke(tmp_path / "r", f"reference.cache={tmp_path / 'none'}", "reference.build_missing=false"))
    (tmp_path / "bad").mkdir()
    for split in ("train", "eval"):
        split_file(tmp_path / "bad", split).write_bytes(b"not a safetensors file")
    with pytest.raises(CacheError, match="not a readable reference cache"):
        train(smoke(tmp_path / "r", f"reference.cache={tmp_path / 'bad'}"))


def test_an_fpo_cache_also_serves_dpo(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    sae = saved_random_sae(tmp_path / "sae")
    cache_run(smoke(tmp_path / "c", *FPO, f"sae.path={sae}", f"reference.cache={cache}"))
    train(smoke(tmp_path / "live"))
    monkeypatch.setattr(loading, "frozen_copy", lambda *a: pytest.fail("reference copied"))
    monkeypatch.setattr(step, "reference_forward", lambda *a, **k: pytest.fail("reference run"))
    train(smoke(tmp_path / "cached", f"reference.cache={cache}", "reference.build_missing=false"))
    live, cached = losses(tmp_path / "live"), losses(tmp_path / "cached")
    assert [m.get("loss", m.get("eval/loss")) for m in live] == pytest.approx(
        [m.get("loss", m.get("eval/loss")) for m in cached], rel=1e-4
    )


def test_fpo_top_k_cache_equals_the_full_cache_for_the_reference_index_set(tmp_path):
    sae = saved_random_sae(tmp_path / "sae")
    args = (*FPO, f"sae.path={sae}", "method.index_set=reference")
    train(smoke(tmp_path / "full", *args, f"reference.cache={tmp_path / 'c1'}"))
    train(smoke(tmp_path / "topk", *args, f"reference.cache={tmp_path / 'c2'}", "reference.feature_top_k=8"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "topk")
    assert [m.get("loss", m.get("eval/loss")) for m in a] == pytest.approx(
        [m.get("loss", m.get("eval/loss")) for m in b], rel=1e-6
    )
    full = split_file(tmp_path / "c1", "train").stat().st_size
    assert split_file(tmp_path / "c2", "train").stat().st_size < full


def test_reference_settings_that_cannot_act_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="full distribution"):
        smoke(tmp_path, "method.name=tdpo1", "reference.cache=x")
    with pytest.raises(ConfigError, match="uses no reference model"):
        smoke(tmp_path, "method.name=simpo", "reference.cache=x")
    with pytest.raises(ConfigError, match="no effect without reference.cache"):
        smoke(tmp_path, "reference.feature_top_k=8")
    with pytest.raises(ConfigError, match="index_set=reference"):
        smoke(tmp_path, *FPO, "sae.path=x", "reference.cache=x", "reference.feature_top_k=8", "method.k=9")


def test_sparse_code_and_file_round_trip(tmp_path):
    code = torch.tensor([0.0, 3.0, 0.0, 1.0, 2.0, 0.0])
    idx, val = sparse_code(code, None)
    assert idx.tolist() == [1, 3, 4] and val.tolist() == [3.0, 1.0, 2.0]
    idx, val = sparse_code(code, 2)
    assert sorted(idx.tolist()) == [1, 4]
    idx, val = sparse_code(torch.tensor([0.0, 5.0, 0.0]), 2)  # a zero is never stored
    assert idx.tolist() == [1]

    path = tmp_path / "train.safetensors"
    pair = TokenizedPair([1, 2], [3, 4, 5], [6])
    logps = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5])]
    write_split(path, {"format": "x", "split": "train"}, [pair_key(pair)], logps)
    assert read_header(path)["split"] == "train"
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert tensors["logp_offsets"].tolist() == [0, 3, 4]
    assert tensors["logps"].tolist() == [-1.0, -2.0, -3.0, -0.5]
    assert pair_key(pair) != pair_key(TokenizedPair([1, 2], [6], [3, 4, 5]))  # order matters


def _kto_split(folder: Path, split: str, pairs: list[TokenizedPair], version: int, per_pair: int = 2) -> None:
    """A split file of ``pairs`` holding ``per_pair`` mismatched rows per pair (2: the current layout, 1: the
    old one, the chosen row's only) whose log-probs are −(10 · row + token + 1)."""
    from sparsealign.refcache.identity import FORMAT
    from sparsealign.refcache.store import mismatched_keys

    logps = [torch.zeros(len(r)) for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    keys = [k for p in pairs for k in mismatched_keys(p)[:per_pair]]
    rows = [r for p in pairs for r in p.mismatched_ids[:per_pair]]
    values = [-(10.0 * n + torch.arange(len(r)) + 1) for n, r in enumerate(rows)]
    header = {"format": FORMAT, "version": version, "split": split}
    write_split(split_file(folder, split), header, [pair_key(p) for p in pairs], logps, None, (keys, values))


def test_the_cache_serves_two_mismatched_rows_per_pair(tmp_path):
    """Stored rows 2i, 2i+1: pair i's chosen and rejected rows. Served as collated: the chosen rows' first."""
    from sparsealign.data.collate import collate_mismatched
    from sparsealign.data.mismatched import with_mismatched_responses
    from sparsealign.refcache.identity import FORMAT, VERSION
    from sparsealign.refcache.store import ReferenceCache

    pairs = with_mismatched_responses([TokenizedPair([1, 2], [3], [4]), TokenizedPair([5], [6, 7], [8])], 8)
    assert [p.mismatched_ids for p in pairs] == [([6, 7], [8]), ([4], [3])]
    for split in ("train", "eval"):
        _kto_split(tmp_path, split, pairs, VERSION)
    cache = ReferenceCache(tmp_path, {"format": FORMAT, "version": VERSION})
    rows = collate_mismatched(pairs, pad_id=0)
    out = cache.mismatched_outputs(pairs, rows)
    # stored: 0 = pair 0's chosen row [6, 7], 1 = its rejected row [8], 2 = pair 1's chosen row [4], 3 = [3]
    assert out.logps.tolist() == [[-1.0, -2.0], [-21.0, 0.0], [-11.0, 0.0], [-31.0, 0.0]]
    assert torch.equal(out.mask, rows.response_mask)
    assert cache.missing(pairs) == 0
    moved = [pairs[0], dataclasses.replace(pairs[1], mismatched_ids=([4], [8]))]  # its rejected row changed
    assert cache.missing(moved) == 1
    with pytest.raises(CacheError, match="other mismatched responses"):
        cache.mismatched_outputs(moved, collate_mismatched(moved, pad_id=0))


def test_a_cache_of_the_old_layout_is_refused_with_how_to_rebuild_it(tmp_path):
    """Format version 1 held one mismatched row per pair (a chosen response); such a file is refused before
    anything is read from it, however well the rest of its header matches."""
    from sparsealign.data.mismatched import with_mismatched_responses
    from sparsealign.refcache.identity import FORMAT, VERSION
    from sparsealign.refcache.store import ReferenceCache

    assert VERSION == 2
    pairs = with_mismatched_responses([TokenizedPair([1, 2], [3], [4]), TokenizedPair([5], [6, 7], [8])], 8)
    for split in ("train", "eval"):
        _kto_split(tmp_path, split, pairs, version=1, per_pair=1)
    with pytest.raises(CacheError, match=r"format version 1; .* reads version 2 only\. Rebuild it"):
        ReferenceCache(tmp_path, {"format": FORMAT, "version": VERSION})


def test_training_refuses_a_kto_cache_of_the_old_layout(tmp_path):
    """A KTO cache rewritten into the old layout (header version 1, one mismatched row per pair) is refused
    by training with the rebuild command; `sparsealign cache --force` rebuilds it for this run."""
    from safetensors.torch import load_file, save_file

    from sparsealign.refcache.store import HEADER_KEY

    cache = tmp_path / "cache"
    kto = (
        "method.name=kto",
        "train.max_steps=1",
        f"reference.cache={cache}",
        "reference.build_missing=false",
    )
    cache_run(smoke(tmp_path / "c", *kto))
    for split in ("train", "eval"):
        path = split_file(cache, split)
        header, tensors = read_header(path), load_file(str(path))
        lengths = tensors["mismatched_offsets"].diff()
        keep = torch.arange(0, len(lengths), 2)  # the chosen rows' rows only
        spans = [tensors["mismatched_logps"][int(a) : int(a) + int(n)] for a, n in
                 zip(tensors["mismatched_offsets"][keep], lengths[keep], strict=True)]  # fmt: skip
        tensors["mismatched_keys"] = tensors["mismatched_keys"][keep]
        tensors["mismatched_offsets"] = torch.cat(
            [torch.zeros(1, dtype=torch.int64), lengths[keep].cumsum(0)]
        )
        tensors["mismatched_logps"] = torch.cat(spans)
        save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps({**header, "version": 1})})
    with pytest.raises(CacheError, match=r"cache format version 1.*sparsealign cache --force"):
        train(smoke(tmp_path / "r", *kto))
    assert cache_run(smoke(tmp_path / "c", *kto), force=True) == (cache, True)
    assert read_header(split_file(cache, "train"))["version"] == 2
    assert cache_run(smoke(tmp_path / "c", *kto)) == (cache, False)  # up to date, both rows of every pair


def test_mismatch_description_and_lora_digest():
    found = {"model": {"weights": "a", "dtype": "float32"}, "pairs": 3, "sae": {"layer": 1}}
    run = {"model": {"weights": "b", "dtype": "float32"}, "pairs": 9, "sae": None}
    assert describe_mismatch(found, run) == ["model.weights: cache 'a', run 'b'"]  # pairs is informational

    from sparsealign.config import LoraConfig, ModelConfig

    plain, _ = loading.load_model(ModelConfig(name="tiny-random-llama"), seed=3)
    digest = weights_digest(plain)
    lora = loading.load_bundle(ModelConfig(name="tiny-random-llama", lora=LoraConfig(r=4)), seed=3)
    from sparsealign.models.logprobs import unwrap_causal_lm

    assert weights_digest(unwrap_causal_lm(lora.policy)) == digest  # the reference of a LoRA run
    with torch.no_grad():
        next(plain.parameters()).add_(1e-3)
    assert weights_digest(plain) != digest


def test_sae_identity_names_site_layer_and_pooling_positions():
    from sparsealign.refcache.identity import sae_identity
    from sparsealign.sae import SparseAutoencoder
    from sparsealign.sae.probe import FeatureProbe

    sae = SparseAutoencoder(64, 96, "relu")
    response = sae_identity(FeatureProbe(sae, "resid_post", 1, "response"))
    predicting = sae_identity(FeatureProbe(sae, "resid_post", 1, "predicting"))
    assert (
        response["site"] == "resid_post"
        and response["layer"] == 1
        and response["weights"] == weights_digest(sae)
    )
    assert describe_mismatch({"sae": response}, {"sae": predicting}) == [
        "sae.positions: cache 'response', run 'predicting'"
    ]
    assert sae_identity(None) is None


def test_cache_command(tmp_path, capsys):
    args = [
        "cache",
        str(SMOKE),
        f"output_dir={tmp_path / 'run'}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"reference.cache={tmp_path / 'run' / 'reference-cache'}" in out and out.startswith("Wrote")
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("Up to date")
    assert main([*args, "method.name=sparsepo"]) == 2
    assert "does not train from a reference cache" in capsys.readouterr().err


def test_two_processes_build_the_same_cache_as_one(tmp_path):
    """`accelerate launch` with 2 CPU processes shares the pairs out and the main process writes one file per
    split, equal to the one-process build (KTO: with the mismatched responses)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = [
        "cache",
        str(SMOKE),
        "method.name=kto",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "reference.batch_size=4",
        "train.progress=false",
    ]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    for name, prefix in (("one", [sys.executable, "-m"]), ("two", launch)):
        out = tmp_path / name
        cmd = [*prefix, "sparsealign.cli", *args, f"output_dir={out}", f"reference.cache={out}/cache"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2 computes 23 of 46 pairs" in done.stderr  # the main process's share
    for split in ("train", "eval"):
        one = load_file(str(split_file(tmp_path / "one/cache", split)))
        two = load_file(str(split_file(tmp_path / "two/cache", split)))
        assert sorted(one) == sorted(two) and "mismatched_logps" in one
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


def test_fpo_pool_positions_reach_the_probe_and_key_the_cache(tmp_path):
    """method.pool_positions=predicting (the released FPO code's positions) pools at the predicting positions,
    trains, and a cache built for one pooling is refused for the other (its features differ)."""
    sae = saved_random_sae(tmp_path / "sae")
    cache = tmp_path / "cache"
    predicting = smoke(
        tmp_path / "p",
        *FPO,
        f"sae.path={sae}",
        "method.pool_positions=predicting",
        f"reference.cache={cache}",
    )
    assert predicting.method.pool_positions == "predicting"
    result = train(predicting)
    assert result.steps > 0 and math.isfinite(result.final_metrics["loss"])
    header = read_header(split_file(cache, "train"))
    assert "predicting" in json.dumps(header)
    with pytest.raises(CacheError, match="positions"):
        train(
            smoke(
                tmp_path / "r",
                *FPO,
                f"sae.path={sae}",
                f"reference.cache={cache}",
                "reference.build_missing=false",
            )
        )
