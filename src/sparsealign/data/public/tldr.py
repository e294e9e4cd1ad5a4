"""Reddit TL;DR summarisation: ``tldr`` (human comparisons, the SparsePO TL;DR pairs) and ``tldr-sft``.

``tldr``: ``openai/summarize_from_feedback``, config ``comparisons``
(https://huggingface.co/datasets/openai/summarize_from_feedback; the builder script lists the features;
splits ``train`` / ``validation``): ``info`` (``id``, ``post``, ``title``, ``subreddit``, ``site``, ``article``),
``summaries`` (two ``{"text", "policy", "note"}``), ``choice`` (0 or 1: the preferred summary), ``worker``,
``batch``, ``split``, ``extra`` (``confidence``).

``tldr-sft``: ``CarperAI/openai_summarize_tldr`` (https://huggingface.co/datasets/CarperAI/openai_summarize_tldr;
splits ``train`` / ``valid`` / ``test``): ``prompt`` (the formatted post, ending in ``"TL;DR:"``) and
``label`` (the reference summary): SFT examples (``rejected`` repeats ``chosen``, ``meta["sft_only"]`` is True).

The prompt is the post as the SFT policy of the SparsePO recipes (CarperAI/openai_summarize_tldr_sft) saw
it: ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``; each summary, stripped, follows
after one space (whitespace at the boundary belongs to the response). Comparisons of news articles (CNN/DM
rows: ``info.post`` null) are dropped as ``not_reddit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public
from sparsealign.errors import DataError


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def convert_tldr(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    examples = []
    for origin, row in reader.rows(rows):
        post = reader.get(row, origin, "info.post", (str, type(None)))
        summaries = reader.get(row, origin, "summaries", list)
        choice = reader.get(row, origin, "choice", int)
        if len(summaries) != 2 or choice not in (0, 1):
            raise DataError(
                f"tldr: {reader.where(origin)}: columns 'summaries'/'choice' must be two summaries and 0 or 1 "
                f"(got {len(summaries)} summaries, choice {choice})."
            )
        texts = [reader.get(s if isinstance(s, dict) else {}, origin, "text") for s in summaries]
        if post is None:
            reader.drop("not_reddit", origin)
            continue
        prompt = tldr_prompt(
            reader.get(row, origin, "info.subreddit"), reader.get(row, origin, "info.title"), post
        )
        chosen, rejected = texts[choice], texts[1 - choice]
        meta = {"policies": [s.get("policy") for s in summaries], "worker": row.get("worker")}
        examples.append(
            PreferenceExample(prompt, " " + chosen.strip(), " " + rejected.strip(), origin, meta=meta)
        )
    return examples


def convert_tldr_sft(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    examples = []
    for origin, row in reader.rows(rows):
        prompt = reader.get(row, origin, "prompt").rstrip()
        reply = " " + reader.get(row, origin, "label").strip()
        examples.append(PreferenceExample(prompt, reply, reply, origin, meta={"sft_only": True}))
    return examples


tldr = register_public(
    PublicDataset(
        "tldr",
        "openai/summarize_from_feedback",
        "train",
        "validation",
        config_name="comparisons",
        local_dirs=("comparisons",),
        schema_url="https://huggingface.co/datasets/openai/summarize_from_feedback",
    ),
    convert_tldr,
)
tldr_sft = register_public(
    PublicDataset(
        "tldr-sft",
        "CarperAI/openai_summarize_tldr",
        "train",
        "valid",
        schema_url="https://huggingface.co/datasets/CarperAI/openai_summarize_tldr",
    ),
    convert_tldr_sft,
)
