"""Loading policy, reference and tokenizer from a built-in name, a local folder or a hub id; saving the result.

``model.name`` is resolved in this order:

1. a built-in (:data:`sparsealign.models.builtins.BUILTIN_MODELS`): ``tiny-random-llama``,
   ``tiny-random-gpt2`` (random, from the seed) or ``smollm2-135m-instruct`` (obtained once, cached);
2. an existing local path, or anything that looks like one (starts with ``/``, ``.`` or ``~``): a folder
   written by ``save_pretrained`` (``config.json`` + weights + tokenizer files);
3. otherwise a Hugging Face hub id (``owner/name``), at ``model.revision``. When the hub is unreachable
   (``HF_HUB_OFFLINE=1`` or no network) only the local Hugging Face cache is used.

Every failure is a :class:`ModelError` whose message says what to download and where to put it.

With ``model.lora`` set the policy is a PEFT model and the reference is the same network with the adapter
switched off (:meth:`ModelBundle.reference_model`); otherwise the reference is a frozen copy of the policy.
With ``reference.model`` set the reference is that other model instead (it must share the tokenizer).

Options beyond CPU: ``model.attn_implementation`` (passed to transformers), ``model.load_in_4bit`` /
``model.load_in_8bit`` (QLoRA through bitsandbytes; checked before anything is downloaded: they need CUDA,
the bitsandbytes package and ``model.lora``), ``model.tokenizer`` (a separate tokenizer).

``model.revision`` applies to every load of ``model.name`` (weights, tokenizer, the base a LoRA adapter
records); ``reference.revision`` to ``reference.model``. It does not apply to ``model.tokenizer``, the reward
classifier or SAE repositories, which are other repositories loaded at their default revision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from sparsealign.errors import ModelError
from sparsealign.hub import hub_offline_flag, hub_reachable
from sparsealign.io import atomic_folder
from sparsealign.models.builtins import BUILTIN_MODELS, saved_random_builtin
from sparsealign.models.digest import weights_digest
from sparsealign.models.dtype import resolve_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from sparsealign.config import LoraConfig, ModelConfig, ReferenceConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ModelBundle",
    "ModelError",
    "apply_lora",
    "disable_dropout",
    "enable_gradient_checkpointing",
    "load_bundle",
    "load_model",
    "load_reference",
    "load_tokenizer",
    "save_final",
]


# --------------------------------------------------------------------------------------------------
# Resolving a name.

Kind = Literal["builtin", "local", "hub"]


def _kind(name: str) -> Kind:
    if name in BUILTIN_MODELS:
        return "builtin"
    if Path(name).expanduser().exists():
        return "local"
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
    return "local" if looks_like_path else "hub"


def _check_local_folder(name: str) -> str:
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(
            f"Model folder '{path}' does not exist. Give model.name as a folder written by save_pretrained, "
            f"a hub id, or a built-in ({', '.join(BUILTIN_MODELS)})."
        )
    if not path.is_dir():
        raise ModelError(
            f"Model path '{path}' is a file; model.name must be a folder written by save_pretrained."
        )
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = (
                " It holds a PEFT adapter: pass its merged/ subfolder (written with model.merge_final=true), "
                "or the base model with the adapter loaded through peft.PeftModel.from_pretrained."
            )
        raise ModelError(
            f"Model folder '{path}' has no config.json, so it is not a model saved with save_pretrained "
            f"(config.json + *.safetensors + tokenizer files).{hint}"
        )
    return str(path.resolve())  # absolute, so that a LoRA adapter's recorded base loads from anywhere


def _hub_unreachable(name: str) -> ModelError:
    why = "HF_HUB_OFFLINE is set" if hub_offline_flag() else "no network connection to it"
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1, cutoff=0.6)
    suggestion = f" Did you mean the built-in '{close[0]}'?" if close else ""
    builtins = "" if "/" in name else f" (built-in models: {', '.join(BUILTIN_MODELS)})"
    return ModelError(
        f"Cannot load '{name}'{builtins}: it is not a built-in or a local folder, the Hugging Face hub is "
        f"unreachable ({why}), and it is not in the local Hugging Face cache.{suggestion} Download the model "
        f"with `huggingface-cli download {name} --local-dir DIR` (or `hf download {name} --local-dir DIR`) on "
        f"a machine with network, copy DIR here and pass model.name=DIR."
    )


def _from_pretrained(
    loader: Any,
    source: str,
    kind: Kind,
    cfg: ModelConfig,
    what: str,
    revision: str | None = None,
    **kwargs: Any,
) -> Any:
    """``loader.from_pretrained`` with the hub switched to cache-only when unreachable; errors as ModelError."""
    if kind == "hub":
        offline = not hub_reachable()
        kwargs.update(revision=revision, local_files_only=offline)
    else:
        offline = False
    if cfg.trust_remote_code:
        logger.warning(
            f"model.trust_remote_code=true: the Python code shipped with '{source}' will run on this machine "
            f"when the {what} loads; use it only with repositories you trust."
        )
    try:
        return loader.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except Exception as error:
        if offline:
            raise _hub_unreachable(source) from None
        where = f"hub repository '{source}'" if kind == "hub" else f"folder '{source}'"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if kwargs.get("use_safetensors") and "safetensors" in str(error):
            detail += (
                " (sparsealign loads weights from safetensors only, never from pickled .bin files: convert the "
                "checkpoint once with `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)` in a "
                "trusted environment)"
            )
        raise ModelError(f"Could not load the {what} from {where}: {detail}") from error


def _source(name: str) -> tuple[str, Kind]:
    """A folder or hub id to call from_pretrained on (pretrained built-ins are resolved to a folder)."""
    kind = _kind(name)
    if kind == "builtin":
        entry = BUILTIN_MODELS[name]
        assert entry.resolve is not None, f"built-in {name} is built, not loaded"
        return _check_local_folder(entry.resolve()), "local"
    if kind == "local":
        return _check_local_folder(name), "local"
    return name, "hub"


def locate_model(name: str, revision: str | None = None) -> Path | None:
    """Check, without loading anything, that model ``name`` can be obtained, and return its local folder when
    it has one (a folder, or a hub id already in the Hugging Face cache); None for a built-in or a hub id
    that will be downloaded. A missing folder, or a hub id that is neither reachable (``HF_HUB_OFFLINE`` or
    no network, found out within seconds) nor cached, raises :class:`ModelError` at once."""
    kind = _kind(name)
    if kind == "builtin":
        return None
    if kind == "local":
        return Path(_check_local_folder(name))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent
    if not hub_reachable():
        raise _hub_unreachable(name)
    return None


def _quantization(cfg: ModelConfig, device: str | torch.device | None) -> Any:
    """The ``BitsAndBytesConfig`` for ``load_in_4bit``/``load_in_8bit`` (None without), after checking,
    before any download, that this machine and configuration can use it.

    4-bit is QLoRA's NF4 with double quantisation and compute in the resolved dtype (Dettmers et al., 2023,
    "QLoRA: Efficient Finetuning of Quantized LLMs")."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    flag = "model.load_in_4bit" if cfg.load_in_4bit else "model.load_in_8bit"
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ModelError("Set one of model.load_in_4bit and model.load_in_8bit, not both.")
    if cfg.lora is None:
        raise ModelError(
            f"{flag} loads frozen quantised weights, which cannot be trained directly; set model.lora "
            "(e.g. model.lora.r=16) to train a LoRA adapter on top of them (QLoRA)."
        )
    on_cpu = (device is not None and torch.device(device).type != "cuda") or not torch.cuda.is_available()
    missing = importlib.util.find_spec("bitsandbytes") is None
    if on_cpu or missing:
        needs = []
        if on_cpu:
            needs.append("an NVIDIA GPU with CUDA (this run is on the CPU)")
        if missing:
            needs.append("the bitsandbytes package (`pip install bitsandbytes`)")
        raise ModelError(
            f"{flag} needs {' and '.join(needs)}. On this machine drop {flag} (plain LoRA in float32 or "
            "bfloat16 trains the same adapter with more memory)."
        )
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(cfg.dtype, device),
    )


