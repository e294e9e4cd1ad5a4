"""KL of the samples to a reference model, teacher-forced on the shared per-token log-prob path.

For a sample ``y`` of prompt ``x`` drawn from the policy ``pi``:

* ``kl_seq = log pi(y|x) - log pi_ref(y|x) = sum_t [log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t)]``; its mean
  over samples is the Monte-Carlo estimate of the sequence KL(pi || pi_ref), as in the SparsePO paper's IMDB
  frontier and :mod:`sparsealign.eval.report`;
* ``kl_per_token = kl_seq / |y|``;
* ``kl_exact_per_token``: the mean over the sample's positions of the exact KL over the vocabulary,
  ``sum_v pi(v|x,y_<t) (log pi(v|x,y_<t) - log pi_ref(v|x,y_<t))``, and ``kl_exact_seq`` its sum over the
  positions: the same expectations with the next-token sampling noise removed.

Both come from one forward of each model: the policy's final hidden rows at the sampled positions, then
the reference's forward through :class:`~sparsealign.models.logprobs.TokenModel` with the policy as its
"reference head", which yields ``log pi_ref``, ``log pi`` and the per-token KL(pi || pi_ref) from one pair
of chunked head calls (no ``[N, T, V]`` tensor is kept).

Only samples drawn at temperature 1 (with no nucleus cut) are draws from ``pi`` itself; at other
temperatures the numbers are the same expectations under the tempered sampler (the table shows them per
temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sparsealign.eval.metrics.base import MetricContext, MetricUnavailable


def teacher_forced_kl(
    policy: Any,
    reference: Any,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
) -> dict[str, list[float | None]]:
    """Per sample ``kl_seq``, ``kl_per_token``, ``kl_exact_seq``, ``kl_exact_per_token`` (module docstring);
    ``None`` for an empty output. Both models must share the tokenizer and sit on one device."""
    import torch

    from sparsealign.data.collate import collate_sequences
    from sparsealign.models.generate import model_device
    from sparsealign.models.logprobs import TokenModel, output_head

    device = model_device(policy)
    policy_tokens, reference_tokens = TokenModel(policy), TokenModel(reference)
    policy_head = output_head(policy)
    out: dict[str, list[float | None]] = {
        k: [] for k in ("kl_seq", "kl_per_token", "kl_exact_seq", "kl_exact_per_token")
    }
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            stop = start + batch_size
            batch = collate_sequences(prompt_ids[start:stop], output_ids[start:stop], pad_id).to(device)
            hidden = policy_tokens(batch, head=False)
            scored = reference_tokens(batch, reference=hidden, reference_head=policy_head)
            # roles swapped: `logps` are the reference's, `reference_logps` the policy's, `kl` is KL(pi || ref)
            mask = batch.response_mask
            lengths = mask.sum(dim=1)
            ratio = ((scored.reference_logps - scored.logps) * mask).sum(dim=1).double()
            exact = (scored.kl * mask).sum(dim=1).double()
            for n, seq, ex in zip(lengths.tolist(), ratio.tolist(), exact.tolist(), strict=True):
                empty = n == 0
                out["kl_seq"].append(None if empty else seq)
                out["kl_per_token"].append(None if empty else seq / n)
                out["kl_exact_seq"].append(None if empty else ex)
                out["kl_exact_per_token"].append(None if empty else ex / n)
    return out


def _has_ids(row: dict[str, Any]) -> bool:
    return isinstance(row.get("prompt_ids"), list) and isinstance(row.get("output_ids"), list)


def text_rows(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the rows that can be teacher-forced (the exact ``prompt_ids``/``output_ids`` that
    ``sparsealign sample`` writes, or a text ``prompt`` and ``output``), all of one ``model``."""
    keep = [
        i
        for i, r in enumerate(rows)
        if _has_ids(r) or (isinstance(r.get("prompt"), str) and isinstance(r.get("output"), str))
    ]
    if not keep:
        raise MetricUnavailable("no row has token ids or a text `prompt` and `output` to teacher-force")
    models = sorted({str(rows[i].get("model")) for i in keep})
    if len(models) > 1:
        raise MetricUnavailable(
            f"the rows come from {len(models)} models ({', '.join(models[:4])}); teacher forcing scores one "
            "model's own samples: evaluate each model's rows in a file of their own"
        )
    return keep


def place(values: dict[str, list[float | None]], keep: list[int], n: int) -> dict[str, list[float | None]]:
    """Per-row columns for all ``n`` rows from the values of the ``keep`` rows (None elsewhere)."""
    out: dict[str, list[float | None]] = {}
    for name, column in values.items():
        full: list[float | None] = [None] * n
        for i, value in zip(keep, column, strict=True):
            full[i] = value
        out[name] = full
    return out


def kl(rows: list[dict[str, Any]], ctx: MetricContext) -> dict[str, list[float | None]]:
    """The ``kl`` metric: the policy (``--model``) against ``--reference`` on each row's prompt + output."""
    from sparsealign.eval.metrics.models import encode_rows
    from sparsealign.models.generate import pad_id_for

    assert ctx.policy is not None and ctx.reference is not None
    keep = text_rows(rows)
    policy = ctx.policy()
    prompt_ids, output_ids = encode_rows(policy.tokenizer, [rows[i] for i in keep])
    values = teacher_forced_kl(
        policy.model, ctx.reference(), prompt_ids, output_ids, pad_id_for(policy.tokenizer), ctx.batch_size
    )
    return place(values, keep, len(rows))
