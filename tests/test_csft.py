"""Conditional SFT: control texts tokenised by the model's own tokenizer (no new vocabulary), prepended to the
responses as ids, length limits, the loss over all rows, and sampling conditioned on the good prefix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from conftest import build_bpe_tokenizer, build_word_tokenizer
from sparsealign.config import ConfigError, DataConfig
from sparsealign.data.control import (
    BAD_TOKEN,
    GOOD_TOKEN,
    conditioned_prompt,
    control_ids,
    with_control_tokens,
)
from sparsealign.data.examples import PreferenceExample, TokenizedPair
from sparsealign.data.tokenize import tokenize_pair
from sparsealign.errors import DataError
from sparsealign.methods import StepOutputs, get_method
from sparsealign.methods.csft import CSFTOptions, sampling_prompt
from sparsealign.models.builtins import tiny_gpt2_tokenizer, tiny_llama_tokenizer
from sparsealign.models.logprobs import TokenOutputs
from sparsealign.recipes.load import load_config

ROOT = Path(__file__).resolve().parents[1]
GOOD, BAD = [90, 91], [92]  # stand-in prefixes for the pure tests: two ids and one id
CSFT = get_method("csft")


def test_halos_control_texts():
    assert (GOOD_TOKEN, BAD_TOKEN) == ("<|good|>", "<|bad|>")
    assert CSFTOptions() == CSFTOptions(good_token="<|good|>", bad_token="<|bad|>")


# --- the control ids -------------------------------------------------------------------------------------


def test_control_ids_are_the_texts_own_tokens_without_specials():
    """The built-in tiny tokenizers are byte-level without merges: one id per byte, no BOS/EOS added, and
    nothing is added to the vocabulary."""
    for tokenizer in (tiny_llama_tokenizer(), tiny_gpt2_tokenizer()):
        size = len(tokenizer)
        assert control_ids(tokenizer, "<|good|>") == list(b"<|good|>")
        assert control_ids(tokenizer, "<|bad|>") == [60, 124, 98, 97, 100, 124, 62]
        assert len(tokenizer) == size


def test_control_text_with_no_ids_is_refused():
    """The word tokenizer drops whitespace: a blank control text has no ids to condition on."""
    with pytest.raises(DataError, match="tokenises to no ids"):
        control_ids(build_word_tokenizer(), "   ")
    with pytest.raises(DataError, match="tokenises to no ids"):
        control_ids(tiny_llama_tokenizer(), "")


# --- the pairs ------------------------------------------------------------------------------------------


def test_with_control_tokens_by_hand():
    """Prompt [1, 7]; chosen [8, 2] -> [90, 91, 8, 2]; rejected [9, 10, 2] -> [92, 9, 10, 2]. The prompt, the
    origin and KTO's mismatched ids are kept; the input pairs are not modified."""
    mismatched = ([11, 2], [12, 2])
    pair = TokenizedPair([1, 7], [8, 2], [9, 10, 2], origin="t.jsonl:3", mismatched_ids=mismatched)
    (out,) = with_control_tokens([pair], GOOD, BAD, max_length=16)
    assert out == TokenizedPair([1, 7], [90, 91, 8, 2], [92, 9, 10, 2], "t.jsonl:3", mismatched)
    assert pair.chosen_ids == [8, 2] and pair.rejected_ids == [9, 10, 2]


def test_responses_that_no_longer_fit_keep_their_start(caplog):
    """max_length 6, prompt of 2: room for 4 response ids. [90, 91, 8, 2] fits exactly; [92, 9, 10, 11, 2]
    loses its EOS. One truncation is logged."""
    pair = TokenizedPair([1, 7], [8, 2], [9, 10, 11, 2])
    with caplog.at_level(logging.WARNING, logger="sparsealign.data"):
        (out,) = with_control_tokens([pair], GOOD, BAD, max_length=6)
    assert out.chosen_ids == [90, 91, 8, 2]
    assert out.rejected_ids == [92, 9, 10, 11]
    assert len(out) == 6
    assert "1 responses truncated and 0 of 1 pairs dropped (too_long)" in caplog.text


