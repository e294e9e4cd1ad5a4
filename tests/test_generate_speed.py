"""The fast sampling loop (``sparsealign.models.generate``) against the straightforward computation.

Greedy decoding equals a plain ``model.generate`` loop, one prompt at a time; sampled tokens equal the
documented inverse-CDF pick of the plain (uncached, unbatched) forward's warped distribution; the empirical
first-token distribution matches the model's; each prompt is prefilled once, prompts are batched by length
and finished rows leave the batch. The models run in float64 so that batching cannot flip a token by
float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from sparsealign.models.generate import inverse_cdf_pick, prompt_uniforms, sample_continuations
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

EOS = 2


class Tok:
    """The two attributes sampling reads from a tokenizer."""

    def __init__(self, eos: int = EOS, pad: int = 0) -> None:
        self.eos_token_id = eos
        self.pad_token_id = pad


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()] for n in lengths]


LENGTHS = [4, 7, 2, 7, 5, 3, 4]


def eos_biased(model: torch.nn.Module, bias: float) -> torch.nn.Module:
    """A copy whose output head favours EOS by ``bias`` logits: rows end at different steps."""
    model = copy.deepcopy(model)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOS] = bias
    model.lm_head = head
    return model


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: next((t + 1 for t, tok in enumerate(tokens) if tok == eos), len(tokens))]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_greedy_equals_plain_generate_one_prompt_at_a_time(build):
    model = build().double()
    prompts = prompts_of(LENGTHS)
    # Pick as EOS a token the plain greedy loop produces mid-way for some prompts, so rows stop early.
    plain_free = [
        model.generate(
            torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    counts = torch.bincount(torch.tensor([t for out in plain_free for t in out[:8]]), minlength=VOCAB)
    eos = int(counts.argmax())
    model.generation_config.eos_token_id = eos
    plain = [
        cut_at_eos(
            model.generate(
                torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0
            )[0, len(p) :].tolist(),
            eos,
        )
        for p in prompts
    ]
    assert any(len(out) < 10 for out in plain) and any(len(out) == 10 for out in plain)
    fast = sample_continuations(model, Tok(eos=eos), prompts, 3, 10, temperature=0.0, batch_size=3)
    assert [per[0] for per in fast] == plain
    assert all(per[0] == per[1] == per[2] for per in fast)


def warpers(temperature: float, top_p: float) -> LogitsProcessorList:
    return LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])


def test_sampled_tokens_are_the_documented_pick_from_the_plain_forward():
    """Every sampled token equals the inverse-CDF pick, with the documented uniform ``U(seed, i)[j, t]``,
    from the warped distribution of one uncached, unpadded forward over ``prompt + tokens`` (position
    ``len(prompt) + t - 1`` predicts token ``t``)."""
    model = eos_biased(tiny_llama().double(), 2.5)
    prompts = prompts_of(LENGTHS)
    seed, k, steps, temperature, top_p = 11, 3, 9, 0.8, 0.9
    out = sample_continuations(model, Tok(), prompts, k, steps, temperature, top_p, seed=seed, batch_size=3)
    warp = warpers(temperature, top_p)
    ended_early = 0
    with torch.no_grad():
        for i, (prompt, per) in enumerate(zip(prompts, out, strict=True)):
            uniforms = prompt_uniforms(seed, i, k, steps)
            for j, tokens in enumerate(per):
                assert 1 <= len(tokens) <= steps
                assert EOS not in tokens[:-1] and (len(tokens) == steps or tokens[-1] == EOS)
                ended_early += len(tokens) < steps
                logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
                expected = inverse_cdf_pick(warp(None, logits), uniforms[j, : len(tokens)])
                assert expected.tolist() == tokens, (i, j)
    assert ended_early >= 3  # finished rows left the batch while others went on


def test_first_token_distribution_matches_the_model():
    model = tiny_llama().double()
    prompt = prompts_of([5])[0]
    n, temperature, top_p = 6000, 1.3, 0.85
    (samples,) = sample_continuations(model, Tok(eos=-1), [prompt], n, 1, temperature, top_p, seed=3)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1].float()
    probs = torch.softmax(warpers(temperature, top_p)(None, logits).double(), -1)[0]
    counts = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=VOCAB).double()
    assert counts[probs == 0].sum() == 0  # nothing outside the nucleus
    assert 20 < int((probs > 0).sum()) < VOCAB  # the nucleus really truncates
    kept = probs > 0
    expected = probs[kept] * n
    assert chisquare(counts[kept].numpy(), expected.numpy()).pvalue > 1e-3


def test_inverse_cdf_pick_hand_cases():
    scores = torch.log(torch.tensor([[0.2, 0.0, 0.5, 0.3]]))  # token 1 excluded (-inf)
    pick = lambda u: int(inverse_cdf_pick(scores, torch.tensor([u], dtype=torch.float64)))  # noqa: E731
    assert [pick(0.0), pick(0.19), pick(0.21), pick(0.69), pick(0.71), pick(1 - 1e-12)] == [0, 0, 2, 2, 3, 3]
    assert pick(1.0) == 3  # an overshoot falls back to the last token of non-zero probability


def test_prefill_once_batch_by_length_and_drop_finished_rows():
    model = eos_biased(tiny_llama(), 3.0)
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompts = prompts_of([3, 5, 3, 5, 4])
        k, steps = 4, 12
        out = sample_continuations(model, Tok(), prompts, k, steps, seed=0, batch_size=2)
    finally:
        handle.remove()
    prefills = [s for s in shapes if s[1] > 1]
    # sorted by (length, index): [0, 2] (3 tokens, no padding), [4, 1] (4 and 5), [3] (5): one row per prompt
    assert prefills == [(2, 3), (2, 5), (1, 5)]
    # After step t a row is fed back iff it has a token t + 1 (it did not end with EOS at t): the batch holds
    # exactly the unfinished rows, and a bucket stops when none is left.
    expected = []
    for bucket in ([0, 2], [4, 1], [3]):
        lengths = [len(s) for i in bucket for s in out[i]]
        alive = [sum(n > t + 1 for n in lengths) for t in range(steps - 1)]
        expected += [a for a in alive if a > 0]
    assert [s[0] for s in shapes if s[1] == 1] == expected
    assert expected[0] < 2 * k  # some rows ended at their first token; k rows per prompt otherwise
    assert min(len(s) for per in out for s in per) < steps


def test_seed_contract():
    model = tiny_llama()
    prompts = prompts_of(LENGTHS)
    rng_before = torch.get_rng_state()
    torch.manual_seed(123)
    a = sample_continuations(model, Tok(), prompts, 3, 8, seed=5, batch_size=2)
    torch.manual_seed(456)  # the caller's RNG state does not matter
    b = sample_continuations(model, Tok(), prompts, 3, 8, seed=5, batch_size=7)  # nor does the batching
    assert a == b
    torch.set_rng_state(rng_before)
    sample_continuations(model, Tok(), prompts, 3, 8, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # and it is left untouched
    # Prompt i's samples depend on (seed, i, its ids) only, not on the other prompts.
    other = prompts_of(LENGTHS, seed=1)
    mixed = [prompts[0], other[1], prompts[2], other[3], prompts[4], other[5], prompts[6]]
    c = sample_continuations(model, Tok(), mixed, 3, 8, seed=5, batch_size=2)
    assert [c[i] for i in (0, 2, 4, 6)] == [a[i] for i in (0, 2, 4, 6)]
    d = sample_continuations(model, Tok(), prompts, 3, 8, seed=6, batch_size=2)
    assert d != a
    assert len({tuple(s) for per in a for s in per}) == sum(len(per) for per in a)  # samples differ
