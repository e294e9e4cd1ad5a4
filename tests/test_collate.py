"""Golden tensors for the collator: padding, position ids and the response-aligned index."""

from __future__ import annotations

import torch

from sparsealign.data.collate import collate_pairs
from sparsealign.data.examples import TokenizedPair

PAIRS = [TokenizedPair([1, 5], [6, 7, 2], [8, 2]), TokenizedPair([1], [9, 2], [10, 11, 12, 2])]


def test_right_padding_golden():
    b = collate_pairs(PAIRS, pad_id=0)
    assert b.num_pairs == 2
    assert b.input_ids.tolist() == [
        [1, 5, 6, 7, 2],  # chosen 0
        [1, 9, 2, 0, 0],  # chosen 1
        [1, 5, 8, 2, 0],  # rejected 0
        [1, 10, 11, 12, 2],  # rejected 1
    ]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4]]
    # logits at position p-1 predict token p: response of chosen 0 starts at input position 2
    assert b.response_index.tolist() == [[1, 2, 3, 0], [0, 1, 0, 0], [1, 2, 0, 0], [0, 1, 2, 3]]
    assert b.response_ids.tolist() == [[6, 7, 2, 0], [9, 2, 0, 0], [8, 2, 0, 0], [10, 11, 12, 2]]
    assert b.response_mask.sum(1).tolist() == [3, 2, 2, 4]
    assert b.num_tokens == 5 + 3 + 4 + 5


def test_left_padding_keeps_positions_of_real_tokens():
    b = collate_pairs(PAIRS, pad_id=0, padding_side="left")
    assert b.input_ids[1].tolist() == [0, 0, 1, 9, 2]
    assert b.position_ids[1].tolist() == [0, 0, 0, 1, 2]
    assert b.response_index[1, :2].tolist() == [2, 3]
    gathered = b.input_ids[torch.arange(4).unsqueeze(1), b.response_index + 1] * b.response_mask
    assert torch.equal(gathered, b.response_ids)


def test_chosen_only_for_unpaired_methods():
    b = collate_pairs(PAIRS, pad_id=0, chosen_only=True)
    assert b.input_ids.shape[0] == 2 and b.num_pairs == 2
    assert b.response_ids.tolist() == [[6, 7, 2], [9, 2, 0]]