def _check_attention(cfg: ModelConfig, device: str | torch.device | None) -> None:
    """Refuse ``flash_attention_2`` up front where it cannot run (transformers' own error comes late)."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    on_cpu = (device is not None and torch.device(device).type != "cuda") or not torch.cuda.is_available()
    missing = importlib.util.find_spec("flash_attn") is None
    if on_cpu or missing:
        needs = "a CUDA GPU" if on_cpu else "the flash-attn package (`pip install flash-attn`)"
        raise ModelError(
            f"model.attn_implementation=flash_attention_2 needs {needs}; use sdpa or eager on this machine."
        )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Pad with EOS when the tokenizer has no pad token; mirror the pad id into the model's configs."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                "The tokenizer has neither a pad nor an EOS token; add one (tokenizer.add_special_tokens) "
                "and save it with the model."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        return
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------
# Public loaders.


def _tokenizer_named(
    name: str, revision: str | None, cfg: ModelConfig, separate: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of a built-in, folder or hub id; a ``separate`` tokenizer folder needs no config.json."""
    from transformers import AutoTokenizer

    entry = BUILTIN_MODELS.get(name)
    if entry is not None and entry.tokenizer is not None:
        return entry.tokenizer()
    if separate and _kind(name) == "local" and Path(name).expanduser().is_dir():
        return _from_pretrained(AutoTokenizer, str(Path(name).expanduser()), "local", cfg, "tokenizer")
    source, kind = _source(name)
    return _from_pretrained(AutoTokenizer, source, kind, cfg, "tokenizer", revision)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg.tokenizer`` when set, else of ``cfg.name`` (at ``cfg.revision``), with a pad
    token (EOS when it had none)."""
    if cfg.tokenizer is not None:
        tokenizer = _tokenizer_named(cfg.tokenizer, None, cfg, separate=True)
    else:
        tokenizer = _tokenizer_named(cfg.name, cfg.revision, cfg)
    _ensure_pad_token(tokenizer)
    return tokenizer


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: ``nn.Dropout`` modules, float ``*dropout*``/``*pdrop*`` attributes
    that modules copied from the config at construction (e.g. Llama's ``attention_dropout``), and the same
    fields of the config (and sub-configs), so that a copy built from the config has none either."""
    from transformers import PretrainedConfig

    def dropoutish(key: str, value: Any) -> bool:
        is_number = isinstance(value, float | int) and not isinstance(value, bool)
        return is_number and ("dropout" in key or key.endswith("pdrop"))

    configs: list[PretrainedConfig] = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if dropoutish(key, value):
                setattr(module, key, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and all(config is not c for c in configs):
            configs.append(config)
    while configs:
        config = configs.pop()
        for key, value in list(vars(config).items()):
            if dropoutish(key, value):
                setattr(config, key, 0.0)
            elif isinstance(value, PretrainedConfig):
                configs.append(value)


def load_model(
    cfg: ModelConfig, seed: int = 0, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for ``cfg``: on ``device`` (CPU when None), in eval mode, dtype resolved.

    Random built-ins draw their weights from ``seed`` without changing the global RNG state. The tokenizer
    (``cfg.tokenizer`` when set) gets a pad token (EOS) when it has none. With ``cfg.disable_dropout`` all
    dropout is switched off. Quantised loading (``load_in_4bit``/``load_in_8bit``) and
    ``flash_attention_2`` are checked before anything is downloaded; a quantised random built-in is saved
    once (:func:`~sparsealign.models.builtins.saved_random_builtin`) and loaded from that folder.
    """
    from transformers import AutoModelForCausalLM

    quantization = _quantization(cfg, device)
    _check_attention(cfg, device)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    kwargs["use_safetensors"] = True  # never unpickle weights: a .bin-only checkpoint is refused
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": torch.device(device or "cuda")})
    entry = BUILTIN_MODELS.get(cfg.name)
    if entry is not None and entry.build is not None:
        model, tokenizer = entry.build(seed)
        if quantization is not None:
            folder = str(saved_random_builtin(cfg.name, model, tokenizer))
            model = _from_pretrained(AutoModelForCausalLM, folder, "local", cfg, "model", **kwargs)
        else:
            model = model.to(dtype)
            if cfg.attn_implementation is not None:
                model.set_attn_implementation(cfg.attn_implementation)
    else:
        source, kind = _source(cfg.name)
        tokenizer = _tokenizer_named(cfg.name, cfg.revision, cfg)
        model = _from_pretrained(AutoModelForCausalLM, source, kind, cfg, "model", cfg.revision, **kwargs)
    if cfg.tokenizer is not None:
        tokenizer = _tokenizer_named(cfg.tokenizer, None, cfg, separate=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(
            f"The tokenizer of '{cfg.tokenizer or cfg.name}' has {len(tokenizer)} tokens but the model's "
            f"embedding only {rows} rows; the tokenizer and the model do not belong together."
        )
    _ensure_pad_token(tokenizer, model)
    if cfg.disable_dropout:
        disable_dropout(model)
    if device is not None and quantization is None:  # a quantised model was placed by device_map
        model = model.to(device)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide a deprecation warning that PEFT 0.21 triggers inside transformers 5 (not actionable here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(
    model: PreTrainedModel, lora: LoraConfig, seed: int = 0, revision: str | None = None
) -> nn.Module:
    """Wrap ``model`` with a PEFT LoRA adapter (base weights frozen; adapter init drawn from ``seed``).

    ``target_modules='all-linear'`` adapts every linear (and GPT-2 ``Conv1D``) layer except the output head.
    The adapter records ``model.name_or_path`` as its base and ``revision`` as the base's hub revision.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        with torch.random.fork_rng(devices=[]), _quiet_peft():
            torch.manual_seed(seed)
            return get_peft_model(model, peft_config, revision=revision)
    except ValueError as error:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
        )
        raise ModelError(
            f"Cannot apply LoRA with target_modules={targets!r}: {error}. Linear layers in this model: "
            f"{', '.join(linear)} (or use 'all-linear')."
        ) from None


# --------------------------------------------------------------------------------------------------
# Policy + reference.


@dataclass
class ModelBundle:
    """The policy being trained, its tokenizer, and how to run the reference model.

    ``reference`` is a frozen eval-mode copy for full fine-tuning, or None with LoRA (the reference is then
    the policy with its adapter disabled) or when no reference was asked for (training from a reference
    cache). ``untrained`` stays True until the trainer's first step: until then the policy *is* the
    reference, so without a copy the reference is the policy itself (e.g. to sample on-policy pairs).

    ``reference_loader`` is set when the reference is a separate model (``reference.model``): it loads that
    model, on first use when it was not loaded up front, and it always takes precedence over the disabled
    adapter or the untrained policy.
    """

    policy: nn.Module
    tokenizer: PreTrainedTokenizerBase
    reference: nn.Module | None = None
    is_lora: bool = False
    untrained: bool = True
    reference_loader: Callable[[], nn.Module] | None = None
    _reference_digest: str | None = dataclasses.field(default=None, repr=False)

    def reference_digest(self) -> str:
        """The weights digest of the separate reference model (loaded for it, then dropped, if not loaded
        yet); what a reference cache records of it."""
        if self.reference_loader is None:
            raise ModelError("This bundle has no separate reference model (reference.model).")
        if self._reference_digest is None:
            model = self.reference if self.reference is not None else self.reference_loader()
            self._reference_digest = weights_digest(model)
        return self._reference_digest

    def _load_separate_reference(self) -> nn.Module:
        assert self.reference_loader is not None
        model = self.reference_loader()
        if self._reference_digest is not None and weights_digest(model) != self._reference_digest:
            raise ModelError(
                "Reloading the reference model gave different weights than when the run started; the model "
                "changed on disk during the run."
            )
        return model

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """Yield the module to run as the reference (in eval mode; wrap calls in ``torch.no_grad()``).

        With LoRA this is the policy itself inside ``disable_adapter()``, switched to eval mode for the
        duration; the train/eval mode of every submodule is restored on exit.
        """
        if self.reference is None and self.reference_loader is not None:
            self.reference = self._load_separate_reference()
        if self.reference is not None:
            yield self.reference
            return
        if not self.is_lora and not self.untrained:
            raise ModelError(
                "This bundle has no reference model; load it with load_bundle(..., need_reference=True)."
            )
        modes = [(module, module.training) for module in self.policy.modules()]
        self.policy.eval()
        try:
            if self.is_lora:
                with self.policy.disable_adapter():
                    yield self.policy
            else:
                yield self.policy
        finally:
            for module, training in modes:
                module.training = training


def frozen_copy(model: nn.Module) -> nn.Module:
    """An independent copy with identical weights, in eval mode, with ``requires_grad=False`` everywhere."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def reference_model_config(cfg: ModelConfig, reference: ReferenceConfig) -> ModelConfig:
    """The :class:`ModelConfig` that loads ``reference.model``: the policy's loading options (dtype,
    attention, quantisation, dropout) with the reference's name and revision, its own tokenizer, no LoRA."""
    assert reference.model is not None
    return dataclasses.replace(
        cfg, name=reference.model, revision=reference.revision, tokenizer=None, lora=None
    )


