"""Implicit-reward accuracy of a trained run on held-out preference pairs.

DPO's implicit reward (Rafailov et al., 2023) of a response is ``r(x, y) = beta * (log pi(y|x) - log
pi_ref(y|x))`` with the run's ``method.beta`` (1 for a method without one), its trained policy ``pi`` and
the reference it trained against. The accuracy is the fraction of held-out pairs with
``r(x, chosen) > r(x, rejected)`` (ties count as wrong, as TRL's ``rewards/accuracies``); the margin is the
mean of ``r(x, chosen) - r(x, rejected)``.

Held-out pairs: the run's own held-out split (its data section, prepared as training prepared it), or every
pair of ``--data FILE`` read with the run's data settings (columns, chat template, lengths). Log-probs come
from the training code's per-token path (:class:`~sparsealign.models.logprobs.TokenModel` on
:func:`~sparsealign.data.collate.collate_pairs` batches: chosen and rejected rows in one forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sparsealign.eval.metrics.base import MetricContext, MetricUnavailable


def pair_log_ratios(
    policy: Any, reference: Any, pairs: Sequence[Any], pad_id: int, batch_size: int = 16
) -> tuple[list[float], list[float]]:
    """``log pi(y|x) - log pi_ref(y|x)`` of each pair's chosen and of its rejected response."""
    import torch

    from sparsealign.data.collate import collate_pairs
    from sparsealign.models.generate import model_device
    from sparsealign.models.logprobs import TokenModel

    device = model_device(policy)
    policy_tokens, reference_tokens = TokenModel(policy), TokenModel(reference)
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            items = pairs[start : start + batch_size]
            batch = collate_pairs(items, pad_id).to(device)
            ratio = (policy_tokens(batch).logps - reference_tokens(batch).logps).double().sum(dim=1)
            chosen.extend(ratio[: len(items)].tolist())
            rejected.extend(ratio[len(items) :].tolist())
    return chosen, rejected


def implicit_reward_accuracy(
    chosen: Sequence[float], rejected: Sequence[float], beta: float
) -> dict[str, float]:
    """Accuracy and mean margin of ``beta * log-ratio`` (chosen vs rejected) over the pairs."""
    margins = [beta * (c - r) for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)
    return {
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "num_pairs": n,
        "beta": beta,
    }


def held_out_pairs(cfg: Any, tokenizer: Any, reference: Any, data: str | None) -> list[Any]:
    """The run's held-out pairs, or all pairs of the file ``data`` (read with the run's data settings)."""
    if data is not None:
        from sparsealign.data.formats import load_examples
        from sparsealign.data.prepare import to_pairs

        data_cfg = dataclasses.replace(cfg.data, path=data, dataset=None, source=None, eval_fraction=0.0)
        examples, _, _ = load_examples(data_cfg)
        return to_pairs(examples, tokenizer, data_cfg, data)
    from sparsealign.data.prepare import prepare_data
    from sparsealign.models.loading import ModelBundle

    # the reference is the untrained policy: a source that samples pairs (imdb) samples them from it
    return prepare_data(cfg, ModelBundle(reference, tokenizer)).eval


def reward_accuracy(ctx: MetricContext) -> dict[str, float]:
    """The ``reward-accuracy`` metric of the run given as ``--model``."""
    from sparsealign.models.generate import pad_id_for

    assert ctx.policy is not None and ctx.run_config is not None and ctx.run_reference is not None
    cfg = ctx.run_config()
    policy = ctx.policy()
    reference = ctx.run_reference()
    pairs = held_out_pairs(cfg, policy.tokenizer, reference, ctx.data)
    if not pairs:
        raise MetricUnavailable(
            "the run has no held-out pairs (data.eval_fraction=0?): pass --data FILE with preference pairs"
        )
    chosen, rejected = pair_log_ratios(
        policy.model, reference, pairs, pad_id_for(policy.tokenizer), ctx.batch_size
    )
    beta = getattr(cfg.method, "beta", None)
    beta = 1.0 if beta is None else float(beta)
    return implicit_reward_accuracy(chosen, rejected, beta)
