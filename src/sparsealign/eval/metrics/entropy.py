"""Predictive entropy of the policy along its samples, teacher-forced.

For a sample ``y`` of prompt ``x``: ``entropy = (1/|y|) sum_t H(pi(.|x, y_<t))`` with
``H(p) = -sum_v p_v log p_v = logsumexp(l) - sum_v softmax(l)_v l_v`` for the logits ``l`` at the position
that predicts ``y_t`` (nats). Lower entropy: a more peaked, more deterministic policy. The final hidden
rows at those positions come from the shared per-token path (:class:`~sparsealign.models.logprobs.TokenModel`
with ``head=False``); the output head then runs on them in chunks, so no ``[N, T, V]`` tensor is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sparsealign.eval.metrics.base import MetricContext

CHUNK = 512


def token_entropies(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
) -> list[float | None]:
    """Mean next-token entropy (nats) along each output; ``None`` for an empty output."""
    import torch

    from sparsealign.data.collate import collate_sequences
    from sparsealign.models.generate import model_device
    from sparsealign.models.logprobs import TokenModel, output_head

    device = model_device(model)
    tokens, head = TokenModel(model), output_head(model)
    out: list[float | None] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            stop = start + batch_size
            batch = collate_sequences(prompt_ids[start:stop], output_ids[start:stop], pad_id).to(device)
            hidden = tokens(batch, head=False).head_inputs  # [M, d], response_mask order
            parts = []
            for i in range(0, hidden.shape[0], CHUNK):
                logits = head(hidden[i : i + CHUNK]).float()
                parts.append(torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1))
            flat = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
            mask = batch.response_mask
            per_token = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, flat)
            lengths = mask.sum(dim=1)
            sums = per_token.sum(dim=1).double()
            out.extend(
                None if n == 0 else s / n for n, s in zip(lengths.tolist(), sums.tolist(), strict=True)
            )
    return out


def entropy(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, list[float | None]]:
    """The ``entropy`` metric: the policy's (``--model``) mean next-token entropy along each row's output."""
    from sparsealign.eval.metrics.kl import place, text_rows
    from sparsealign.eval.metrics.models import encode_rows
    from sparsealign.models.generate import pad_id_for

    assert ctx.policy is not None
    keep = text_rows(rows)
    policy = ctx.policy()
    prompt_ids, output_ids = encode_rows(policy.tokenizer, [rows[i] for i in keep])
    values = token_entropies(
        policy.model, prompt_ids, output_ids, pad_id_for(policy.tokenizer), ctx.batch_size
    )
    return place({"entropy": values}, keep, len(rows))
