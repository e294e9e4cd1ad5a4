"""From the data section of a config to token-exact training and evaluation pairs.

Three kinds of input: a local file (``data.path``), a datasets name or saved folder (``data.dataset``),
or a named source (``data.source``, e.g. ``imdb``, which may sample pairs with the reference model and
score them with the reward). Examples that carry their token ids (``meta["prompt_ids"]`` etc., as sampled
pairs do) are used as they are, with no re-tokenisation.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsealign.data.examples import PreferenceExample, TokenizedPair
from sparsealign.data.formats import load_examples
from sparsealign.data.mismatched import with_mismatched_responses
from sparsealign.data.sources import load_source
from sparsealign.data.tokenize import tokenize_examples
from sparsealign.errors import DataError

logger = logging.getLogger("sparsealign.data")


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    eval_prompts: list[str] = field(default_factory=list)
    reward: Any = None


class LazyReward:
    """The configured reward model, built on first use, so runs that never score text never build it."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._model: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "config":
            raise AttributeError(name)
        if self._model is None:
            from sparsealign.rewards import load_reward

            self._model = load_reward(self.config)
        return getattr(self._model, name)


def _pretokenized(examples: list[PreferenceExample], max_length: int) -> tuple[list[TokenizedPair], Counter]:
    pairs, dropped = [], Counter()
    for ex in examples:
        m = ex.meta
        pair = TokenizedPair(list(m["prompt_ids"]), list(m["chosen_ids"]), list(m["rejected_ids"]), ex.origin)
        if len(pair) > max_length or not pair.chosen_ids or not pair.rejected_ids:
            dropped["too_long" if pair.chosen_ids and pair.rejected_ids else "empty_response"] += 1
            continue
        pairs.append(pair)
    return pairs, dropped


def to_pairs(
    examples: list[PreferenceExample], tokenizer: Any, data_cfg: Any, split: str
) -> list[TokenizedPair]:
    with_ids = [e for e in examples if "prompt_ids" in e.meta]
    text = [e for e in examples if "prompt_ids" not in e.meta]
    pairs, dropped = _pretokenized(with_ids, data_cfg.max_length)
    if text:
        more, more_dropped = tokenize_examples(text, tokenizer, data_cfg)
        pairs += more
        dropped += more_dropped
    if dropped:
        logger.warning(
            "%s: dropped %d of %d examples: %s", split, sum(dropped.values()), len(examples), dict(dropped)
        )
    return pairs


def prepare_data(
    config: Any,
    bundle: Any,
    is_main_process: bool = True,
    mismatched: bool = False,
    prepare_pairs: Callable[[list[TokenizedPair]], list[TokenizedPair]] | None = None,
) -> PreparedData:
    """Load, validate and tokenise the configured data; fail with a clear message if nothing is usable.

    ``mismatched``: also fix each pair's two mismatched responses (other prompts' responses, one for its
    chosen row and one for its rejected row: ``data.mismatched``), for methods
    that need mismatched rows (KTO's reference point). ``prepare_pairs``: a method's rewrite of the
    tokenised pairs, applied to train and eval pairs before the mismatched rows are fixed (conditional SFT's
    control prefixes)."""
    reward = LazyReward(config.reward)
    d = config.data
    eval_prompts: list[str] = []
    if d.source is not None:
        context = {
            "bundle": bundle,
            "reward": reward,
            "model_id": config.model.name,
            "is_main_process": is_main_process,
        }
        source = load_source(config, context)
        train_examples, eval_examples, eval_prompts = source.train, source.eval, source.eval_prompts
        if d.max_examples is not None:
            train_examples = train_examples[: d.max_examples]
    elif d.path is not None or d.dataset is not None:
        train_examples, eval_examples, _ = load_examples(d)  # applies data.max_examples
    else:
        raise DataError(
            "No data configured: set data.path (a local file), data.dataset or data.source (e.g. imdb)."
        )
    train = to_pairs(train_examples, bundle.tokenizer, d, "train")
    evaluation = to_pairs(eval_examples, bundle.tokenizer, d, "eval")
    if prepare_pairs is not None:
        train, evaluation = prepare_pairs(train), prepare_pairs(evaluation)
    if not train:
        raise DataError(
            f"None of the {len(train_examples)} training examples fit data.max_length={d.max_length}."
        )
    if mismatched:
        train = with_mismatched_responses(train, d.max_length)
        evaluation = with_mismatched_responses(evaluation, d.max_length)
    logger.info(
        "data: %d training pairs, %d evaluation pairs, %d held-out prompts",
        len(train),
        len(evaluation),
        len(eval_prompts),
    )
    return PreparedData(train, evaluation, eval_prompts, reward)
