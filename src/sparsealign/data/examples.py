"""The two record types that flow through the data pipeline: text examples and token-exact pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]
"""A chat message: ``{"role": "user" | "assistant" | "system", "content": str}``."""


@dataclass
class PreferenceExample:
    """One preference pair in text form.

    ``prompt`` is a string (standard format) or a list of messages (conversational format); ``chosen`` and
    ``rejected`` are strings or lists of (assistant) messages that continue the prompt. ``origin`` says where
    the row came from (``"train.jsonl:17"``) so that later errors can point at it.

    Binary feedback (one completion labelled desirable or not,
    :func:`sparsealign.data.formats.unpaired_example`) is an example whose ``chosen`` and ``rejected`` are
    both the completion, with ``meta["label"]`` a bool; only its chosen side is ever forwarded.
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    origin: str = ""
    meta: dict = field(default_factory=dict)


def feedback_label(example: PreferenceExample) -> bool | None:
    """The label of a binary-feedback item (desirable or not), None for a preference pair: a bool
    ``meta["label"]`` on an example whose two sides are the same completion (a pair's own ``label`` column,
    kept in ``meta``, does not make it binary feedback)."""
    label = example.meta.get("label")
    return label if isinstance(label, bool) and example.chosen == example.rejected else None


@dataclass
class TokenizedPair:
    """A preference pair as token ids, with the prompt shared by both responses.

    ``prompt_ids + chosen_ids`` is exactly the tokenisation of the full chosen sequence (token-exact
    boundary); the prompt holds the single BOS where the model uses one; each response ends with EOS
    unless it was truncated by ``max_length``.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: str = ""
    mismatched_ids: tuple[list[int], list[int]] | None = None
    """KTO: two responses written for other prompts, each continuing this prompt: the one of the chosen
    row, then the one of the rejected row (:func:`sparsealign.data.mismatched.with_mismatched_responses`)."""
    label: bool | None = None
    """Binary feedback (unpaired data, KTO): whether the completion (``chosen_ids``, repeated as
    ``rejected_ids`` and never trained on) is desirable; None for a preference pair."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))
