"""The IMDB main job's parts: seeded sampling, on-policy pairs and their cache, rewards, the final report.

Everything runs offline on tiny random models with a fake reward; the real sklearn sentiment reward is
exercised by one slow test (``SPARSEALIGN_SLOW=1``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import build_bpe_tokenizer
from sparsealign.config import Config, EvalConfig, PairsConfig, RewardConfig
from sparsealign.data import imdb
from sparsealign.data.sources import SourceData, SourceRequest, get_source
from sparsealign.eval.report import evaluate_generations, sequence_kl
from sparsealign.models import generate
from sparsealign.models.builtins import build_tiny_llama
from sparsealign.models.generate import decode_continuation, sample_continuations
from sparsealign.rewards import RewardError, RewardModel, load_reward

PROMPTS = ["I loved this movie", "The plot was", "What a terrible waste of time and", "Honestly"]


class CharSumReward:
    """A cheap deterministic reward with many distinct values and occasional ties."""

    name = "char-sum-mod-7"

    def score(self, texts: list[str]) -> list[float]:
        return [float(sum(map(ord, t)) % 7) for t in texts]


class ConstantReward:
    name = "constant"

    def score(self, texts: list[str]) -> list[float]:
        return [1.0] * len(texts)


class Bundle:
    """The slice of the model bundle the source and the report use."""

    def __init__(self, policy, reference, tokenizer) -> None:
        self.policy = policy
        self.reference = reference
        self.tokenizer = tokenizer

    @contextmanager
    def reference_model(self):
        yield self.reference


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = build_tiny_llama(0)
    return model.eval(), tokenizer


def perturbed(model, scale: float = 0.5, seed: int = 1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return other


def encode(tokenizer, prompts):
    return [tokenizer(p)["input_ids"] for p in prompts]


# ----------------------------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_and_restores_mode(llama):
    model, tokenizer = llama
    ids = encode(tokenizer, PROMPTS)
    model.train()
    rng_before = torch.get_rng_state()
    a = sample_continuations(model, tokenizer, ids, 3, 10, temperature=1.0, top_p=1.0, seed=7, batch_size=2)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG stream is untouched
    model.eval()
    b = sample_continuations(model, tokenizer, ids, 3, 10, temperature=1.0, top_p=1.0, seed=7, batch_size=2)
    c = sample_continuations(model, tokenizer, ids, 3, 10, temperature=1.0, top_p=1.0, seed=8, batch_size=2)
    assert not model.training
    assert a == b and a != c
    assert len(a) == len(PROMPTS) and all(len(per) == 3 for per in a)
    assert all(0 < len(s) <= 10 for per in a for s in per)
    assert a[0][0] != a[0][1]  # samples of one prompt differ


def test_greedy_left_padded_batch_matches_one_by_one(llama):
    model, tokenizer = llama
    ids = encode(tokenizer, PROMPTS)
    batched = sample_continuations(model, tokenizer, ids, 2, 8, temperature=0.0, seed=0, batch_size=4)
    single = sample_continuations(model, tokenizer, ids, 1, 8, temperature=0.0, seed=0, batch_size=1)
    assert [per[0] for per in batched] == [per[0] for per in single]
    assert all(per[0] == per[1] for per in batched)


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_eos_is_kept_and_nothing_follows_it(llama, pad_is_eos):
    if pad_is_eos:
        model, tokenizer = copy.deepcopy(llama[0]), llama[1]
    else:  # pad (0) differs from EOS (2): padding after an early EOS must not leak into the samples
        tokenizer = build_bpe_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (pad == eos) == pad_is_eos
    head = torch.nn.Linear(64, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos] = 4.0  # EOS is likely but not certain at every step
    model.lm_head = head
    out = sample_continuations(model, tokenizer, encode(tokenizer, PROMPTS), 4, 12, seed=3, batch_size=4)
    flat = [s for per in out for s in per]
    assert any(len(s) < 12 for s in flat)
    for s in flat:
        assert eos not in s[:-1]
        assert len(s) == 12 or s[-1] == eos
        if s and s[-1] == eos:
            assert len(s) >= 1
        if not pad_is_eos and len(s) < 12:
            assert s[-1] == eos and pad not in s[-1:]


def test_decode_continuation_is_the_text_suffix(llama):
    _, tokenizer = llama
    prompt = tokenizer("The movie was")["input_ids"]
    response = tokenizer(" really good", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert decode_continuation(tokenizer, prompt, response) == " really good"


# ------------------------------------------------------------------------------------------------ pairs


def small_config(**pairs) -> Config:
    config = Config()
    config.model.name = "tiny-random-llama"
    values = {
        "num_prompts": 6,
        "eval_prompts": 3,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "batch_size": 4,
    }
    config.pairs = dataclasses.replace(PairsConfig(), **{**values, **pairs})
    config.data.source = "imdb"
    return config


def test_make_pairs_orders_by_reward_and_counts_ties(llama):
    model, tokenizer = llama
    reward = CharSumReward()
    cfg = small_config().pairs
    pairs, ties = imdb.make_pairs(model, tokenizer, reward, PROMPTS * 3, cfg, seed=0)
    assert len(pairs) + ties == len(PROMPTS) * 3 and len(pairs) > 0
    for ex in pairs:
        chosen, rejected = reward.score([ex.prompt + ex.chosen, ex.prompt + ex.rejected])
        assert chosen == ex.meta["chosen_reward"] and rejected == ex.meta["rejected_reward"]
        assert chosen > rejected
        assert ex.meta["prompt_ids"] == tokenizer(ex.prompt)["input_ids"]
        for key, text in (("chosen_ids", ex.chosen), ("rejected_ids", ex.rejected)):
            ids = ex.meta[key]
            assert 0 < len(ids) <= cfg.max_new_tokens
            assert tokenizer.eos_token_id not in ids[:-1]
            assert decode_continuation(tokenizer, ex.meta["prompt_ids"], ids) == text

    none, all_ties = imdb.make_pairs(model, tokenizer, ConstantReward(), PROMPTS, cfg, seed=0)
    assert none == [] and all_ties == len(PROMPTS)
    gap = dataclasses.replace(cfg, min_reward_gap=100.0)
    none, all_ties = imdb.make_pairs(model, tokenizer, reward, PROMPTS, gap, seed=0)
    assert none == [] and all_ties == len(PROMPTS)


def test_heldout_prompts_are_disjoint_and_deterministic():
    train, heldout = imdb.split_prompts(300, 60, 8, seed=0)
    assert len(train) == 300 and len(heldout) == 60
    assert len(set(train)) == 300 and len(set(heldout)) == 60
    assert not set(train) & set(heldout)
    assert all(len(p.split()) == 8 and "<br" not in p for p in train + heldout)
    assert imdb.split_prompts(300, 60, 8, seed=0) == (train, heldout)
    assert imdb.split_prompts(300, 60, 8, seed=1)[0] != train
    # The held-out pool is fixed by the seed: asking for fewer training prompts never moves them into it.
    more_train, _ = imdb.split_prompts(600, 60, 8, seed=0)
    assert not set(more_train) & set(heldout)


def test_source_caches_pairs(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path))
    model, tokenizer = llama
    config = small_config()
    context = {"bundle": Bundle(model, model, tokenizer), "reward": CharSumReward(), "model_id": "seed-0"}
    source = get_source("imdb")
    first = source(SourceRequest(config, context))
    assert isinstance(first, SourceData)
    assert 0 < len(first.train) <= 6 and len(first.eval_prompts) == 3
    assert {ex.prompt for ex in first.train} <= set(imdb.split_prompts(6, 3, 8, 0)[0])
    assert not {ex.prompt for ex in first.eval} - set(first.eval_prompts)
    files = list((tmp_path / "pairs").glob("imdb-*.jsonl"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(generate, "sample_continuations", fail)
    start = time.perf_counter()
    second = source(SourceRequest(config, {"reward": CharSumReward(), "model_id": "seed-0"}))
    assert time.perf_counter() - start < 5
    assert second == first


def test_cache_key_covers_every_pairs_field():
    reward = CharSumReward()
    base = small_config()
    key = imdb.pairs_cache_key(base, reward, "id")
    assert key == imdb.pairs_cache_key(small_config(), reward, "id")
    keys = {key}
    for f in dataclasses.fields(PairsConfig):
        value = getattr(base.pairs, f.name)
        changed = small_config(**{f.name: value + 1 if f.type in ("int", int) else value + 0.5})
        keys.add(imdb.pairs_cache_key(changed, reward, "id"))
    assert len(keys) == len(dataclasses.fields(PairsConfig)) + 1
    assert imdb.pairs_cache_key(base, reward, "other-weights") != key
    assert imdb.pairs_cache_key(base, ConstantReward(), "id") != key
    other_model = small_config()
    other_model.model.name = "tiny-random-gpt2"
    assert imdb.pairs_cache_key(other_model, reward, "id") != key


# ---------------------------------------------------------------------------------------------- KL, report


def test_sequence_kl_zero_for_reference_positive_for_perturbed(llama):
    model, tokenizer = llama
    ids = encode(tokenizer, PROMPTS)
    samples = sample_continuations(model, tokenizer, ids, 2, 10, seed=0)
    prompts = [p for p in ids for _ in range(2)]
    flat = [s for per in samples for s in per]
    assert sequence_kl(model, model, prompts, flat, tokenizer.pad_token_id, batch_size=3) == [0.0] * len(flat)

    policy = perturbed(model)
    policy_samples = sample_continuations(policy, tokenizer, ids * 4, 4, 10, seed=0)
    prompts = [p for p in ids * 4 for _ in range(4)]
    flat = [s for per in policy_samples for s in per]
    kls = sequence_kl(policy, model, prompts, flat, tokenizer.pad_token_id)
    assert sum(kls) / len(kls) > 0


def test_report_summary(llama, tmp_path, capsys):
    model, tokenizer = llama
    cfg = EvalConfig(generate=True, max_new_tokens=8, samples_per_prompt=2)
    same = evaluate_generations(
        Bundle(model, model, tokenizer), CharSumReward(), PROMPTS, cfg, 0, tmp_path / "a"
    )
    assert same["reference"]["kl_mean"] == 0.0 and same["policy"]["kl_mean"] == 0.0
    assert same["reference"]["reward_mean"] == same["policy"]["reward_mean"] and same["reward_delta"] == 0.0

    summary = evaluate_generations(
        Bundle(perturbed(model), model, tokenizer), CharSumReward(), PROMPTS, cfg, 0, tmp_path / "b"
    )
    assert set(summary) == {"reference", "policy", "reward_delta", "config"}
    for name in ("reference", "policy"):
        stats = summary[name]
        assert {
            "reward_mean",
            "reward_std",
            "kl_mean",
            "length_mean",
            "positive_fraction",
            "num_samples",
        } <= set(stats)
        assert stats["num_samples"] == len(PROMPTS) * 2
    assert summary["reference"]["kl_mean"] == 0.0
    assert summary["policy"]["kl_mean"] != 0.0
    on_disk = json.loads((tmp_path / "b" / "report" / "summary.json").read_text())
    assert on_disk == summary
    rows = [
        json.loads(line) for line in (tmp_path / "b" / "report" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 * len(PROMPTS) * 2
    assert {"prompt", "model", "text", "reward", "kl"} <= set(rows[0])
    assert all(r["kl"] == 0.0 for r in rows if r["model"] == "reference")
    table = capsys.readouterr().out
    assert "reference" in table and "policy" in table and "KL to ref" in table


# -------------------------------------------------------------------------------------------------- rewards


def test_classifier_reward_is_log_odds_and_missing_model_is_a_clear_error(llama, tmp_path):
    from sparsealign.rewards.sentiment import ClassifierReward
    from tiny_models import save_tiny_classifier

    _, tokenizer = llama
    classifier = save_tiny_classifier(tmp_path / "clf", tokenizer, num_labels=3)
    reward = load_reward(RewardConfig(name=str(tmp_path / "clf"), positive_label=2, batch_size=2))
    assert isinstance(reward, RewardModel)
    texts = ["great movie", "bad", "a film with a plot"]
    with torch.no_grad():
        logits = classifier(**tokenizer(texts[:1], return_tensors="pt")).logits[0]
    expected = float(logits[2] - torch.logsumexp(logits[:2], 0))
    scores = reward.score(texts)
    assert len(scores) == 3 and abs(scores[0] - expected) < 1e-4

    with pytest.raises(RewardError, match="reward.name=DIR"):
        ClassifierReward(str(tmp_path / "does-not-exist"))
    with pytest.raises(RewardError, match="positive_label"):
        ClassifierReward(str(tmp_path / "clf"), positive_label=5)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SPARSEALIGN_SLOW") != "1", reason="fits the sklearn classifier; SPARSEALIGN_SLOW=1"
)
def test_imdb_sentiment_reward(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path))
    start = time.perf_counter()
    reward = load_reward(RewardConfig())
    fit_time = time.perf_counter() - start
    assert reward.accuracy >= 0.85 and fit_time < 60
    good, bad = reward.score(
        ["This movie was wonderful, I loved it.", "A boring, awful waste of time.<br />"]
    )
    assert good > 0 > bad
    start = time.perf_counter()
    again = load_reward(RewardConfig())
    assert time.perf_counter() - start < 5
    assert again.score(["This movie was wonderful"]) == reward.score(["This movie was wonderful"])
    print(f"held-out accuracy {reward.accuracy:.4f}, fitted in {fit_time:.1f} s")


def test_lora_policy_and_disabled_adapter_reference(llama):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = llama
    base = copy.deepcopy(model)
    ids = encode(tokenizer, PROMPTS)
    expected = sample_continuations(base, tokenizer, ids, 2, 8, seed=5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(copy.deepcopy(model), lora)
    policy.train()
    with policy.disable_adapter():
        assert sample_continuations(policy, tokenizer, ids, 2, 8, seed=5) == expected
    assert policy.training

    @contextmanager
    def reference():  # what the bundle's reference_model() does for LoRA
        with policy.disable_adapter():
            yield policy

    samples = sample_continuations(policy, tokenizer, ids, 2, 8, seed=5)
    assert samples != expected
    prompts = [p for p in ids for _ in range(2)]
    flat = [s for per in samples for s in per]
    kls = sequence_kl(policy, reference, prompts, flat, tokenizer.pad_token_id)
    assert any(k != 0.0 for k in kls)
    same = sequence_kl(base, reference, prompts, flat, tokenizer.pad_token_id)
    assert same == [0.0] * len(flat)
