"""KTO's mismatched responses: each prompt continued by a response written for another prompt.

KTO's reference point estimates KL(π ‖ π_ref) on such (x, y') pairs (Ethayarajh et al. 2024, §4). HALOs and
TRL pick y' by rotating the responses of a batch; here the partner is fixed per pair when the data is
prepared, independent of batching and shuffling, so the same pair always gets the same y' and a reference
cache can hold its log-probs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sparsealign.data.examples import TokenizedPair


def with_mismatched_responses(pairs: Sequence[TokenizedPair], max_length: int) -> list[TokenizedPair]:
    """Copies of ``pairs`` with ``mismatched_ids`` set: the chosen response of the next pair (cyclically,
    in split order) whose prompt differs, cut so that prompt + response fit ``max_length``. A split whose
    pairs all share one prompt has no other prompt to borrow from: the next pair's response is used."""
    n = len(pairs)
    prompts = [tuple(p.prompt_ids) for p in pairs]
    # partner[i]: the first index after i (cyclically) with another prompt, found in one backward pass
    # over the doubled sequence: O(n) however long the runs of one prompt are
    partner = [(i + 1) % n for i in range(n)] if n else []
    if len(set(prompts)) > 1:
        nxt = [0] * (2 * n)
        for j in range(2 * n - 2, -1, -1):
            k = (j + 1) % n
            nxt[j] = k if prompts[k] != prompts[j % n] else nxt[j + 1]
        partner = nxt[:n]
    out = []
    for pair, j in zip(pairs, partner, strict=True):
        room = max(1, max_length - len(pair.prompt_ids))
        out.append(dataclasses.replace(pair, mismatched_ids=list(pairs[j].chosen_ids[:room])))
    return out
