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

from sparsealign.data.examples import PreferenceExample, TokenizedPair, feedback_label
from sparsealign.data.formats import load_examples, unpair_examples
from sparsealign.data.mismatched import with_mismatched_responses
from sparsealign.data.sources import load_source
from sparsealign.data.tokenize import tokenize_examples
from sparsealign.errors import DataError

logger = logging.getLogger("sparsealign.data")


@dataclass
class PreparedData:
    """Tokenised pairs, the held-out prompts for the generation report and the (lazy) reward.

    ``eval_prompts``: a named source's prompt texts, or for files and datasets the token ids of the
    held-out pairs' prompts (deduplicated, in order: exactly what was trained on, with no re-tokenisation);
    :func:`sparsealign.eval.report.evaluate_generations` takes either."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    eval_prompts: list[str] | list[list[int]] = field(default_factory=list)
    reward: Any = None

    @property
    def unpaired(self) -> bool:
        """Binary feedback: the pairs are labelled items (one completion each, desirable or not)."""
        return any(p.label is not None for p in self.train)


def held_out_prompts(pairs: list[TokenizedPair]) -> list[list[int]]:
    """The distinct prompts of ``pairs`` as token ids, in first-seen order."""
    seen: set[tuple[int, ...]] = set()
    prompts = []
    for pair in pairs:
        key = tuple(pair.prompt_ids)
        if key not in seen:
            seen.add(key)
            prompts.append(list(pair.prompt_ids))
    return prompts


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
        pair = TokenizedPair(
            list(m["prompt_ids"]),
            list(m["chosen_ids"]),
            list(m["rejected_ids"]),
            ex.origin,
            label=feedback_label(ex),
        )
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


def _check_sft_only(examples: list[PreferenceExample], chosen_only: bool, method: str | None) -> None:
    """SFT conversations (``messages`` rows) have no rejected response: only a method that trains on the
    chosen rows alone can use them."""
    if chosen_only:
        return
    sft_only = [e for e in examples if e.meta.get("sft_only")]
    if sft_only:
        raise DataError(
            f"{len(sft_only)} training examples come from 'messages' rows (SFT conversations, first: "
            f"{sft_only[0].origin}), which have no rejected response, but method '{method}' trains on "
            f"preference pairs. Use method.name=sft, or give rows with chosen and rejected."
        )


def _check_unpaired(examples: list[PreferenceExample], binary_feedback: bool, method: str | None) -> None:
    """Binary feedback (labelled items) trains only with a method that reads labels (KTO), and never mixed
    with preference pairs."""
    labelled = [e for e in examples if feedback_label(e) is not None]
    if not labelled:
        return
    if not binary_feedback:
        raise DataError(
            f"{len(labelled)} training examples are binary feedback (prompt, completion, label; first: "
            f"{labelled[0].origin}), but method '{method}' trains on preference pairs: binary feedback "
            "trains only with method.name=kto (or kto-zero)."
        )
    paired = [e for e in examples if feedback_label(e) is None]
    if paired:
        raise DataError(
            f"The data mixes binary feedback (first: {labelled[0].origin}) with {len(paired)} preference "
            f"pairs or SFT rows (first: {paired[0].origin}); use one kind, or data.flatten_pairs=true to turn "
            "the pairs into labelled items."
        )


def prepare_data(
    config: Any,
    bundle: Any,
    is_main_process: bool = True,
    mismatched: bool = False,
    prepare_pairs: Callable[[list[TokenizedPair]], list[TokenizedPair]] | None = None,
    chosen_only: bool = False,
    binary_feedback: bool = False,
) -> PreparedData:
    """Load, validate and tokenise the configured data; fail with a clear message if nothing is usable.

    ``mismatched``: also fix each pair's two mismatched responses (other prompts' responses, one for its
    chosen row and one for its rejected row: ``data.mismatched``), for methods
    that need mismatched rows (KTO's reference point). ``prepare_pairs``: a method's rewrite of the
    tokenised pairs, applied to train and eval pairs before the mismatched rows are fixed (conditional SFT's
    control prefixes). ``chosen_only``: the method trains on the chosen rows alone (SFT), so SFT
    conversations (``messages`` rows) are accepted. ``binary_feedback``: the method reads labels (KTO), so
    binary feedback (``prompt, completion, label`` rows, or pairs flattened by ``data.flatten_pairs``) is
    accepted; its items give the pairs a ``label``."""
    reward = LazyReward(config.reward)
    d = config.data
    eval_prompts: list[str] | list[list[int]] = []
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
    if d.flatten_pairs:
        train_examples, eval_examples = unpair_examples(train_examples), unpair_examples(eval_examples)
    _check_sft_only(train_examples, chosen_only, config.method.name)
    _check_unpaired(train_examples + eval_examples, binary_feedback, config.method.name)
    train = to_pairs(train_examples, bundle.tokenizer, d, "train")
    evaluation = to_pairs(eval_examples, bundle.tokenizer, d, "eval")
    if d.source is None:
        eval_prompts = held_out_prompts(evaluation)
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
