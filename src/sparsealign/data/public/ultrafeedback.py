"""UltraFeedback binarized (``HuggingFaceH4/ultrafeedback_binarized``), the FPO paper's preference data.

Schema (https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized, ``data/{train,test}_prefs-*.parquet``):
``prompt`` (str), ``prompt_id`` (str), ``chosen`` and ``rejected`` (whole conversations: lists of
``{"role", "content"}`` messages, the user prompt then the assistant reply), ``messages`` (the chosen
conversation again), ``score_chosen``, ``score_rejected`` (floats). Splits ``train_prefs`` / ``test_prefs``.

The prompt is the messages before each conversation's last message (the same for both: otherwise
``prompt_mismatch``), the responses the last (assistant) message of each, as HALOs' ``get_ultrabin`` takes
them. Pairs with identical or empty replies are dropped (``identical_responses``, ``empty_response``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public


def convert_ultrafeedback(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    examples = []
    for origin, row in reader.rows(rows):
        reader.get(row, origin, "prompt")
        chosen = reader.messages(row, origin, "chosen")
        rejected = reader.messages(row, origin, "rejected")
        if (
            not chosen
            or not rejected
            or chosen[-1]["role"] != "assistant"
            or rejected[-1]["role"] != "assistant"
        ):
            reader.drop("no_assistant_turn", origin)
            continue
        if chosen[:-1] != rejected[:-1] or not chosen[:-1]:
            reader.drop("prompt_mismatch", origin)
            continue
        meta = {key: row[key] for key in ("prompt_id", "score_chosen", "score_rejected") if key in row}
        examples.append(PreferenceExample(chosen[:-1], chosen[-1:], rejected[-1:], origin, meta=meta))
    return examples


ultrafeedback = register_public(
    PublicDataset(
        "ultrafeedback",
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
        "test_prefs",
        schema_url="https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized",
    ),
    convert_ultrafeedback,
)