def _check_same_vocabulary(
    policy: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase, name: str
) -> None:
    """Reference log-probs are read at the policy's token ids, so both must map text to the same ids."""
    if policy.get_vocab() == reference.get_vocab():
        return
    a, b = policy.get_vocab(), reference.get_vocab()
    differing = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
    raise ModelError(
        f"reference.model '{name}' has a different tokenizer than the policy ({len(b)} vs {len(a)} tokens; "
        f"{len(differing)} tokens differ, e.g. {differing[:3]!r}). The reference scores the policy's token "
        "ids, so it must share the policy's vocabulary: use a reference from the same model family, or "
        "leave reference.model unset."
    )


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_bundle(
    cfg: ModelConfig,
    seed: int = 0,
    device: str | torch.device | None = None,
    need_reference: bool = True,
    reference: ReferenceConfig | None = None,
) -> ModelBundle:
    """Policy (+ LoRA adapter when ``cfg.lora`` is set), tokenizer and reference for a training run.

    Full fine-tuning with ``need_reference`` gets a frozen copy of the freshly loaded policy (same weights,
    not re-drawn). With LoRA the reference is never a second copy: see :meth:`ModelBundle.reference_model`.
    With ``reference.model`` set, the reference is that model instead (LoRA or not), loaded now with
    ``need_reference`` and otherwise on first use; its vocabulary is checked against the policy's first.
    Dropout is disabled (``cfg.disable_dropout``) on the base model before the adapter is added, so
    ``lora.dropout`` keeps its configured value. With quantised loading the base is prepared for training
    (peft's ``prepare_model_for_kbit_training``) before the adapter is added. A LoRA adapter of a random
    built-in records the built-in's saved folder as its base, so ``AutoPeftModelForCausalLM`` loads it.
    """
    model, tokenizer = load_model(cfg, seed, device)
    loader = None
    if reference is not None and reference.model is not None:
        ref_cfg = reference_model_config(cfg, reference)
        _check_same_vocabulary(tokenizer, load_tokenizer(ref_cfg), reference.model)

        def loader() -> nn.Module:
            return _frozen(load_model(ref_cfg, seed, device)[0])

    separate = loader() if loader is not None and need_reference else None
    if cfg.lora is not None:
        entry = BUILTIN_MODELS.get(cfg.name)
        if entry is not None and entry.build is not None and not (cfg.load_in_4bit or cfg.load_in_8bit):
            model.name_or_path = str(saved_random_builtin(cfg.name, model, tokenizer))
        if cfg.load_in_4bit or cfg.load_in_8bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        revision = cfg.revision if _kind(cfg.name) == "hub" else None
        policy = apply_lora(model, cfg.lora, seed, revision)
        return ModelBundle(policy, tokenizer, separate, is_lora=True, reference_loader=loader)
    if separate is None and loader is None and need_reference:
        separate = frozen_copy(model)
    return ModelBundle(model, tokenizer, separate, is_lora=False, reference_loader=loader)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder block (transformers' non-reentrant implementation, which
    needs no ``requires_grad`` inputs, so it also works with LoRA's frozen embeddings)."""
    from sparsealign.models.logprobs import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(lm).__name__} does not support gradient checkpointing; set it to false.")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # the name since transformers 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_reference(
    cfg: ModelConfig, seed: int, device: str | torch.device | None, digest: str | None = None
) -> nn.Module:
    """A frozen reference loaded on its own, for a run that trained without one (from a reference cache)
    and needs it afterwards (the final report's KL). With ``digest`` (the weights digest the cache was
    checked against) a reference that loads different weights is refused."""
    model, _ = load_model(cfg, seed, device)
    if digest is not None and weights_digest(model) != digest:
        raise ModelError(
            f"Reloading '{cfg.name}' for the report gave different weights than the run started from; "
            "the model changed on disk during the run."
        )
    return frozen_copy(model)


# --------------------------------------------------------------------------------------------------
# Saving.


def save_final(bundle: ModelBundle, folder: str | os.PathLike[str], merge: bool = False) -> Path:
    """Write the trained policy and tokenizer to ``folder`` atomically (:func:`sparsealign.io.atomic_folder`).

    Full model: safetensors + config + tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``.
    LoRA: the adapter (``PeftModel.save_pretrained``) + tokenizer; with ``merge`` also ``folder/merged/``, a
    full model with the adapter merged in, made from a copy so the live policy is untouched. An existing
    ``folder`` is replaced. Call it from the main process only.
    """
    folder = Path(folder)
    try:
        with atomic_folder(folder) as work:
            bundle.policy.save_pretrained(work)
            bundle.tokenizer.save_pretrained(work)
            if bundle.is_lora and merge:
                with _quiet_peft():
                    merged = copy.deepcopy(bundle.policy).merge_and_unload()
                merged.save_pretrained(work / "merged")
                bundle.tokenizer.save_pretrained(work / "merged")
                del merged
    except Exception as error:
        raise ModelError(f"Could not save the final model to '{folder}': {error}") from error
    return folder
