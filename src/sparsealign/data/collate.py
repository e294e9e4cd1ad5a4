"""Padding token-exact sequences into model batches, and the response-aligned index that the log-prob path uses.

Every per-token tensor that leaves the model is *response-aligned*: ``[N, T]`` where column ``t`` is the
``t``-th response token of the row and ``T`` is the longest response in the batch. The collator records,
for each response token, the input position whose logits predict it (``response_index``), so the model
path can gather exactly those positions and never touches prompt or padding logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from sparsealign.data.examples import TokenizedPair
from sparsealign.data.packing import Packing, pack
from sparsealign.errors import DataError

PackingMode = Literal["auto"] | bool
"""``train.packing``: always pack the forward's rows, never, or (``"auto"``) when it saves enough."""

PACK_BELOW = 0.85
"""``train.packing=auto`` packs a batch when the packed forward computes at most this fraction of the padded
one's positions: below that the positions saved outweigh packing's costs (wider attention, the gather)."""


@dataclass
class Batch:
    """Model inputs plus the response-aligned index.

    ``input_ids``, ``attention_mask``, ``position_ids``: ``[N, L]``.
    ``response_index[n, t]``: the position in ``L`` whose logits predict response token ``t`` of row ``n``.
    ``response_ids``, ``response_mask``: ``[N, T]``, the target tokens and which of them are real.
    For preference pairs, rows ``[0, B)`` are the chosen responses and rows ``[B, 2B)`` the rejected ones
    (one concatenated forward), with ``num_pairs = B``; for unpaired data ``num_pairs = 0``.
    ``labels``: binary feedback (bool ``[B]``, desirable or not) of a batch of labelled items, whose rows are
    the chosen rows alone; None for preference pairs.
    ``packing``: when set, the forward runs on these packed rows instead of the padded ones
    (:mod:`sparsealign.data.packing`); everything else keeps the padded layout.
    Counted on the host at collation, so that the step never waits on the device for them:
    ``response_flat`` (``[M]``, where the ``M`` real response tokens are in the flattened ``[N·T]``),
    ``response_offsets`` (``N + 1`` running totals of real response tokens per row) and ``num_tokens`` (real
    tokens, prompts included).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_index: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    num_pairs: int = 0
    labels: torch.Tensor | None = None
    packing: Packing | None = None
    response_flat: torch.Tensor | None = None
    response_offsets: tuple[int, ...] = ()
    num_tokens: int = 0

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), (torch.Tensor, Packing))
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Batch(**moved)

    def packed(self, width: int | None = None) -> Batch:
        """This batch with its forward on packed rows (:func:`sparsealign.data.packing.pack`)."""
        return replace(self, packing=pack(self.input_ids, self.attention_mask, width))

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of the decoder's forward: the padded rows with their attention mask, or the packed
        rows with their position ids and no mask (transformers then masks attention per packed sequence)."""
        if self.packing is None:
            return {
                "input_ids": self.input_ids,
                "attention_mask": self.attention_mask,
                "position_ids": self.position_ids,
            }
        return {
            "input_ids": self.packing.input_ids,
            "attention_mask": None,
            "position_ids": self.packing.position_ids,
        }

    @property
    def forward_shape(self) -> tuple[int, int]:
        """``(rows, positions)`` of the tensors the forward produces: ``[N, L]`` padded, ``[R, C]`` packed."""
        ids = self.input_ids if self.packing is None else self.packing.input_ids
        return ids.shape[0], ids.shape[1]

    def forward_positions(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where padded columns ``index`` (``[N, T]``) of each row are in the forward's tensors: ``(rows [N],
        columns [N, T])``, the padded rows themselves or where packing put them (padding columns are clamped
        into range; nothing reads them)."""
        if self.packing is None:
            return torch.arange(index.shape[0], device=index.device), index
        packing = self.packing
        columns = index + packing.shift.to(index.device).unsqueeze(1)
        return packing.row.to(index.device), columns.clamp(0, packing.input_ids.shape[1] - 1)

    def gather(self, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``out[n, t] = value[row of n, column of index[n, t]]`` for a forward output ``value`` (``[rows,
        positions, ...]``) and padded columns ``index`` (``[N, T]``, e.g. ``response_index``). Differentiable."""
        rows, columns = self.forward_positions(index.to(value.device))
        return value[rows.unsqueeze(1), columns]


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
    num_pairs: int = 0,
) -> Batch:
    """Pad ``prompt + response`` rows to one length and build the response-aligned index.

    Position ids count real tokens only (``0, 1, 2, ...`` from each row's first real token), so left and
    right padding give the same positions; this matters for absolute-position models such as GPT-2.
    """
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every row needs at least one prompt token (the first token is never predicted)")
    length = max(len(row) for row in rows)
    width = max(1, max(len(r) for r in responses))
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    response_index = torch.zeros((n, width), dtype=torch.long)
    response_ids = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, response, row) in enumerate(zip(prompts, responses, rows, strict=True)):
        offset = length - len(row) if padding_side == "left" else 0
        input_ids[i, offset : offset + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, offset : offset + len(row)] = 1
        r = len(response)
        if r:
            start = offset + len(prompt) - 1  # logits at position p-1 predict token p
            response_index[i, :r] = torch.arange(start, start + r)
            response_ids[i, :r] = torch.tensor(list(response), dtype=torch.long)
            response_mask[i, :r] = True
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0) * attention_mask  # padding at 0
    counts = [len(r) for r in responses]
    return Batch(
        input_ids,
        attention_mask,
        position_ids,
        response_index,
        response_ids,
        response_mask,
        num_pairs,
        response_flat=response_mask.flatten().nonzero().squeeze(1),
        response_offsets=tuple(itertools.accumulate(counts, initial=0)),
        num_tokens=sum(len(row) for row in rows),
    )