def test_pairs_without_room_for_a_response_id_are_dropped(caplog):
    """max_length 5. A 3-id prompt leaves room 2: the two-id good prefix and no id of the chosen response, so
    that pair is dropped. A 2-id prompt leaves room 3: [90, 91, 8] (EOS lost) and [92, 9, 2] (fits)."""
    pairs = [TokenizedPair([1, 7, 7], [8, 2], [9, 2]), TokenizedPair([1, 7], [8, 2], [9, 2])]
    with caplog.at_level(logging.WARNING, logger="sparsealign.data"):
        out = with_control_tokens(pairs, GOOD, BAD, max_length=5)
    assert out == [TokenizedPair([1, 7], [90, 91, 8], [92, 9, 2])]
    assert "1 responses truncated and 1 of 2 pairs dropped (too_long)" in caplog.text


def test_nothing_is_logged_when_everything_fits(caplog):
    with caplog.at_level(logging.WARNING, logger="sparsealign.data"):
        out = with_control_tokens([TokenizedPair([1], [8, 2], [9, 2])], GOOD, BAD, max_length=8)
    assert len(out) == 1 and caplog.text == ""


def test_prefixes_must_differ_and_hold_ids():
    pair = TokenizedPair([1], [8, 2], [9, 2])
    with pytest.raises(DataError, match="same ids"):
        with_control_tokens([pair], [5, 6], [5, 6], max_length=8)
    with pytest.raises(DataError, match="at least one id"):
        with_control_tokens([pair], [], [5], max_length=8)


def test_conditioned_prompt_by_hand():
    assert conditioned_prompt([1, 7], GOOD) == [1, 7, 90, 91]
    assert conditioned_prompt((1,), BAD) == [1, 92]


def test_method_options_are_checked():
    cfg = load_config(None, ["method=csft", "method.good_token=(+)", "method.bad_token=(-)"])
    assert (cfg.method.good_token, cfg.method.bad_token) == ("(+)", "(-)")
    with pytest.raises(ConfigError, match="must differ"):
        load_config(None, ["method=csft", "method.bad_token=<|good|>"])
    with pytest.raises(ConfigError, match="non-empty"):
        load_config(None, ["method=csft", "method.good_token="])


# --- training and sampling see the same ids -------------------------------------------------------------

TEXTS = [
    ("the movie was", " great fun", " boring"),
    ("Review 3: the plot.", ".. a mess", "> wonderful!"),  # punctuation on both sides of the prefix
    ("I liked it ", "\nyes", " no"),
]


@pytest.mark.parametrize("build", [tiny_llama_tokenizer, tiny_gpt2_tokenizer, build_bpe_tokenizer])
def test_training_rows_are_the_text_with_the_control_string(build):
    """On tokenizers with no merge across the control text's boundaries (the built-in byte-level ones; the
    test BPE, which never saw ``<`` or ``|``), the chosen training row without its EOS equals the tokenisation
    of HALOs' text ``prompt + "<|good|>" + response`` (BOS included where the tokenizer adds one), and the
    sampling prompt is that row up to the response's own ids."""
    tokenizer = build()
    cfg = DataConfig(max_length=96, max_prompt_length=48)
    options = CSFTOptions()
    for prompt, chosen, rejected in TEXTS:
        plain = tokenize_pair(PreferenceExample(prompt, chosen, rejected), tokenizer, cfg)
        assert isinstance(plain, TokenizedPair)
        (pair,) = CSFT.prepare_pairs([plain], options, tokenizer, cfg.max_length)
        for control, text, response in (
            (GOOD_TOKEN, chosen, pair.chosen_ids),
            (BAD_TOKEN, rejected, pair.rejected_ids),
        ):
            assert response[-1] == tokenizer.eos_token_id  # appended by tokenisation, not part of the text
            assert pair.prompt_ids + response[:-1] == tokenizer(prompt + control + text)["input_ids"]
        conditioned = sampling_prompt(pair.prompt_ids, options, tokenizer)
        assert conditioned == plain.prompt_ids + control_ids(tokenizer, GOOD_TOKEN)
        assert pair.prompt_ids + pair.chosen_ids == conditioned + plain.chosen_ids
        bad = sampling_prompt(pair.prompt_ids, options, tokenizer, control="bad")
        assert pair.prompt_ids + pair.rejected_ids == bad + plain.rejected_ids


