"""Batched, seeded sampling of continuations from a causal LM (plain, PEFT-wrapped, or adapter-disabled).

Prompts arrive as token ids and leave as token ids, so the pairs built from the samples are token-exact:
the trainer scores exactly the tokens the model produced, with no decode/re-encode round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS plus those of the model's generation config."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if value is None:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            if int(item) not in ids:
                ids.append(int(item))
    return ids


def pad_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any valid id works)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value if not isinstance(value, list | tuple) else value[0])
    return 0


def batch_seed(seed: int, index: int) -> int:
    """A 63-bit torch seed for generation batch ``index`` of a run seeded with ``seed``."""
    digest = hashlib.sha256(f"sparsealign-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less module)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def sample_continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | str = False,
) -> list[list[list[int]]]:
    """Sample ``num_samples`` continuations of each prompt.

    Returns ``out[i][j]``: the token ids generated for prompt ``i``, sample ``j``, up to and including the
    first EOS if one was produced (no padding, no prompt). ``temperature == 0`` decodes greedily (all
    samples of a prompt are then identical). Sampling is from the model's distribution, tempered and
    nucleus-truncated by ``temperature``/``top_p`` only: the model's own generation defaults (top-k,
    repetition penalty, ...) are overridden with neutral values.

    Prompts are left-padded into batches of ``batch_size`` prompts (``batch_size * num_samples`` rows). The
    torch RNG is seeded per batch from ``seed`` and the batch index inside a forked RNG state, so the result
    is reproducible for a given ``seed``/``batch_size`` and the caller's RNG stream is not disturbed. The
    model's train/eval flags are restored afterwards. ``progress`` shows a tqdm bar (a string is its label).
    """
    from transformers import GenerationConfig

    if num_samples < 1 or max_new_tokens < 0 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be >= 1 and max_new_tokens >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts:
        return []
    if max_new_tokens == 0:
        return [[[] for _ in range(num_samples)] for _ in prompts]

    if not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module  # a DDP/accelerate wrapper: generate with the wrapped model
    eos = _eos_ids(model, tokenizer)
    pad = pad_id_for(tokenizer)
    greedy = temperature <= 0
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=not greedy,
        temperature=1.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        top_k=0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        num_beams=1,
        num_return_sequences=1 if greedy else num_samples,
        eos_token_id=eos or None,
        pad_token_id=pad,
        use_cache=True,
    )
    device = model_device(model)
    flags = {module: module.training for module in model.modules()}
    model.eval()
    eos_set = set(eos)
    results: list[list[list[int]]] = []
    starts = range(0, len(prompts), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(prompts), desc=progress if isinstance(progress, str) else "sampling", unit="prompt"
        )
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=fork_devices):
            for index, start in enumerate(starts):
                chunk = [list(p) for p in prompts[start : start + batch_size]]
                width = max(len(p) for p in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                torch.manual_seed(batch_seed(seed, index))
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_config,
                )
                new = output[:, width:].tolist()  # rows ordered prompt-major: prompt r, samples 0..k-1
                per_row = 1 if greedy else num_samples  # greedy decodes each prompt once and copies it
                for row in range(len(chunk)):
                    per_prompt = []
                    for j in range(num_samples):
                        tokens = new[row * per_row + (0 if greedy else j)]
                        cut = next((t + 1 for t, tok in enumerate(tokens) if tok in eos_set), len(tokens))
                        per_prompt.append(tokens[:cut])
                    results.append(per_prompt)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        for module, flag in flags.items():
            module.training = flag
    return results


def decode_continuation(tokenizer: Any, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> str:
    """The text that ``continuation_ids`` adds after the prompt (special tokens dropped).

    Decoding the continuation on its own can lose a leading space (SentencePiece) or split a multi-byte
    character, so the text is taken as the suffix of the decoded full sequence when the decoded prompt is a
    prefix of it, and the continuation decoded alone otherwise.
    """
    prompt_text = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(continuation_ids), skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    return tokenizer.decode(list(continuation_ids), skip_special_tokens=True)
