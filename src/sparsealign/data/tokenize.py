"""Token-exact tokenisation of preference pairs.

For each pair the prompt is tokenised once and each response is cut out of the tokenisation of the whole
sequence, so that ``prompt_ids + chosen_ids`` is what the model sees for "prompt followed by chosen":

* **Text.** ``prompt_ids`` is the prompt tokenised with the tokenizer's leading special tokens (its BOS,
  where it adds one; none is added when the text already starts with it, so there is exactly one).
  Trailing special tokens that a post-processor may add are not used. ``full_ids`` is ``prompt + response``
  tokenised the same way, and the response ids are ``full_ids[len(prompt_ids):]`` when ``prompt_ids`` is
  a prefix of ``full_ids``. When it is not (a merge across the boundary, e.g. ``"hello wor" + "ld"``), the
  response is tokenised on its own, without special tokens, and appended to ``prompt_ids``; such pairs are
  counted as ``boundary_fallback`` in the stats. Strings are never sliced.
* **Conversations.** The prompt messages are rendered with the chat template and
  ``add_generation_prompt=True``; prompt plus response messages are rendered without it; the response
  text is what follows the prompt render, which must be a string prefix of the full render (otherwise the
  pair is dropped as ``template_mismatch``). Both texts are then tokenised as above; templates that write
  the BOS text themselves thus get no second BOS.
* **EOS.** Every response ends with ``tokenizer.eos_token_id``: it is appended when missing. Chat
  templates usually close the assistant turn with an end-of-turn token; when that token is not the EOS
  token (e.g. ``<|im_end|>`` followed by a newline), EOS is still appended after the rendered turn, so
  generation stops where training ended the response.
* **BOS.** ``data.add_bos``: ``auto`` frames prompts as the tokenizer does; ``true`` puts its BOS in front
  of every prompt even when the tokenizer adds none (GPT-2: the original TRL pipeline of the SparsePO
  recipes prepended ``<|endoftext|>``); ``false`` never adds one.
* **Truncation.** A prompt longer than ``max_prompt_length`` keeps its last tokens (``keep_end``, with the
  BOS the framing put in front kept; a first token that merely equals the BOS id, like ChatML's
  ``<|im_start|>`` for SmolLM2, is not kept alone in front of the tail) or its first tokens (``keep_start``). Then a response longer than
  ``max_length - len(prompt)`` keeps its start (and so loses its EOS). A response left with no token is
  dropped as ``too_long``.

Drop reasons (see :data:`DROP_REASONS`) are returned by :func:`tokenize_pair` and counted by
:func:`tokenize_examples`.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sparsealign.data.examples import Message, PreferenceExample, TokenizedPair, feedback_label
from sparsealign.errors import DataError

__all__ = [
    "CHAT_TEMPLATES",
    "DROP_REASONS",
    "pair_texts",
    "resolve_chat_template",
    "tokenize_examples",
    "tokenize_pair",
    "truncate_prompt",
]

logger = logging.getLogger("sparsealign.data")

DROP_REASONS = ("too_long", "template_mismatch", "template_error", "empty_prompt", "empty_response")
"""Why :func:`tokenize_pair` drops a pair: a response with no token left after truncation; a chat template
whose prompt render is not a prefix of the full render; a template that fails to render the row; a prompt
with no token at all (no BOS and no text: nothing to predict the first response token from); a response
that tokenises to nothing."""

_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")


@dataclass(frozen=True)
class _Frame:
    """How a tokenizer frames one text: the ids it puts in front (e.g. ``[bos]``) and its EOS id."""

    prefix: tuple[int, ...]
    bos_text: str | None
    eos_id: int


_FRAMES: weakref.WeakKeyDictionary[Any, _Frame] = weakref.WeakKeyDictionary()


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _detect_frame(tokenizer: Any) -> _Frame:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("The tokenizer has no EOS token (eos_token_id is None); responses must end with EOS.")
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = _ids(tokenizer, "a")
    prefix: list[int] = []
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix = with_special[:start]
            break
    bos_text = tokenizer.bos_token if prefix == [tokenizer.bos_token_id] else None
    return _Frame(prefix=tuple(prefix), bos_text=bos_text, eos_id=int(eos_id))


def _detected_frame(tokenizer: Any) -> _Frame:
    """The (cached) :class:`_Frame` of ``tokenizer``."""
    try:
        frame = _FRAMES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _detect_frame(tokenizer)
    if frame is None:
        frame = _detect_frame(tokenizer)
        _FRAMES[tokenizer] = frame
    return frame


def _frame(tokenizer: Any, add_bos: str | bool = "auto") -> _Frame:
    """The framing of prompts under ``data.add_bos`` (see the module docstring)."""
    frame = _detected_frame(tokenizer)
    if add_bos == "auto":
        return frame
    if add_bos is False:
        return _Frame(prefix=(), bos_text=None, eos_id=frame.eos_id)
    if tokenizer.bos_token_id is None:
        raise DataError("data.add_bos=true, but the tokenizer has no BOS token; use data.add_bos=auto.")
    return _Frame(prefix=(int(tokenizer.bos_token_id),), bos_text=tokenizer.bos_token, eos_id=frame.eos_id)


def _encode(tokenizer: Any, text: str, frame: _Frame) -> list[int]:
    """``text`` with the tokenizer's leading special tokens, unless the text already starts with them."""
    ids = _ids(tokenizer, text)
    prefix = list(frame.prefix)
    if not prefix or ids[: len(prefix)] == prefix or (frame.bos_text and text.startswith(frame.bos_text)):
        return ids
    return prefix + ids


