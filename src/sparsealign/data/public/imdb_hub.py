"""``imdb-hub``: the published IMDB prefix pairs the SparsePO IMDB recipes train on (the ODPO data).

Schema (https://github.com/rycolab/odpo, ``data/imdb-sft-{train,test}.jsonl``, read by ``get_imdb`` in its
``preference_datasets.py``): one generation per line, ``{"prompt": str, "text": str, "reward": float}``: a
review prefix, a continuation sampled from the SFT model, and its sentiment reward
(``lvwerra/distilbert-imdb``). Not on the Hugging Face Hub: clone the repository and pass
``data.path=odpo/data`` (only files whose name contains ``imdb`` are read) or one of the two files.

As ODPO's ``imdb_paired_responses``: for each prompt (in file order) its first two generations make the pair,
the higher reward chosen. Prompts with one generation are dropped (``single_generation``); equal rewards
(``tied_reward``: ODPO would make the second one chosen). The continuation follows the prefix after one space
unless it starts with whitespace or punctuation (the files store prefix and continuation without the space).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public

_NO_SPACE_BEFORE = ".,;:!?)]}'\"-"


def continuation(prompt: str, text: str) -> str:
    """The generation as it continues ``prompt``: with one separating space where the two words would touch."""
    if not text or text[0].isspace() or (prompt and prompt[-1].isspace()) or text[0] in _NO_SPACE_BEFORE:
        return text
    return " " + text


def convert_imdb_hub(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    groups: dict[str, list[tuple[str, str, float]]] = {}
    for origin, row in reader.rows(rows):
        prompt = reader.get(row, origin, "prompt")
        text = reader.get(row, origin, "text")
        reward = float(reader.get(row, origin, "reward", (int, float)))
        groups.setdefault(prompt, []).append((origin, text, reward))
    examples = []
    for prompt, generations in groups.items():
        if len(generations) < 2:
            reader.drop("single_generation", generations[0][0])
            continue
        (origin_a, text_a, reward_a), (origin_b, text_b, reward_b) = generations[:2]
        if reward_a == reward_b:
            reader.drop("tied_reward", origin_a)
            continue
        good, bad = (text_a, text_b) if reward_a > reward_b else (text_b, text_a)
        meta = {"rewards": [max(reward_a, reward_b), min(reward_a, reward_b)], "rows": [origin_a, origin_b]}
        examples.append(
            PreferenceExample(
                prompt, continuation(prompt, good), continuation(prompt, bad), origin_a, meta=meta
            )
        )
    return examples


imdb_hub = register_public(
    PublicDataset(
        "imdb-hub",
        None,
        "train",
        "test",
        file_contains="imdb",
        schema_url="https://github.com/rycolab/odpo/tree/main/data",
    ),
    convert_imdb_hub,
)
