"""UltraChat 200k (``HuggingFaceH4/ultrachat_200k``): the SFT conversations of the FPO paper (SFT only).

Schema (https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k, ``data/{train,test}_sft-*.parquet``):
``prompt`` (str), ``prompt_id`` (str), ``messages`` (a list of ``{"role", "content"}`` messages, user and
assistant turns alternating). Splits ``train_sft`` / ``test_sft``.

Each row gives one SFT example per assistant turn (``data.sft_turns=all``) or for its last one (``last``),
prompted by the conversation before it (:func:`sparsealign.data.formats.sft_examples`); ``rejected`` repeats
the response and ``meta["sft_only"]`` is True, so only ``method.name=sft`` trains on this source. Rows that
cannot give an example (no assistant turn, an empty one) are dropped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.formats import Skip, sft_examples
from sparsealign.data.public.common import PublicDataset, RowReader, register_public


def convert_ultrachat(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    examples = []
    for origin, row in reader.rows(rows):
        messages = reader.messages(row, origin, "messages")
        result = sft_examples(messages, origin, reader.sft_turns)
        if isinstance(result, Skip):
            reader.drop(result.reason, origin)
            continue
        for example in result:
            example.meta["prompt_id"] = row.get("prompt_id")
        examples.extend(result)
    return examples


ultrachat = register_public(
    PublicDataset(
        "ultrachat",
        "HuggingFaceH4/ultrachat_200k",
        "train_sft",
        "test_sft",
        schema_url="https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k",
    ),
    convert_ultrachat,
)
