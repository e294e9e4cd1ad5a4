"""Conditional SFT's control tokens (HALOs' ``csft``; Korbak et al. 2023, arXiv:2302.08582).

Each pair trains twice by SFT: the chosen response preceded by ``<|good|>`` and the rejected one preceded by
``<|bad|>``; sampling then appends ``<|good|>`` to the prompt so the model continues as it did after it.

Where the token goes. HALOs' current code prepends the token to the response text (so it is the first
response token); its legacy code appended it to the prompt. As token ids the two give the same sequence,
``prompt + [control] + response``; here the token is the first *response* token, so one shared prompt
serves both responses of a pair and the step's SFT loss also scores the control token (as HALOs' current
code). The tokens are added to the tokenizer as special tokens (one id each, never split or merged with
their neighbours, as both HALOs versions do), and the conditioning is applied to token ids, after
tokenisation: it works the same for text, conversations and pairs that arrive as ids (sampled sources),
and training and sampling see exactly the same ids.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from sparsealign.data.examples import TokenizedPair
from sparsealign.errors import DataError

__all__ = ["BAD_TOKEN", "GOOD_TOKEN", "add_control_tokens", "conditioned_prompt", "with_control_tokens"]

logger = logging.getLogger("sparsealign.data")

GOOD_TOKEN = "<|good|>"
"""HALOs' control token for chosen responses (``config/loss/csft.yaml``)."""
BAD_TOKEN = "<|bad|>"
"""HALOs' control token for rejected responses."""


def add_control_tokens(tokenizer: Any, good: str = GOOD_TOKEN, bad: str = BAD_TOKEN) -> tuple[int, int]:
    """Add ``good`` and ``bad`` to the tokenizer as special tokens (kept if already there) and return their
    ids. The caller grows the model's embeddings when ``len(tokenizer)`` exceeds them, and saves the
    tokenizer with the model."""
    if good == bad:
        raise DataError(f"the two control tokens must differ, got '{good}' twice")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [good, bad]}, replace_extra_special_tokens=False
    )
    ids = []
    for token in (good, bad):
        encoded = list(tokenizer(token, add_special_tokens=False)["input_ids"])
        if len(encoded) != 1:
            raise DataError(f"control token '{token}' does not tokenise to one id (got {encoded})")
        ids.append(int(encoded[0]))
    return ids[0], ids[1]


def with_control_tokens(
    pairs: Sequence[TokenizedPair], good_id: int, bad_id: int, max_length: int
) -> list[TokenizedPair]:
    """Copies of ``pairs`` whose chosen response starts with ``good_id`` and rejected one with ``bad_id``.

    A response that no longer fits ``max_length`` keeps its start (losing its last token, as tokenisation
    truncates); a pair with no room for any response token after the control token is dropped. Both are
    counted in a log message.
    """
    out, truncated, dropped = [], 0, 0
    for pair in pairs:
        room = max_length - len(pair.prompt_ids)
        if room < 2:
            dropped += 1
            continue
        chosen = [good_id, *pair.chosen_ids]
        rejected = [bad_id, *pair.rejected_ids]
        truncated += (len(chosen) > room) + (len(rejected) > room)
        out.append(dataclasses.replace(pair, chosen_ids=chosen[:room], rejected_ids=rejected[:room]))
    if truncated or dropped:
        logger.warning(
            "control tokens: %d responses truncated and %d of %d pairs dropped (too_long) to fit "
            "data.max_length=%d",
            truncated,
            dropped,
            len(pairs),
            max_length,
        )
    return out


def conditioned_prompt(prompt_ids: Sequence[int], control_id: int) -> list[int]:
    """The prompt to sample from: ``prompt_ids`` followed by the control token (the ``good`` id to get
    desirable responses), exactly the ids that preceded a response in training."""
    return [*prompt_ids, control_id]
