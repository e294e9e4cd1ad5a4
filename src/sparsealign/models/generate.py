"""Batched, seeded sampling of continuations from a causal LM (plain, PEFT-wrapped, or adapter-disabled).

Prompts arrive as token ids and leave as token ids, so the pairs built from the samples are token-exact:
the trainer scores exactly the tokens the model produced, with no decode/re-encode round trip.

The decoding loop is our own (a few lines over the model's forward and its KV cache) rather than
``model.generate``, for three savings that ``generate`` does not make:

* prompts are sorted by length and batched with their neighbours, so left padding is minimal (none when the
  prompts of a batch have equal lengths);
* each prompt is prefilled once and its KV cache is then repeated to its ``num_samples`` rows
  (``generate(num_return_sequences=k)`` repeats the prompt before the prefill, computing it ``k`` times);
* a row that has produced EOS is dropped from the batch and its cache, so finished rows cost nothing
  (``generate`` keeps computing them until every row is done).

Each step's distribution is ``generate``'s: float32 logits of the last position, then Hugging Face's own
temperature and top-p warpers. Only the random draw differs (see :func:`sample_continuations`).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
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


def prompt_seed(seed: int, index: int) -> int:
    """The 63-bit torch seed of prompt ``index`` (its position in the call) of a call seeded with ``seed``."""
    digest = hashlib.sha256(f"sparsealign-sample-prompt:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def prompt_uniforms(seed: int, index: int, num_samples: int, max_new_tokens: int) -> torch.Tensor:
    """``U[j, t]``: the uniform number in [0, 1) that picks token ``t`` of sample ``j`` of prompt ``index``.

    Drawn in float64 on the CPU from a generator seeded with :func:`prompt_seed`, so the draws do not depend
    on the device, the batch, or the caller's RNG state."""
    generator = torch.Generator().manual_seed(prompt_seed(seed, index))
    return torch.rand((num_samples, max_new_tokens), generator=generator, dtype=torch.float64)


def inverse_cdf_pick(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of ``scores`` ``[R, V]`` (warped logits, ``-inf`` = excluded) by inversion.

    With ``p = softmax(scores)`` (float32, as ``generate``) and ``C_k = p_0 + ... + p_k`` (summed in float64)
    in vocabulary order, the token is the smallest ``k`` with ``C_k > u * C_{V-1}``: token ``k`` is drawn with
    probability exactly ``p_k`` when ``u`` is uniform on [0, 1). A rounding overshoot falls back to the last
    token of non-zero probability."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1, dtype=torch.float64)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    vocab = scores.shape[-1]
    overshoot = picked >= vocab
    if bool(overshoot.any()):  # rare: only when u * C_{V-1} rounds up to C_{V-1}
        rises = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1])) > 0
        last_positive = vocab - 1 - torch.argmax(rises.flip(-1).to(torch.int8), dim=-1)
        picked = torch.where(overshoot, last_positive, picked)
    return picked


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less module)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _keeps_last_logits_only(model: nn.Module) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes ``logits_to_keep`` (the output head on the last
    position only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
    last_only: bool,
) -> tuple[torch.Tensor, Any]:
    """One cached forward: the float32 logits of the last position ``[R, V]`` and the (grown) cache."""
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if last_only else {}
    if cache is not None:
        kwargs["cache"] = cache
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **kwargs,
    )
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[:, -1].to(dtype=torch.float32), new_cache


