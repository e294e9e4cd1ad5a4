"""Model loading options beyond the defaults: attention kernel, quantised loading (refused on CPU), a
separate tokenizer, a different reference model (reference.model), and LoRA adapters of built-ins that
``AutoPeftModelForCausalLM`` loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsealign.config import LoraConfig, ModelConfig, ReferenceConfig
from sparsealign.errors import ModelError
from sparsealign.models import loading
from sparsealign.models.digest import weights_digest
from sparsealign.models.loading import load_bundle, load_model, load_tokenizer, save_final
from sparsealign.recipes.load import load_config
from sparsealign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with sparsealign's cache (saved built-ins) in the test's own folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(["The film was", "Bad"], return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained was called before the configuration was refused")

    monkeypatch.setattr(loading, "_from_pretrained", fail)


# --------------------------------------------------------------------------------------------------
# Quantised loading and attention kernels.


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantised_loading_fails_fast_on_cpu(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_download(monkeypatch)
    cfg = ModelConfig(name="someone/some-model", lora=LoraConfig(r=4), **{flag: True})
    with pytest.raises(ModelError) as error:
        load_model(cfg, device="cpu")
    message = str(error.value)
    assert f"model.{flag} needs" in message and "CUDA" in message
    if torch.cuda.is_available() is False:
        assert "this run is on the CPU" in message


def test_quantised_loading_needs_lora_and_one_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_download(monkeypatch)
    with pytest.raises(ModelError, match="set model.lora"):
        load_model(ModelConfig(name="someone/some-model", load_in_4bit=True))
    with pytest.raises(ModelError, match="not both"):
        load_model(ModelConfig(name="x/y", load_in_4bit=True, load_in_8bit=True, lora=LoraConfig()))


def test_flash_attention_refused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_download(monkeypatch)
    with pytest.raises(ModelError, match="flash_attention_2 needs"):
        load_model(
            ModelConfig(name="someone/some-model", attn_implementation="flash_attention_2"), device="cpu"
        )


def test_attention_kernels_agree() -> None:
    eager, tokenizer = load_model(ModelConfig(attn_implementation="eager"), seed=3)
    sdpa, _ = load_model(ModelConfig(attn_implementation="sdpa"), seed=3)
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(eager, batch), _logits(sdpa, batch), atol=1e-5, rtol=1e-5)


def test_attention_kernel_from_a_folder(tmp_path: Path) -> None:
    model, tokenizer = load_model(ModelConfig(), seed=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(ModelConfig(name=str(tmp_path / "m"), attn_implementation="eager"))
    assert loaded.config._attn_implementation == "eager"
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# A separate tokenizer.


def test_separate_tokenizer() -> None:
    cfg = ModelConfig(name="tiny-random-llama", tokenizer="tiny-random-gpt2")
    model, tokenizer = load_model(cfg)
    assert tokenizer.eos_token == "<|endoftext|>" and len(tokenizer) == 257
    assert load_tokenizer(cfg).get_vocab() == tokenizer.get_vocab()
    assert model.config.vocab_size == 258  # the model is still the Llama


def test_separate_tokenizer_too_big_is_refused(tmp_path: Path) -> None:
    _, tokenizer = load_model(ModelConfig(name="tiny-random-llama"))
    tokenizer.add_tokens([f"<extra{i}>" for i in range(10)])
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ModelError, match="do not belong together"):
        load_model(ModelConfig(name="tiny-random-gpt2", tokenizer=str(tmp_path / "tok")))


# --------------------------------------------------------------------------------------------------
# LoRA adapters of built-ins load with AutoPeftModelForCausalLM.


def test_lora_adapter_of_builtin_loads_with_auto_peft(tmp_path: Path, _isolated: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    bundle = load_bundle(ModelConfig(lora=LoraConfig(r=4)), seed=5)
    with torch.no_grad():  # B starts at zero; make the adapter change the outputs
        for name, parameter in bundle.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    final = save_final(bundle, tmp_path / "final")
    recorded = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, _ = load_model(ModelConfig(), seed=5)
    assert recorded == str(_isolated / "models" / "tiny-random-llama" / weights_digest(base)[:16])

    loaded = AutoPeftModelForCausalLM.from_pretrained(final)
    batch = _batch(bundle.tokenizer)
    bundle.policy.eval()
    expected = _logits(bundle.policy, batch)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, _logits(base, batch), atol=1e-3)  # the adapter mattered

    again = load_bundle(ModelConfig(lora=LoraConfig(r=4)), seed=5)  # the saved base is reused
    assert again.policy.peft_config["default"].base_model_name_or_path == recorded
    other = load_bundle(ModelConfig(lora=LoraConfig(r=4)), seed=6)  # another seed, another base
    assert other.policy.peft_config["default"].base_model_name_or_path != recorded


def test_lora_adapter_of_folder_records_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model(ModelConfig(), seed=2)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    bundle = load_bundle(ModelConfig(name="./base", lora=LoraConfig(r=4)))
    assert bundle.policy.peft_config["default"].base_model_name_or_path == str((tmp_path / "base").resolve())


# --------------------------------------------------------------------------------------------------
# A different reference model.


@pytest.fixture
def other_reference(tmp_path: Path) -> Path:
    """tiny-random-llama drawn from another seed, saved as a folder: same tokenizer, other weights."""
    model, tokenizer = load_model(ModelConfig(), seed=1)
    model.save_pretrained(tmp_path / "reference")
    tokenizer.save_pretrained(tmp_path / "reference")
    return tmp_path / "reference"


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)])
def test_reference_model_is_the_other_model(other_reference: Path, lora: LoraConfig | None) -> None:
    expected, _ = load_model(ModelConfig(), seed=1)
    cfg = ModelConfig(lora=lora)
    bundle = load_bundle(cfg, seed=42, reference=ReferenceConfig(model=str(other_reference)))
    assert bundle.reference is not None  # loaded up front (need_reference), not the disabled adapter
    with bundle.reference_model() as reference:
        assert weights_digest(reference) == weights_digest(expected)
        assert not any(p.requires_grad for p in reference.parameters())
    assert weights_digest(bundle.policy) == weights_digest(load_model(ModelConfig(), seed=42)[0])
    assert bundle.reference_digest() == weights_digest(expected)


def test_reference_model_loads_lazily_without_need(other_reference: Path) -> None:
    bundle = load_bundle(
        ModelConfig(), seed=42, need_reference=False, reference=ReferenceConfig(model=str(other_reference))
    )
    assert bundle.reference is None
    digest = bundle.reference_digest()  # digested, not kept
    assert bundle.reference is None
    with bundle.reference_model() as reference:  # the untrained policy is not the reference here
        assert weights_digest(reference) == digest
    assert bundle.reference is not None


def test_reference_model_must_share_the_vocabulary() -> None:
    with pytest.raises(ModelError, match="different tokenizer than the policy"):
        load_bundle(
            ModelConfig(name="tiny-random-llama"), reference=ReferenceConfig(model="tiny-random-gpt2")
        )


def _smoke(tmp_path: Path, *overrides: str):
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
    ]
    return load_config(SMOKE, base + list(overrides))


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_trains_against_a_different_reference(tmp_path: Path, other_reference: Path, lora: bool) -> None:
    extra = ["model.lora.r=4"] if lora else []
    result = train(
        _smoke(
            tmp_path, "train.max_steps=3", "train.eval_every=0", f"reference.model={other_reference}", *extra
        )
    )
    losses = _losses(result.output_dir)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # With the policy as its own reference the first DPO loss is log 2; another reference moves it.
    assert abs(losses[0] - math.log(2)) > 1e-3
    assert losses[-1] < losses[0]


def test_reference_cache_records_the_reference_model(tmp_path: Path, other_reference: Path) -> None:
    from sparsealign.refcache.identity import run_identity

    cfg = _smoke(tmp_path, f"reference.model={other_reference}")
    bundle = load_bundle(cfg.model, cfg.train.seed, need_reference=False, reference=cfg.reference)
    identity = run_identity(cfg, bundle, digest="policy-digest-ignored")
    reference, _ = load_model(ModelConfig(), seed=1)
    assert identity["model"]["name"] == str(other_reference)
    assert identity["model"]["weights"] == weights_digest(reference)

    plain = load_bundle(cfg.model, cfg.train.seed, need_reference=False)
    with pytest.raises(ModelError, match="pass reference=cfg.reference"):
        run_identity(cfg, plain)
