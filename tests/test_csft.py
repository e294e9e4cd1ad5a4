"""Conditional SFT's control tokens: added to the tokenizer as single ids, prepended to the responses by hand,
length limits, and the sampling prompt matching the training sequence token for token."""

from __future__ import annotations

import logging

import pytest

from conftest import build_bpe_tokenizer, build_word_tokenizer
from sparsealign.config import DataConfig
from sparsealign.data.control import (
    BAD_TOKEN,
    GOOD_TOKEN,
    add_control_tokens,
    conditioned_prompt,
    with_control_tokens,
)
from sparsealign.data.examples import PreferenceExample, TokenizedPair
from sparsealign.errors import DataError

GOOD, BAD = 90, 91  # stand-in ids for the pure tests


def test_halos_control_tokens():
    assert (GOOD_TOKEN, BAD_TOKEN) == ("<|good|>", "<|bad|>")


# --- the tokenizer --------------------------------------------------------------------------------------


def test_control_tokens_are_added_once_as_single_special_ids():
    """The word tokenizer has 36 ids (0..35): the tokens become 36 and 37; adding again changes nothing."""
    tokenizer = build_word_tokenizer()
    assert len(tokenizer) == 36
    assert add_control_tokens(tokenizer) == (36, 37)
    assert len(tokenizer) == 38
    assert add_control_tokens(tokenizer) == (36, 37)
    assert len(tokenizer) == 38
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1  # existing specials untouched
    # never split, never merged with neighbours, dropped by skip_special_tokens
    ids = tokenizer("hello<|good|>world", add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.convert_tokens_to_ids(["hello", "<|good|>", "world"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


def test_control_tokens_survive_a_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_bpe_tokenizer()
    good, bad = add_control_tokens(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("<|good|><|bad|>", add_special_tokens=False)["input_ids"] == [good, bad]


def test_identical_control_tokens_are_refused():
    with pytest.raises(DataError, match="differ"):
        add_control_tokens(build_word_tokenizer(), good="<|x|>", bad="<|x|>")


# --- the pairs ------------------------------------------------------------------------------------------


def test_with_control_tokens_by_hand():
    """Prompt [1, 7]; chosen [8, 2] -> [good, 8, 2]; rejected [9, 10, 2] -> [bad, 9, 10, 2]. The prompt,
    the origin and KTO's mismatched ids are kept; the input pairs are not modified."""
    pair = TokenizedPair([1, 7], [8, 2], [9, 10, 2], origin="t.jsonl:3", mismatched_ids=[11, 2])
    (out,) = with_control_tokens([pair], GOOD, BAD, max_length=16)
    assert out == TokenizedPair([1, 7], [GOOD, 8, 2], [BAD, 9, 10, 2], "t.jsonl:3", [11, 2])
    assert pair.chosen_ids == [8, 2] and pair.rejected_ids == [9, 10, 2]


def test_responses_that_no_longer_fit_keep_their_start(caplog):
    """max_length 5, prompt of 2: room for 3 response tokens. [bad, 9, 10, 2] loses its EOS; [good, 8, 2]
    fits exactly. One truncation is logged."""
    pair = TokenizedPair([1, 7], [8, 2], [9, 10, 2])
    with caplog.at_level(logging.WARNING, logger="sparsealign.data"):
        (out,) = with_control_tokens([pair], GOOD, BAD, max_length=5)
    assert out.chosen_ids == [GOOD, 8, 2]
    assert out.rejected_ids == [BAD, 9, 10]
    assert len(out) == 5
    assert "1 responses truncated and 0 of 1 pairs dropped" in caplog.text


def test_pairs_without_room_for_a_response_token_are_dropped(caplog):
    """max_length 3: the 2-token prompt leaves room for the control token only, so that pair is dropped; a
    1-token prompt leaves room for the control token and one response token (both responses lose EOS)."""
    pairs = [TokenizedPair([1, 7], [8, 2], [9, 2]), TokenizedPair([1], [8, 2], [9, 2])]
    with caplog.at_level(logging.WARNING, logger="sparsealign.data"):
        out = with_control_tokens(pairs, GOOD, BAD, max_length=3)
    assert out == [TokenizedPair([1], [GOOD, 8], [BAD, 9])]
    assert "2 responses truncated and 1 of 2 pairs dropped" in caplog.text


def test_nothing_is_logged_when_everything_fits(caplog):
    with caplog.at_level(logging.WARNING, logger="sparsealign.data"):
        with_control_tokens([TokenizedPair([1], [8, 2], [9, 2])], GOOD, BAD, max_length=8)
    assert caplog.text == ""


# --- training and sampling see the same ids -------------------------------------------------------------


@pytest.mark.parametrize("build", [build_word_tokenizer, build_bpe_tokenizer])
def test_sampling_prompt_is_the_training_prefix(build):
    """After tokenisation and conditioning, the chosen training row is the sampling prompt followed by the
    response's own ids, and it equals the tokenisation of the text HALOs writes (prompt + "<|good|>" +
    response): the control token is one id that never merges with its neighbours."""
    from sparsealign.data.tokenize import tokenize_pair

    tokenizer = build()
    good, bad = add_control_tokens(tokenizer)
    cfg = DataConfig(max_length=64, max_prompt_length=32)
    example = PreferenceExample("the movie was", " great fun", " boring")
    plain = tokenize_pair(example, tokenizer, cfg)
    assert isinstance(plain, TokenizedPair)
    (pair,) = with_control_tokens([plain], good, bad, cfg.max_length)

    prompt = conditioned_prompt(pair.prompt_ids, good)
    assert prompt == [*plain.prompt_ids, good]
    assert pair.prompt_ids + pair.chosen_ids == prompt + plain.chosen_ids
    for text, token, response in (
        (" great fun", GOOD_TOKEN, pair.chosen_ids),
        (" boring", BAD_TOKEN, pair.rejected_ids),
    ):
        full = tokenizer("the movie was" + token + text)["input_ids"]
        assert pair.prompt_ids + response[:-1] == full  # the response's EOS is appended by tokenisation
