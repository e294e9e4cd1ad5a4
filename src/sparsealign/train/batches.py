"""Deterministic batch order: which pairs each process sees at each micro-step of each optimizer step.

The order depends only on the seed and the optimizer step, so resuming at step ``s`` continues with
exactly the batches the uninterrupted run would have seen, and the same global batch is split the same
way whatever the number of processes: global batch = ``batch_size x grad_accum x num_processes``.

Length grouping (``train.group_by_length``, with ``lengths``): inside each optimizer step's global batch the
examples are sorted by length, longest first, before they are dealt into micro-batches, so each micro-batch
holds similar lengths and pads less. Each step still sees exactly the same examples, and every micro-batch
has ``batch_size`` of them, so the step's gradient (the mean of the micro-batches' means) is unchanged: the
losses equal the ungrouped run's (for losses that are means over pairs; SFT with ``sft_normalize=token``
divides each micro-batch by its own token count, so grouping reweights its micro-batches). It only matters with several micro-batches per step (``grad_accum`` or
processes); unlike a sort across the epoch (transformers' ``group_by_length``) it never changes which
examples share an optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    batch_size: int
    grad_accum: int
    num_processes: int
    seed: int
    lengths: tuple[int, ...] | None = (
        None  # per example: group micro-batches by length (see module docstring)
    )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of this process's ``grad_accum`` micro-batches at optimizer step ``step``."""
        epoch, index = self.position(step)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        chunk = order[index * self.global_batch : (index + 1) * self.global_batch].tolist()
        if self.lengths is not None:
            lengths = self.lengths
            chunk.sort(key=lambda i: -lengths[i])  # stable: ties keep the seeded order
        b, world = self.batch_size, self.num_processes
        return [chunk[(i * world + rank) * b : (i * world + rank + 1) * b] for i in range(self.grad_accum)]


def shard(items: Sequence, batch_size: int, rank: int, world: int) -> list[tuple[list, bool]]:
    """Evaluation batches for this process, dealt round-robin, nothing dropped.

    Every process gets the same number of batches (collective operations inside a sharded forward need
    that); a process that runs out repeats the first batch, flagged ``False`` so that it is not counted.
    """
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    mine = [(b, True) for b in batches[rank::world]]
    per_process = -(-len(batches) // world)
    return mine + [(batches[0], False)] * (per_process - len(mine))
