"""The memory-efficient per-token log-prob path against naive full log-softmax computations."""

from __future__ import annotations

import pytest
import torch

from sparsealign.data.collate import collate_pairs, collate_sequences
from sparsealign.models import logprobs
from sparsealign.models.logprobs import TokenModel, output_head
from tiny_models import random_pairs, tiny_gpt2, tiny_llama


def naive_logps(model, prompt, response):
    """log p(response | prompt) per token with a full log_softmax over one unpadded row."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(("chunk", "checkpointed"), [(3, True), (1000, True), (1000, False)])
def test_values_and_gradients_match_naive(build, chunk, checkpointed, monkeypatch):
    """Chunked (and checkpointed) head == one full log_softmax + gather, in values and gradients."""
    if checkpointed:
        monkeypatch.setattr(logprobs, "CHECKPOINT_MIN_BYTES", 0)
    model = build()
    pairs = random_pairs(4)
    batch = collate_pairs(pairs, pad_id=2)
    out = TokenModel(model, chunk=chunk)(batch)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    weights = torch.randn(out.logps.shape, generator=torch.Generator().manual_seed(1))
    (out.logps * weights).sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for n, (prompt, response) in enumerate(rows):
        expected = naive_logps(model, prompt, response)
        torch.testing.assert_close(out.logps[n, : len(response)], expected.detach(), atol=1e-5, rtol=1e-5)
        assert torch.all(out.logps[n, len(response) :] == 0)
        total = total + (expected * weights[n, : len(response)]).sum()
    total.backward()
    for fast, p in zip(fast_grads, model.parameters(), strict=True):
        torch.testing.assert_close(fast, p.grad, atol=1e-5, rtol=1e-4)


def test_concatenated_equals_separate_forwards():
    model = tiny_llama()
    pairs = random_pairs(3)
    both = TokenModel(model)(collate_pairs(pairs, pad_id=2))
    chosen = TokenModel(model)(
        collate_sequences([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], 2)
    )
    rejected = TokenModel(model)(
        collate_sequences([p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs], 2)
    )
    t_c, t_r = chosen.logps.shape[1], rejected.logps.shape[1]
    torch.testing.assert_close(both.chosen(3).logps[:, :t_c], chosen.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.rejected(3).logps[:, :t_r], rejected.logps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_left_and_right_padding_agree(build):
    model = build()
    pairs = random_pairs(4, seed=3)
    right = TokenModel(model)(collate_pairs(pairs, pad_id=2, padding_side="right"))
    left = TokenModel(model)(collate_pairs(pairs, pad_id=2, padding_side="left"))
    torch.testing.assert_close(left.logps, right.logps, atol=1e-5, rtol=1e-5)


def test_token_kl_matches_full_vocabulary_kl():
    policy, reference = tiny_llama(0), tiny_llama(1)
    pairs = random_pairs(2)
    batch = collate_pairs(pairs, pad_id=2)
    with torch.no_grad():
        ref_direct = TokenModel(reference)(batch).logps
        ref_out = TokenModel(reference)(batch, head=False)
    assert ref_out.logps is None
    out = TokenModel(policy, chunk=4)(batch, reference=ref_out, reference_head=output_head(reference))
    # the reference log-probs come from the same reference logits as the KL, and are returned, not written
    # into the reference's outputs
    assert ref_out.logps is None
    torch.testing.assert_close(out.reference_logps, ref_direct, atol=1e-6, rtol=1e-6)
    for n, (prompt, response) in enumerate(
        [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    ):
        ids = torch.tensor([prompt + response])
        sl = slice(len(prompt) - 1, ids.shape[1] - 1)
        lp = torch.log_softmax(policy(ids).logits[0, sl], -1)
        lr = torch.log_softmax(reference(ids).logits[0, sl], -1)
        expected = (lr.exp() * (lr - lp)).sum(-1)
        torch.testing.assert_close(out.kl[n, : len(response)], expected, atol=1e-5, rtol=1e-4)
        assert torch.all(out.kl[n, len(response) :] == 0)
    # identical models give zero KL
    same = TokenModel(reference)(batch, reference=ref_out, reference_head=output_head(reference))
    torch.testing.assert_close(same.kl, torch.zeros_like(same.kl), atol=1e-6, rtol=0)


def test_hidden_layers_only_when_asked():
    model = tiny_llama()
    batch = collate_pairs(random_pairs(2), pad_id=2)
    plain = TokenModel(model)(batch)
    assert plain.layers == {} and plain.kl is None
    out = TokenModel(model)(batch, layers=[0, 2])
    full = model(
        batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=True,
    )
    n, t = 1, 0
    pos = batch.response_index[n, t]
    torch.testing.assert_close(out.layers[2][n, t], full.hidden_states[2][n, pos])
    assert torch.all(out.layers[0][~batch.response_mask] == 0)
