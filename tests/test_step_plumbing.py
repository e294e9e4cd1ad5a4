"""The step's plumbing, each against the straightforward computation: host-side counts equal the mask's, the
prefetched batches equal those collated in line, and the inference-mode reference equals a no-grad one."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from sparsealign.data.collate import collate_pairs
from sparsealign.models.logprobs import TokenModel
from sparsealign.train.prefetch import Prefetcher
from sparsealign.train.step import _ordinary
from tiny_models import random_pairs, tiny_llama


@pytest.mark.parametrize("side", ["right", "left"])
def test_host_counts_equal_the_mask(side):
    batch = collate_pairs(random_pairs(5, seed=2), pad_id=2, padding_side=side)
    mask = batch.response_mask
    assert batch.response_ids.flatten()[batch.response_flat].tolist() == batch.response_ids[mask].tolist()
    assert list(batch.response_offsets) == [0, *mask.sum(1).cumsum(0).tolist()]
    assert batch.num_tokens == int(batch.attention_mask.sum())
    packed = batch.packed()
    assert packed.response_offsets == batch.response_offsets and packed.num_tokens == batch.num_tokens


def test_chosen_and_rejected_rows_slice_with_host_offsets_as_with_the_mask():
    batch = collate_pairs(random_pairs(4, seed=1), pad_id=2)
    out = TokenModel(tiny_llama())(batch)
    by_mask = dataclasses.replace(out, offsets=())  # counted from the mask on the device
    assert out.offsets and out.head_inputs.shape[0] == out.offsets[-1]
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(
            getattr(out, side)(4).head_inputs, getattr(by_mask, side)(4).head_inputs, rtol=0, atol=0
        )
    assert out.rejected(4).offsets == tuple(o - out.offsets[4] for o in out.offsets[4:])


def test_prefetched_steps_equal_in_line_ones_and_run_ahead_on_another_thread():
    threads = {}

    def prepare(step: int) -> int:
        threads[step] = threading.current_thread().name
        return step * 10

    prefetch = Prefetcher(prepare, total=4)
    assert [prefetch.get(s) for s in range(4)] == [0, 10, 20, 30]
    assert threads[0] == threading.current_thread().name  # nothing was ahead of the first step
    assert all(threads[s].startswith("sparsealign-collate") for s in (1, 2, 3))
    assert prefetch.get(2) == 20  # out of order (a resumed run): computed on the spot
    prefetch.close()


def test_a_failing_collation_is_raised_in_the_step_that_needs_it():
    def prepare(step: int) -> int:
        if step == 1:
            raise ValueError("bad row in step 1")
        return step

    prefetch = Prefetcher(prepare, total=3)
    assert prefetch.get(0) == 0
    with pytest.raises(ValueError, match="bad row in step 1"):
        prefetch.get(1)
    prefetch.close()


def test_inference_mode_reference_outputs_are_ordinary_and_equal_no_grad():
    model = tiny_llama()
    batch = collate_pairs(random_pairs(3), pad_id=2)
    with torch.no_grad():
        plain = TokenModel(model)(batch, layers=(1,))
    with torch.inference_mode():
        fast = TokenModel(model)(batch, layers=(1,))
    assert fast.logps.is_inference()
    ordinary = _ordinary(fast)
    assert not ordinary.logps.is_inference() and not ordinary.layers[1].is_inference()
    torch.testing.assert_close(ordinary.logps, plain.logps, rtol=0, atol=0)
    torch.testing.assert_close(ordinary.layers[1], plain.layers[1], rtol=0, atol=0)
    weight = torch.nn.Parameter(torch.ones(64))
    (ordinary.layers[1] * weight).sum().backward()  # autograd may save it (an inference tensor may not)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        (fast.layers[1] * weight).sum().backward()


def test_rows_past_the_end_are_empty_as_in_tensor_slicing():
    """Binary-feedback batches hold the completions' rows alone: their "rejected" rows are empty."""
    batch = collate_pairs(random_pairs(3, seed=6), pad_id=2, chosen_only=True)
    out = TokenModel(tiny_llama())(batch)
    rejected = out.rejected(3)
    assert rejected.mask.shape[0] == 0 and rejected.head_inputs.shape[0] == 0 and rejected.offsets == (0,)
    chosen = out.chosen(3)
    assert chosen.head_inputs.shape[0] == int(batch.response_mask.sum())