def apply_packing(batch: Batch, packing: PackingMode) -> Batch:
    """``batch`` with its forward packed (:meth:`Batch.packed`) under ``packing`` (``train.packing``)."""
    if packing is False:
        return batch
    packed = batch.packed()
    if packing is True or packed.packing.num_positions <= PACK_BELOW * batch.input_ids.numel():
        return packed
    return batch


def pair_labels(pairs: Sequence[TokenizedPair]) -> torch.Tensor | None:
    """The labels of binary-feedback items as a bool ``[B]`` tensor; None for preference pairs. A batch that
    mixes the two raises :class:`DataError`."""
    labelled = [p.label is not None for p in pairs]
    if not any(labelled):
        return None
    if not all(labelled):
        pair = pairs[labelled.index(False)]
        item = pairs[labelled.index(True)]
        raise DataError(
            f"A batch mixes binary feedback (labelled items, e.g. {item.origin or 'unnamed'}) with preference "
            f"pairs (e.g. {pair.origin or 'unnamed'}); train on one kind, or set data.flatten_pairs=true to "
            "turn the pairs into labelled items."
        )
    return torch.tensor([bool(p.label) for p in pairs], dtype=torch.bool)


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    padding_side: str = "right",
    chosen_only: bool = False,
    packing: PackingMode = False,
) -> Batch:
    """Concatenate chosen rows then rejected rows into one batch (one forward for both).

    ``chosen_only`` keeps the chosen rows alone, for methods that train on them only (SFT). Binary-feedback
    items (pairs with a ``label``) always give their chosen row (the completion) alone, and their labels
    as ``Batch.labels``. ``packing``: see :func:`apply_packing`.
    """
    labels = pair_labels(pairs)
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs]
    if not chosen_only and labels is None:
        prompts, responses = prompts * 2, responses + [p.rejected_ids for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id, padding_side, num_pairs=len(pairs))
    batch.labels = labels
    return apply_packing(batch, packing)


def collate_mismatched(
    pairs: Sequence[TokenizedPair], pad_id: int, padding_side: str = "right", packing: PackingMode = False
) -> Batch:
    """KTO's reference-point rows, laid out as :func:`collate_pairs` lays out the pairs: rows ``[0, B)``
    continue each pair's prompt with the mismatched response of its chosen row, rows ``[B, 2B)`` with the
    one of its rejected row (``mismatched_ids``); ``num_pairs = B``. Binary-feedback items (as in
    :func:`collate_pairs`) give rows ``[0, B)`` only: each item's one mismatched response. ``packing``: see
    :func:`apply_packing`."""
    if any(p.mismatched_ids is None for p in pairs):
        raise ValueError(
            "these pairs have no mismatched responses (data.mismatched.with_mismatched_responses)"
        )
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.mismatched_ids[0] for p in pairs]
    if pair_labels(pairs) is None:
        prompts, responses = prompts * 2, responses + [p.mismatched_ids[1] for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id, padding_side, num_pairs=len(pairs))
    return apply_packing(batch, packing)
