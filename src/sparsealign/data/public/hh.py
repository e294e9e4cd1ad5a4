"""Anthropic HH-RLHF (``Anthropic/hh-rlhf``): ``hh``, ``hh-helpful`` (helpful-base), ``hh-harmless`` (harmless-base).

Schema (https://huggingface.co/datasets/Anthropic/hh-rlhf, files ``<subset>/{train,test}.jsonl.gz``): one
object per line, ``{"chosen": str, "rejected": str}``, each a whole transcript
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``.

The prompt is every turn before the last assistant turn: the transcript up to and including its last
``"\\n\\nAssistant:"``; the responses are what follows, so the space after ``"Assistant:"`` starts each response
(TRL's rule for whitespace at the split; the SparsePO code splits at the same place). A pair whose two
transcripts differ before that point is dropped as ``prompt_mismatch``; a transcript without an assistant turn
as ``no_assistant_turn``. ``hh`` reads the four preference subsets (not ``red-team-attempts``, another schema).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public

ASSISTANT = "\n\nAssistant:"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def split_transcript(text: str) -> tuple[str, str] | None:
    """``(prompt, response)`` split after the last ``"\\n\\nAssistant:"``; None without one."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return text[:end], text[end:]


def convert_hh(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    examples = []
    for origin, row in reader.rows(rows):
        chosen = split_transcript(reader.get(row, origin, "chosen"))
        rejected = split_transcript(reader.get(row, origin, "rejected"))
        if chosen is None or rejected is None:
            reader.drop("no_assistant_turn", origin)
            continue
        if chosen[0] != rejected[0]:
            reader.drop("prompt_mismatch", origin)
            continue
        examples.append(PreferenceExample(chosen[0], chosen[1], rejected[1], origin))
    return examples


_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf"
hh = register_public(
    PublicDataset("hh", "Anthropic/hh-rlhf", "train", "test", data_dirs=SUBSETS, schema_url=_URL), convert_hh
)
hh_helpful = register_public(
    PublicDataset(
        "hh-helpful", "Anthropic/hh-rlhf", "train", "test", data_dirs=("helpful-base",), schema_url=_URL
    ),
    convert_hh,
)
hh_harmless = register_public(
    PublicDataset(
        "hh-harmless", "Anthropic/hh-rlhf", "train", "test", data_dirs=("harmless-base",), schema_url=_URL
    ),
    convert_hh,
)
