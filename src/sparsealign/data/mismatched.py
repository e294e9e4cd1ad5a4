"""KTO's mismatched responses: each prompt continued by responses written for other prompts.

KTO's reference point z₀ estimates KL(π ‖ π_ref) on such (x, y') rows (Ethayarajh et al. 2024, §4). TRL's
``KTOTrainer`` and HALOs' ``UnpairedPreferenceDataLoader`` first flatten a paired batch of B pairs into 2B
unpaired items, B desirable (the chosen responses) and B undesirable (the rejected ones), and pair each
item's prompt with the completion of a neighbouring item: HALOs takes item i + 1 of the batch (cyclically;
"desirable/undesirable status does not matter"), TRL shifts the completions by one within the flattened
data, which it lays out chosen first, then rejected. The mismatched completions are therefore the same mix
of desirable and undesirable responses as the rewarded ones.

Here the same rule is applied once per split, when the data is prepared, so that it does not depend on
batching or shuffling: a pair always gets the same two mismatched rows and a reference cache can hold them.

The rule. The split's n pairs are flattened into 2n items in the batch layout (and TRL's): items 0 … n−1
are the chosen responses of pairs 0 … n−1, items n … 2n−1 their rejected responses. Item k takes the
response of the first item after k, cyclically, whose prompt differs from item k's. So pair i's *chosen
row* continues its prompt with the chosen response of the next pair with another prompt, and its
*rejected row* with the rejected response of that pair; at the end of the split the chosen rows wrap onto
the rejected responses and the rejected rows onto the chosen ones, and over a split in which no prompt
repeats, the 2n mismatched responses are exactly the n chosen and the n rejected responses. A response is
cut so that prompt + response fit ``max_length`` (at least one token is kept). A split whose pairs all
share one prompt has no other prompt to borrow from: each item then takes the next item's response.

Binary feedback (labelled items, whose rejected side repeats the completion and is never forwarded) is
already flat: the split's n items are the n completions, item k takes the completion of the first item
after k, cyclically, with another prompt (HALOs' item i + 1; its label does not matter), and both entries
of ``mismatched_ids`` are that one response, so that the reference cache stores it under the same key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

from sparsealign.data.examples import TokenizedPair


def _next_with_other_key(keys: Sequence[Hashable]) -> list[int]:
    """For each index k, the first index after k (cyclically) whose key differs from ``keys[k]``; the
    plain next index ``(k + 1) % n`` when every key is the same. One backward pass over the doubled
    sequence: O(n) however long the runs of one key are."""
    n = len(keys)
    if len(set(keys)) <= 1:
        return [(k + 1) % n for k in range(n)]
    nxt = [0] * (2 * n)
    for j in range(2 * n - 2, -1, -1):
        k = (j + 1) % n
        nxt[j] = k if keys[k] != keys[j % n] else nxt[j + 1]
    return nxt[:n]


def with_mismatched_responses(pairs: Sequence[TokenizedPair], max_length: int) -> list[TokenizedPair]:
    """Copies of ``pairs`` with ``mismatched_ids`` set to (response for the chosen row, response for the
    rejected row), chosen by the rule of the module docstring and cut so that the pair's prompt plus the
    response fit ``max_length``."""
    n = len(pairs)
    unpaired = n > 0 and all(p.label is not None for p in pairs)
    copies = 1 if unpaired else 2
    prompts = [tuple(p.prompt_ids) for p in pairs] * copies
    responses = [p.chosen_ids for p in pairs] + ([] if unpaired else [p.rejected_ids for p in pairs])
    partner = _next_with_other_key(prompts)
    out = []
    for i, pair in enumerate(pairs):
        room = max(1, max_length - len(pair.prompt_ids))
        rows = (i, i) if unpaired else (i, n + i)
        chosen_row, rejected_row = (list(responses[partner[k]][:room]) for k in rows)
        out.append(dataclasses.replace(pair, mismatched_ids=(chosen_row, rejected_row)))
    return out