def _length_buckets(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by (length, index) and cut into runs of ``batch_size``: neighbours in length
    share a batch, so each batch pads to at most its own length spread."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
    first EOS if one was produced (no padding, no prompt). ``temperature == 0`` decodes greedily (the
    argmax of the logits, as ``generate(do_sample=False)``; all samples of a prompt are then identical).
    Sampling is from the model's distribution, tempered and nucleus-truncated by ``temperature``/``top_p``
    only (Hugging Face's ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``, in that order, as
    ``generate`` applies them); the model's own generation defaults (top-k, repetition penalty, ...) are
    not applied.

    What the seed determines: token ``t`` of sample ``j`` of prompt ``i`` (``i`` = the prompt's position in
    ``prompts``) is picked from that step's distribution by inversion (:func:`inverse_cdf_pick`) with the
    uniform number ``prompt_uniforms(seed, i, num_samples, max_new_tokens)[j, t]``. The samples are thus a
    function of ``(seed, i, prompt ids, model)`` only: they do not depend on ``batch_size``, on the other
    prompts, on the device's RNG or on the caller's RNG state (which is left untouched); two calls with the
    same seed agree up to the float rounding of different batch shapes.

    Prompts are sorted by length and batched ``batch_size`` prompts at a time (left-padded to the longest
    of the batch); each batch is prefilled once per prompt, its cache repeated to ``num_samples`` rows per
    prompt (one row for greedy decoding), and rows leave the batch as soon as they produce EOS. The model's
    train/eval flags are restored afterwards. ``progress`` shows a tqdm bar (a string is its label).
    """
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    if num_samples < 1 or max_new_tokens < 0 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be >= 1 and max_new_tokens >= 0")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts:
        return []
    if max_new_tokens == 0:
        return [[[] for _ in range(num_samples)] for _ in prompts]

    if not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module  # a DDP/accelerate wrapper: sample with the wrapped model
    eos_set = set(eos_ids(model, tokenizer))
    pad = pad_id_for(tokenizer)
    greedy = temperature <= 0
    warpers = LogitsProcessorList()
    if not greedy:
        if float(temperature) != 1.0:
            warpers.append(TemperatureLogitsWarper(float(temperature)))
        if float(top_p) < 1.0:
            warpers.append(TopPLogitsWarper(float(top_p)))
    per_prompt = 1 if greedy else num_samples  # greedy decodes each prompt once and copies it
    eos_on_device = torch.tensor(sorted(eos_set) or [-1], dtype=torch.long, device=model_device(model))
    last_only = _keeps_last_logits_only(model)
    flags = {module: module.training for module in model.modules()}
    model.eval()
    results: list[list[list[int]]] = [[] for _ in prompts]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        label = progress if isinstance(progress, str) else "sampling"
        bar = tqdm(total=len(prompts), desc=label, unit="prompt")
    try:
        with torch.inference_mode():
            for bucket in _length_buckets(prompts, batch_size):
                uniforms = None
                if not greedy:
                    uniforms = [prompt_uniforms(seed, i, num_samples, max_new_tokens) for i in bucket]
                chunk = [list(prompts[i]) for i in bucket]
                tokens = _decode_bucket(
                    model, chunk, uniforms, per_prompt, max_new_tokens, warpers, eos_on_device, pad, last_only
                )
                for slot, index in enumerate(bucket):
                    per = []
                    for j in range(num_samples):
                        row = tokens[slot * per_prompt + (0 if greedy else j)]
                        cut = next((t + 1 for t, tok in enumerate(row) if tok in eos_set), len(row))
                        per.append(row[:cut])
                    results[index] = per
                if bar is not None:
                    bar.update(len(bucket))
    finally:
        if bar is not None:
            bar.close()
        for module, flag in flags.items():
            module.training = flag
    return results


def _decode_bucket(
    model: nn.Module,
    chunk: list[list[int]],
    uniforms: list[torch.Tensor] | None,
    per_prompt: int,
    max_new_tokens: int,
    warpers: Any,
    eos: torch.Tensor,
    pad: int,
    last_only: bool,
) -> list[list[int]]:
    """Decode one length bucket; returns ``len(chunk) * per_prompt`` rows of ``max_new_tokens`` ids, prompt
    major (``pad`` after a row's EOS). ``uniforms`` None decodes greedily; ``eos`` holds the EOS ids."""
    device = eos.device
    width = max(len(p) for p in chunk)
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, ids in enumerate(chunk):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    input_ids, attention_mask, position_ids = (
        t.to(device) for t in (input_ids, attention_mask, position_ids)
    )
    logits, cache = _forward(model, input_ids, attention_mask, position_ids, None, last_only)
    if per_prompt > 1:
        cache.batch_repeat_interleave(per_prompt)
        logits = logits.repeat_interleave(per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(per_prompt, dim=0)
    rows = logits.shape[0]
    noise = torch.cat(uniforms).to(device) if uniforms is not None else None  # [rows, max_new_tokens]
    position = position_ids[:, -1].repeat_interleave(per_prompt)
    out = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)  # the batch's rows, as indices into ``out``
    for step in range(max_new_tokens):
        if noise is None:
            chosen = torch.argmax(logits, dim=-1)
        else:
            scores = warpers(None, logits)
            chosen = inverse_cdf_pick(scores, noise[active, step])
        out[active, step] = chosen
        if step + 1 == max_new_tokens:
            break
        going = ~torch.isin(chosen, eos)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, chosen = active[keep], chosen[keep]
            attention_mask, position = attention_mask[keep], position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], 1)
        position = position + 1
        logits, cache = _forward(
            model, chosen.unsqueeze(-1), attention_mask, position.unsqueeze(-1), cache, last_only
        )
    return out.tolist()


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