def _response_ids(
    tokenizer: Any, prompt_text: str, prompt_ids: list[int], response: str, frame: _Frame, stats: Counter[str]
) -> list[int]:
    """The ids of ``response`` after ``prompt_ids``, cut from the full tokenisation when it allows."""
    full_ids = _encode(tokenizer, prompt_text + response, frame)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    stats["boundary_fallback"] += 1
    return _ids(tokenizer, response)


# --------------------------------------------------------------------------------------------------
# Chat templates


HALOS_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '\\n<|assistant|>\\n' }}"
    "{% elif m['role'] == 'system' %}{{ '\\n<|system|>\\n' }}"
    "{% else %}{{ '\\n<|user|>\\n' }}{% endif %}{{ m['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)
"""HALOs' conversation format (legacy ``config.yaml``: ``human_prefix "\n<|user|>\n"``, ``assistant_prefix
"\n<|assistant|>\n"``, empty suffixes), which its UltraFeedback and UltraChat runs (the FPO experiments)
trained with; the response is followed by EOS as every response here."""

CHAT_TEMPLATES = {"halos": HALOS_TEMPLATE}
"""Built-in chat templates, by the name ``data.chat_template`` accepts."""


@lru_cache(maxsize=8)
def _read_template(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str | None:
    """The template to render conversations with: ``chat_template`` (a built-in name from
    :data:`CHAT_TEMPLATES`, a Jinja string or a path to a file), else ``None`` meaning the tokenizer's own.
    Raises :class:`DataError` when there is neither."""
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if chat_template:
        looks_like_path = chat_template.endswith(_TEMPLATE_SUFFIXES) or (
            "{" not in chat_template and "\n" not in chat_template
        )
        if looks_like_path:
            if not Path(chat_template).is_file():
                raise DataError(
                    f"data.chat_template '{chat_template}' looks like a file path but no such file exists; "
                    f"give a .jinja file or the template text itself."
                )
            return _read_template(str(Path(chat_template).resolve()))
        return chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "The data is conversational but the tokenizer has no chat template; set data.chat_template to a "
            "Jinja template string or a path to a .jinja file."
        )
    return None


