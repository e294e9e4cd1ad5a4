"""Stanford Human Preferences (``stanfordnlp/SHP``), filtered as HALOs does (``get_shp``).

Schema (https://huggingface.co/datasets/stanfordnlp/SHP, files ``<domain>/{train,validation,test}.json``, one
JSON object per line): ``post_id``, ``domain``, ``upvote_ratio``, ``history`` (the post), ``c_root_id_A``,
``c_root_id_B``, ``created_at_utc_A``, ``created_at_utc_B``, ``score_A``, ``score_B``, ``human_ref_A``,
``human_ref_B`` (the two comments), ``labels`` (1 if A is preferred, 0 if B), ``seconds_difference``,
``score_ratio``.

Each row is one pair: the prompt is the post as a user message, the responses the two comments as assistant
messages, the preferred one (``labels``) chosen. On the training split, as HALOs: pairs whose score ratio
``max(score_A / score_B, score_B / score_A)`` is below 2 are dropped (``score_ratio_below_2``), and at most 5
pairs per post are kept, drawn with ``random.Random(train.seed)`` (``over_5_pairs_per_post``). Evaluation
splits are not filtered (HALOs neither).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public, sample_pairs
from sparsealign.errors import DataError

MIN_SCORE_RATIO = 2.0
MAX_PAIRS_PER_POST = 5


def score_ratio(score_a: float, score_b: float) -> float:
    """``max(a / b, b / a)``; infinite when one score is 0 and the other is not."""
    low, high = sorted((float(score_a), float(score_b)))
    if low <= 0:
        return float("inf") if high > 0 else 1.0
    return high / low


def convert_shp(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    per_post: dict[str, list[PreferenceExample]] = {}
    for origin, row in reader.rows(rows):
        post_id = reader.get(row, origin, "post_id")
        history = reader.get(row, origin, "history")
        a, b = reader.get(row, origin, "human_ref_A"), reader.get(row, origin, "human_ref_B")
        score_a = reader.get(row, origin, "score_A", (int, float))
        score_b = reader.get(row, origin, "score_B", (int, float))
        label = reader.get(row, origin, "labels", int)
        if label not in (0, 1):
            raise DataError(f"shp: {reader.where(origin)}: column 'labels' is {label}, expected 0 or 1.")
        if reader.split == "train" and score_ratio(score_a, score_b) < MIN_SCORE_RATIO:
            reader.drop("score_ratio_below_2", origin)
            continue
        chosen, rejected = (a, b) if label == 1 else (b, a)
        per_post.setdefault(post_id, []).append(
            PreferenceExample(
                [{"role": "user", "content": history}],
                [{"role": "assistant", "content": chosen}],
                [{"role": "assistant", "content": rejected}],
                origin,
                meta={"post_id": post_id, "domain": row.get("domain")},
            )
        )
    examples = []
    for pairs in per_post.values():
        kept = pairs
        if reader.split == "train":
            kept = sample_pairs(pairs, MAX_PAIRS_PER_POST, reader.seed)
            kept_ids = {id(ex) for ex in kept}
            for ex in pairs:
                if id(ex) not in kept_ids:
                    reader.drop("over_5_pairs_per_post", ex.origin)
        examples.extend(kept)
    return examples


shp = register_public(
    PublicDataset(
        "shp",
        "stanfordnlp/SHP",
        "train",
        "test",
        schema_url="https://huggingface.co/datasets/stanfordnlp/SHP",
    ),
    convert_shp,
)