def test_a_merge_across_the_prefix_changes_the_text_tokenisation_not_the_ids():
    """A byte-level BPE whose one merge is ``.`` + ``<`` (as SmolLM2 has ``.<``): tokenising the text
    ``"was." + "<|good|>" + " ok"`` merges the prompt's last byte with the control text's first, while the
    training row keeps them apart, exactly as the sampling prompt does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    vocab[".<"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(".", "<")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    merged = vocab[".<"]

    plain = tokenize_pair(PreferenceExample("was.", " ok", " no"), tokenizer, DataConfig())
    (pair,) = CSFT.prepare_pairs([plain], CSFTOptions(), tokenizer, 64)
    text_ids = tokenizer("was." + GOOD_TOKEN + " ok")["input_ids"]
    assert merged in text_ids and merged not in pair.prompt_ids + pair.chosen_ids
    assert len(text_ids) == len(pair.prompt_ids + pair.chosen_ids) - 2  # one merge fewer, and no EOS
    assert sampling_prompt(pair.prompt_ids, CSFTOptions(), tokenizer) == pair.prompt_ids + pair.chosen_ids[:8]


# --- the loss -------------------------------------------------------------------------------------------


def test_loss_is_sft_over_chosen_and_rejected_rows():
    """Two pairs, four rows (chosen first):

        chosen   [[-1, -2, 0], [-0.5, -0.5, -1]]  mask [[1, 1, 0], [1, 1, 1]]   per-row NLL 3/2, 2/3
        rejected [[-2, -1, -1], [-3, 0, 0]]       mask [[1, 1, 1], [1, 0, 0]]   per-row NLL 4/3, 3

    loss = (3/2 + 2/3 + 4/3 + 3) / 4 = 13/8 (HALOs' token mean would be 12/9); the gradient on a scored
    token of row i is −1 / (4 |y_i|), zero elsewhere. logps/chosen = mean(−3, −2), logps/rejected =
    mean(−4, −3)."""
    logps = torch.tensor(
        [[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0], [-2.0, -1.0, -1.0], [-3.0, 0.0, 0.0]], requires_grad=True
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    policy = TokenOutputs(logps=logps, mask=mask, head_inputs=torch.zeros(int(mask.sum()), 1))
    out = CSFT.loss(StepOutputs(policy=policy, reference=None, num_pairs=2), CSFTOptions())
    assert_close(out.loss, torch.tensor(13 / 8))
    assert_close(out.per_example, torch.tensor([3 / 2, 2 / 3, 4 / 3, 3.0]))
    assert_close(out.metrics["logps/chosen"], torch.tensor(-2.5))
    assert_close(out.metrics["logps/rejected"], torch.tensor(-3.5))
    out.loss.backward()
    lengths = mask.sum(1, keepdim=True).float()
    assert_close(logps.grad, torch.where(mask, -1 / (4 * lengths), torch.zeros(())))
    assert not CSFT.needs_reference and CSFT.rows == "pairs"


# --- a trained run, sampled with the good prefix --------------------------------------------------------


def test_a_csft_run_trains_on_prefixed_rows_and_samples_with_the_good_prefix(tmp_path):
    """Train the tiny model for two steps; every train and eval pair starts its responses with the control
    ids; then, from the run folder alone (config.yaml and final/), build the conditioned prompt and sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsealign.models.generate import sample_continuations
    from sparsealign.train.loop import train

    overrides = [
        f"output_dir={tmp_path}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        "method.name=csft",
        "train.max_steps=2",
        "train.save_every=0",
    ]
    result = train(load_config(ROOT / "configs/smoke.yaml", overrides))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_metrics["loss"]))
    tokenizer = result.trained.bundle.tokenizer
    good, bad = control_ids(tokenizer, GOOD_TOKEN), control_ids(tokenizer, BAD_TOKEN)
    data = result.trained.data
    assert data.train and data.eval
    for pair in data.train + data.eval:
        assert pair.chosen_ids[: len(good)] == good and pair.rejected_ids[: len(bad)] == bad

    options = load_config(tmp_path / "config.yaml").method
    assert (options.name, options.good_token) == ("csft", "<|good|>")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # no new rows
    plain = tokenizer("Review 7: The acting")["input_ids"]
    prompt = sampling_prompt(plain, options, tokenizer)
    assert prompt == plain + list(b"<|good|>")
    (samples,) = sample_continuations(model, tokenizer, [prompt], num_samples=2, max_new_tokens=6, seed=1)
    assert len(samples) == 2
    assert all(1 <= len(s) <= 6 and all(isinstance(t, int) for t in s) for s in samples)