def _render(tokenizer: Any, messages: list[Message], template: str | None, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected a string")
    return text


def _render_pair(
    example: PreferenceExample, tokenizer: Any, template: str | None
) -> tuple[str, str, str] | str:
    """(prompt text, chosen text, rejected text) of a conversational pair, or a drop reason."""
    import jinja2

    prompt = list(example.prompt)
    try:
        prompt_text = _render(tokenizer, prompt, template, generation_prompt=True)
        fulls = [
            _render(tokenizer, prompt + list(response), template, False)
            for response in (example.chosen, example.rejected)
        ]
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
        logger.debug("%s: chat template failed: %s", example.origin, error)
        return "template_error"
    if not all(full.startswith(prompt_text) for full in fulls):
        return "template_mismatch"
    return prompt_text, fulls[0][len(prompt_text) :], fulls[1][len(prompt_text) :]


# --------------------------------------------------------------------------------------------------
# Truncation and the pair


def truncate_prompt(
    prompt_ids: list[int], max_prompt_length: int, side: str, head: tuple[int, ...] | list[int] = ()
) -> list[int]:
    """Cut ``prompt_ids`` to ``max_prompt_length``: ``keep_end`` keeps the last tokens, after ``head`` (the
    tokens the framing put in front, e.g. ``[bos]``) when the prompt starts with it; ``keep_start`` keeps
    the first ones."""
    if len(prompt_ids) <= max_prompt_length:
        return list(prompt_ids)
    if side == "keep_start":
        return list(prompt_ids[:max_prompt_length])
    if side != "keep_end":
        raise DataError(f"data.truncation must be 'keep_end' or 'keep_start', got '{side}'.")
    head = list(head) if head and list(prompt_ids[: len(head)]) == list(head) else []
    tail = max(0, max_prompt_length - len(head))
    return list(head) + (list(prompt_ids[-tail:]) if tail else [])


def pair_texts(example: PreferenceExample, tokenizer: Any, cfg: Any) -> tuple[str, str, str] | str:
    """The prompt and response texts of a pair, as they are tokenised: conversations rendered through the
    chat template (``data.chat_template``); a drop reason when the template cannot render the pair."""
    if (
        isinstance(example.prompt, str)
        and isinstance(example.chosen, str)
        and isinstance(example.rejected, str)
    ):
        return example.prompt, example.chosen, example.rejected
    if (
        isinstance(example.chosen, str)
        or isinstance(example.rejected, str)
        or isinstance(example.prompt, str)
    ):
        raise DataError(f"{example.origin}: mixes string and message-list fields; use one format per row.")
    template = resolve_chat_template(tokenizer, cfg.chat_template)
    return _render_pair(example, tokenizer, template)


def tokenize_pair(
    example: PreferenceExample, tokenizer: Any, cfg: Any, *, stats: Counter[str] | None = None
) -> TokenizedPair | str:
    """Tokenise one pair (see the module docstring), or return the reason it is dropped.

    ``cfg`` is a :class:`~sparsealign.config.DataConfig`. ``stats``, when given, counts events of kept pairs
    (per response where it applies): ``boundary_fallback``, ``prompt_truncated``, ``response_truncated``,
    ``eos_appended``.
    """
    events: Counter[str] = Counter()  # merged into `stats` only when the pair is kept
    frame = _frame(tokenizer, cfg.add_bos)
    texts = pair_texts(example, tokenizer, cfg)
    if isinstance(texts, str):
        return texts
    prompt_text, chosen_text, rejected_text = texts
    prompt_ids = _encode(tokenizer, prompt_text, frame)
    if not prompt_ids:
        return "empty_prompt"
    responses = []
    for text in (chosen_text, rejected_text):
        ids = _response_ids(tokenizer, prompt_text, prompt_ids, text, frame, events)
        if not ids:
            return "empty_response"
        if ids[-1] != frame.eos_id:
            ids.append(frame.eos_id)
            events["eos_appended"] += 1
        responses.append(ids)
    if len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = truncate_prompt(prompt_ids, cfg.max_prompt_length, cfg.truncation, frame.prefix)
        events["prompt_truncated"] += 1
    budget = cfg.max_length - len(prompt_ids)
    if budget <= 0:
        return "too_long"
    for index, ids in enumerate(responses):
        if len(ids) > budget:
            responses[index] = ids[:budget]
            events["response_truncated"] += 1
    if stats is not None:
        stats.update(events)
    return TokenizedPair(
        prompt_ids=prompt_ids,
        chosen_ids=responses[0],
        rejected_ids=responses[1],
        origin=example.origin,
        label=feedback_label(example),  # binary feedback: desirable or not; None for a pair
    )


def tokenize_examples(
    examples: list[PreferenceExample], tokenizer: Any, cfg: Any, *, stats: Counter[str] | None = None
) -> tuple[list[TokenizedPair], Counter[str]]:
    """Tokenise many pairs; returns the kept pairs and a ``Counter`` of dropped pairs per reason.

    Drops and ``stats`` events are logged (logger ``sparsealign.data``). With ``cfg.strict`` a template
    failure raises :class:`DataError`; when every pair is dropped, :class:`DataError` gives the counts.
    """
    stats = stats if stats is not None else Counter()
    dropped: Counter[str] = Counter()
    first_origin: dict[str, str] = {}
    pairs: list[TokenizedPair] = []
    for example in examples:
        result = tokenize_pair(example, tokenizer, cfg, stats=stats)
        if isinstance(result, TokenizedPair):
            pairs.append(result)
            continue
        if cfg.strict and result in ("template_mismatch", "template_error"):
            raise DataError(
                f"{example.origin}: {result}: the chat template cannot render this pair so that the prompt "
                f"is a prefix of prompt + response. Set data.chat_template, or data.strict=false to drop it."
            )
        dropped[result] += 1
        first_origin.setdefault(result, example.origin)
    _log_tokenization(len(examples), pairs, dropped, first_origin, stats)
    if examples and not pairs:
        counts = ", ".join(f"{reason}={count}" for reason, count in dropped.most_common())
        raise DataError(
            f"None of the {len(examples)} examples survived tokenisation ({counts}). For too_long, raise "
            f"data.max_length or lower data.max_prompt_length; for template_* check data.chat_template."
        )
    return pairs, dropped


def _log_tokenization(
    total: int,
    pairs: list[TokenizedPair],
    dropped: Counter[str],
    first_origin: dict[str, str],
    stats: Counter[str],
) -> None:
    if dropped:
        details = ", ".join(
            f"{reason}={count} (first: {first_origin[reason]})" for reason, count in dropped.most_common()
        )
        logger.warning("tokenisation dropped %d of %d pairs: %s", sum(dropped.values()), total, details)
    if stats:
        logger.info(
            "tokenisation of %d pairs: %s", total, ", ".join(f"{k}={v}" for k, v in sorted(stats.items()))
        )
    logger.debug("tokenisation kept %d of %d pairs", len(pairs), total)
