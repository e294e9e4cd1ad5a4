"""Conditional SFT's control prefixes (HALOs' ``csft``; Korbak et al. 2023, arXiv:2302.08582).

Each pair trains twice by SFT: the chosen response preceded by the ids of ``<|good|>`` and the rejected one
preceded by the ids of ``<|bad|>``; sampling then appends the ``<|good|>`` ids to the prompt, so the model
continues as it learned to after them.

Text, not new tokens. HALOs adds ``<|good|>`` and ``<|bad|>`` to the tokenizer as special tokens (one new id
each) and resizes the model's embeddings. Here the control strings are plain text, tokenised by the model's
own tokenizer (:func:`control_ids`; possibly several ids: SmolLM2's tokenizer gives ``<``, ``|``, ``good``,
``|``, ``>``). Nothing is added to the vocabulary, so LoRA and the built-in models need no new embedding
rows, the tokenizer saved with a run is the base model's, and any model can be conditioned as it is.

Where the prefix goes. HALOs' current code prepends the token to the response text (so it is the first
response token, and the SFT loss scores it); its legacy code appended it to the prompt. Here the control
ids are the first *response* ids, as in HALOs' current code: one prompt serves both responses of a pair.
The prefix is applied to token ids after tokenisation (:func:`with_control_tokens`), so it works the same for
text, conversations and pairs that arrive as ids (sampled sources), and the ids that follow the prompt in
training are exactly the ids :func:`conditioned_prompt` appends for sampling.

What this is in text. ``prompt_ids + control_ids + response_ids`` equals the tokenisation of the text
``prompt + "<|good|>" + response`` whenever no token of that tokenisation straddles a boundary of the
control text. That always holds for byte-level tokenizers without merges (the built-in tiny models); for a
BPE tokenizer it depends on the neighbours. With SmolLM2's it holds after a prompt ending in a letter, a
digit, ``,``, ``!`` or a newline and before a response starting with a space or a letter, but not after a
prompt ending in ``.``, ``)`` or a space, nor before a response starting with ``.`` or ``>`` (``.<``, ``)<``,
``Ġ<``, ``>.`` and ``>>`` are single tokens there). Training and sampling use the ids, never the text, so
they always agree.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from sparsealign.data.examples import TokenizedPair
from sparsealign.errors import DataError

__all__ = ["BAD_TOKEN", "GOOD_TOKEN", "conditioned_prompt", "control_ids", "with_control_tokens"]

logger = logging.getLogger("sparsealign.data")

GOOD_TOKEN = "<|good|>"
"""HALOs' control text for chosen responses (``config/loss/csft.yaml``)."""
BAD_TOKEN = "<|bad|>"
"""HALOs' control text for rejected responses."""


def control_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids of the control ``text`` as the tokenizer writes it on its own, with no special tokens added
    (no BOS, no EOS). A text that tokenises to nothing is a :class:`DataError`."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise DataError(f"the control text {text!r} tokenises to no ids; choose a visible string")
    return ids


def with_control_tokens(
    pairs: Sequence[TokenizedPair], good_ids: Sequence[int], bad_ids: Sequence[int], max_length: int
) -> list[TokenizedPair]:
    """Copies of ``pairs`` whose chosen response starts with ``good_ids`` and rejected one with ``bad_ids``.

    The prompt, the origin and any mismatched ids are kept; the input pairs are not modified. With
    ``room = max_length - len(prompt_ids)``, a response whose control prefix and own ids no longer fit keeps
    its first ``room`` ids (losing its end, EOS included, as tokenisation truncates); a pair without room for
    one id of each response after its control prefix is dropped (``too_long``). Both counts are logged.
    Identical ``good_ids`` and ``bad_ids`` (nothing to condition on) are a :class:`DataError`.
    """
    good, bad = [int(i) for i in good_ids], [int(i) for i in bad_ids]
    if not good or not bad:
        raise DataError("control prefixes must hold at least one id each")
    if good == bad:
        raise DataError(
            f"the good and bad control prefixes are the same ids ({good}); choose different texts"
        )
    out, truncated, dropped = [], 0, 0
    for pair in pairs:
        room = max_length - len(pair.prompt_ids)
        if room < max(len(good), len(bad)) + 1:
            dropped += 1
            continue
        chosen = [*good, *pair.chosen_ids]
        rejected = [*bad, *pair.rejected_ids]
        truncated += (len(chosen) > room) + (len(rejected) > room)
        out.append(dataclasses.replace(pair, chosen_ids=chosen[:room], rejected_ids=rejected[:room]))
    if truncated or dropped:
        logger.warning(
            "control prefixes: %d responses truncated and %d of %d pairs dropped (too_long) to fit "
            "data.max_length=%d",
            truncated,
            dropped,
            len(pairs),
            max_length,
        )
    return out


def conditioned_prompt(prompt_ids: Sequence[int], control_ids: Sequence[int]) -> list[int]:
    """The prompt to sample from: ``prompt_ids`` followed by ``control_ids`` (the good prefix, to get
    desirable responses), exactly the ids that preceded a response's own ids in training."""
    return [*(int(i) for i in prompt_ids), *(int(i) for i in control_ids)]
