"""Padding-free batches: the real tokens of a padded batch laid end to end in fewer rows.

A padded batch ``[N, L]`` computes ``N x L`` positions although only ``sum(lengths)`` are real. Packing
places the sequences, longest first, into the first row with room (first-fit decreasing) of ``R <= N``
rows of ``C`` positions, each sequence keeping its own position ids (``0, 1, ...``). The model is then
called with ``position_ids`` and no attention mask: transformers (``masking_utils``) reads a drop in the
position ids as a sequence boundary and builds a causal, block-diagonal mask (flash/varlen attention on a
GPU, a block-diagonal mask otherwise), so no token attends across sequences and each sequence's outputs
equal those of its padded row. Positions left at the end of a row form one more dummy block whose outputs
nobody reads.

Everything downstream stays in the padded layout: ``Batch.gather`` maps a padded column of row ``n`` to
``(row[n], column + shift[n])`` of the packed tensors, so log-probs, KL, hidden states, activations and SAE
features are gathered per response token exactly as from the padded forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_PACKED_WIDTH = 512
"""Packed rows are at most this wide, unless the batch's longest sequence is longer (then they are as wide
as it). Wider rows let short sequences share a row (less room unused at row ends) but grow the attention
matrix quadratically; at a few hundred positions its cost is small next to the MLPs of the positions saved."""


@dataclass
class Packing:
    """Model inputs of a packed batch and where each padded row went.

    ``input_ids``, ``position_ids``: ``[R, C]``; sequence ``n`` occupies row ``row[n]`` from column
    ``start[n]``, so padded column ``p`` of row ``n`` (a real token) is packed column ``p + shift[n]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    row: torch.Tensor
    shift: torch.Tensor

    def to(self, device: torch.device | str) -> Packing:
        return Packing(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.row.to(device),
            self.shift.to(device),
        )

    @property
    def num_positions(self) -> int:
        """Positions the packed forward computes (``R x C``)."""
        return self.input_ids.numel()


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity``: each item, longest first (ties by
    index), goes to the first bin with room. Deterministic; every length must be at most ``capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"a sequence of {size} tokens does not fit packed rows of {capacity}")
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(capacity - size)
    return bins


def _layout(lengths: list[int], capacity: int) -> tuple[list[list[int]], int]:
    bins = first_fit_decreasing(lengths, capacity)
    columns = max((sum(lengths[i] for i in b) for b in bins), default=0)
    return bins, max(columns, 1)  # rows no wider than their fullest


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int | None = None) -> Packing:
    """Pack the real tokens of a padded ``[N, L]`` batch (left or right padding) into ``R`` rows of ``C``
    positions. With ``width`` the rows hold at most ``max(width, L)`` positions; by default the capacity
    among ``L, 2L, 4L, ...`` (up to :data:`MAX_PACKED_WIDTH`) that computes the fewest positions ``R x C`` is
    taken (the narrower one on a tie). Runs on the host, at collation."""
    ids = input_ids.cpu()
    mask = attention_mask.cpu().bool()
    lengths = mask.sum(1).tolist()
    first = (mask.long().cumsum(1) == 0).sum(1).tolist()  # padded column of each row's first real token
    longest = ids.shape[1]
    if width is not None:
        capacities = [max(width, longest)]
    else:
        capacities = [longest]
        while capacities[-1] * 2 <= MAX_PACKED_WIDTH:
            capacities.append(capacities[-1] * 2)
    layouts = [_layout(lengths, c) for c in capacities]
    bins, columns = min(layouts, key=lambda layout: len(layout[0]) * layout[1])  # first minimum: narrowest
    packed_ids = torch.zeros(len(bins), columns, dtype=ids.dtype)
    positions = torch.zeros(len(bins), columns, dtype=torch.long)
    row = torch.zeros(len(lengths), dtype=torch.long)
    shift = torch.zeros(len(lengths), dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for n in members:
            size = lengths[n]
            packed_ids[r, start : start + size] = ids[n, first[n] : first[n] + size]
            positions[r, start : start + size] = torch.arange(size)
            row[n], shift[n] = r, start - first[n]
            start += size
        positions[r, start:] = torch.arange(columns - start)  # the unused end: one dummy block
    return Packing(packed_ids, positions, row, shift)
