"""OpenAssistant Conversations (``OpenAssistant/oasst1``): English ranked sibling replies as pairs, as HALOs.

Schema (https://huggingface.co/datasets/OpenAssistant/oasst1, ``data/{train,validation}-*.parquet``): one
message per row: ``message_id``, ``parent_id`` (null for a thread's first message), ``user_id``,
``created_date``, ``text``, ``role`` (``prompter`` or ``assistant``), ``lang``, ``review_count``,
``review_result``, ``deleted``, ``rank`` (0 = best among its siblings; null when unranked), ``synthetic``,
``model_name``, ``detoxify``, ``message_tree_id``, ``tree_state``, ``emojis``, ``labels``.

Only English messages are read (``lang == "en"``; others dropped as ``non_english``). Every assistant reply
of rank r >= 1 whose English sibling (same parent) has rank r - 1 gives a pair: that sibling chosen, the reply
rejected (HALOs' ``get_oasst``: a ranking a > b > c becomes (a, b), (b, c)). The prompt is the thread from
its first message down to the parent, prompter turns as ``user`` and assistant turns as ``assistant``
messages. Left out: ranked replies without such a sibling (``no_better_sibling``), ranked prompter replies
(``prompter_reply``: HALOs would pair them as assistant turns), and threads with a missing or non-English
ancestor (``incomplete_thread``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public
from sparsealign.errors import DataError

ROLES = {"prompter": "user", "assistant": "assistant"}


def _rank(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def convert_oasst(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    messages: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for origin, row in reader.rows(rows):
        message_id = reader.get(row, origin, "message_id")
        lang = reader.get(row, origin, "lang")
        role = reader.get(row, origin, "role")
        text = reader.get(row, origin, "text")
        parent = reader.get(row, origin, "parent_id", (str, type(None)))
        rank = _rank(reader.get(row, origin, "rank", (int, float, type(None))))
        if role not in ROLES:
            raise DataError(
                f"oasst: {reader.where(origin)}: column 'role' is '{role}', expected prompter or assistant."
            )
        if lang != "en":
            reader.drop("non_english", origin)
            continue
        messages[message_id] = {"parent": parent, "role": role, "text": text, "rank": rank, "origin": origin}
        order.append(message_id)
    by_parent_rank: dict[tuple[str | None, int], str] = {}
    for message_id in order:
        m = messages[message_id]
        if m["rank"] is not None:
            by_parent_rank.setdefault((m["parent"], m["rank"]), message_id)

    def thread(parent: str | None) -> list[dict[str, str]] | None:
        path = []
        while parent is not None:
            node = messages.get(parent)
            if node is None:
                return None
            path.append({"role": ROLES[node["role"]], "content": node["text"]})
            parent = node["parent"]
        return path[::-1]

    examples = []
    for message_id in order:
        m = messages[message_id]
        if m["rank"] is None or m["rank"] == 0:
            continue
        if m["role"] != "assistant":
            reader.drop("prompter_reply", m["origin"])
            continue
        better = by_parent_rank.get((m["parent"], m["rank"] - 1))
        if better is None:
            reader.drop("no_better_sibling", m["origin"])
            continue
        prompt = thread(m["parent"])
        if not prompt:
            reader.drop("incomplete_thread", m["origin"])
            continue
        examples.append(
            PreferenceExample(
                prompt,
                [{"role": "assistant", "content": messages[better]["text"]}],
                [{"role": "assistant", "content": m["text"]}],
                m["origin"],
                meta={"chosen_rank": m["rank"] - 1, "rejected_rank": m["rank"]},
            )
        )
    return examples


oasst = register_public(
    PublicDataset(
        "oasst",
        "OpenAssistant/oasst1",
        "train",
        "validation",
        schema_url="https://huggingface.co/datasets/OpenAssistant/oasst1",
    ),
    convert_oasst,
)
