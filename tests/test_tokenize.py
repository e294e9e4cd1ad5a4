"""Token-exact tokenisation: prompt/response boundary, BOS/EOS, truncation, chat templates, drops."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from sparsealign.config import DataConfig
from sparsealign.data.examples import PreferenceExample, TokenizedPair
from sparsealign.data.formats import DataError, parse_row
from sparsealign.data.tokenize import tokenize_examples, tokenize_pair, truncate_prompt

BOS, EOS = 1, 2


def ids(tokenizer, *words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(words))


def cfg(**kwargs) -> DataConfig:
    return DataConfig(**{"max_length": 64, "max_prompt_length": 32, **kwargs})


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------------------------------
# Standard format


def test_standard_pair_exact_ids(tiny_tokenizer) -> None:
    example = PreferenceExample("hello world", " good movie", " bad film", origin="t.jsonl:1")
    pair = tokenize_pair(example, tiny_tokenizer, cfg())
    assert isinstance(pair, TokenizedPair)
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "hello", "world")]
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good", "movie"), EOS]
    assert pair.rejected_ids == [*ids(tiny_tokenizer, "bad", "film"), EOS]
    assert pair.origin == "t.jsonl:1"


def test_prompt_is_prefix_one_bos_and_eos(bpe_tokenizer) -> None:
    example = PreferenceExample("the movie was", " great", " terrible")
    stats: Counter[str] = Counter()
    pair = tokenize_pair(example, bpe_tokenizer, cfg(), stats=stats)
    for text, response in ((" great", pair.chosen_ids), (" terrible", pair.rejected_ids)):
        full = bpe_tokenizer("the movie was" + text)["input_ids"]
        assert pair.prompt_ids + response[:-1] == full  # token-exact: the full sequence's own tokens
        assert response[-1] == EOS and response.count(EOS) == 1
    assert pair.prompt_ids[0] == BOS
    assert (pair.prompt_ids + pair.chosen_ids).count(BOS) == 1
    assert stats["boundary_fallback"] == 0


def test_prompt_starting_with_bos_text_gets_no_second_bos(tiny_tokenizer) -> None:
    pair = tokenize_pair(PreferenceExample("<s>hello", " world", " film"), tiny_tokenizer, cfg())
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "hello")]
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "world"), EOS]


def test_response_already_ending_with_eos_is_not_doubled(tiny_tokenizer) -> None:
    pair = tokenize_pair(PreferenceExample("hello", " good</s>", " bad"), tiny_tokenizer, cfg())
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good"), EOS]
    assert pair.rejected_ids == [*ids(tiny_tokenizer, "bad"), EOS]


def test_boundary_merge_falls_back_to_separate_response(bpe_tokenizer) -> None:
    # "hello wor" + "ld" tokenises as [hello, Ġworld]: the prompt tokens are not a prefix.
    full = bpe_tokenizer("hello world")["input_ids"]
    prompt = bpe_tokenizer("hello wor")["input_ids"]
    assert full[: len(prompt)] != prompt
    stats: Counter[str] = Counter()
    pair = tokenize_pair(
        PreferenceExample("hello wor", "ld", "ld was fun"), bpe_tokenizer, cfg(), stats=stats
    )
    assert pair.prompt_ids == prompt
    assert pair.chosen_ids == bpe_tokenizer("ld", add_special_tokens=False)["input_ids"] + [EOS]
    assert pair.rejected_ids == bpe_tokenizer("ld was fun", add_special_tokens=False)["input_ids"] + [EOS]
    assert stats["boundary_fallback"] == 2


def test_implicit_prompt_through_tokenisation(bpe_tokenizer) -> None:
    example = parse_row({"chosen": "the movie was great", "rejected": "the movie was terrible"})
    assert (example.prompt, example.chosen) == ("the movie was", " great")  # the space starts the response
    stats: Counter[str] = Counter()
    pair = tokenize_pair(example, bpe_tokenizer, cfg(), stats=stats)
    assert pair.prompt_ids == bpe_tokenizer("the movie was")["input_ids"]
    assert stats["boundary_fallback"] == 0
    assert pair.chosen_ids[-1] == EOS and pair.rejected_ids[-1] == EOS


# --------------------------------------------------------------------------------------------------
# Truncation


def test_prompt_truncation_keep_end_keeps_bos(tiny_tokenizer) -> None:
    example = PreferenceExample("one two three four five six", " good", " bad")
    example.prompt = "what is two plus four five six"
    words = ids(tiny_tokenizer, "what", "is", "two", "plus", "four", "five", "six")
    pair = tokenize_pair(example, tiny_tokenizer, cfg(max_prompt_length=4, truncation="keep_end"))
    assert pair.prompt_ids == [BOS, *words[-3:]]
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good"), EOS]


def test_prompt_truncation_keep_start(tiny_tokenizer) -> None:
    example = PreferenceExample("what is two plus four five six", " good", " bad")
    words = ids(tiny_tokenizer, "what", "is", "two", "plus", "four", "five", "six")
    pair = tokenize_pair(example, tiny_tokenizer, cfg(max_prompt_length=4, truncation="keep_start"))
    assert pair.prompt_ids == [BOS, *words[:3]]


def test_truncate_prompt_helper() -> None:
    assert truncate_prompt([1, 10, 11, 12, 13], 3, "keep_end", head=(1,)) == [1, 12, 13]
    assert truncate_prompt([10, 11, 12, 13], 3, "keep_end", head=(1,)) == [11, 12, 13]
    assert truncate_prompt([1, 10, 11, 12, 13], 3, "keep_start", head=(1,)) == [1, 10, 11]
    assert truncate_prompt([1, 10], 3, "keep_end", head=(1,)) == [1, 10]


def test_response_truncated_to_max_length(tiny_tokenizer) -> None:
    example = PreferenceExample("hello world", " five six seven eight nine ten", " bad")
    stats: Counter[str] = Counter()
    pair = tokenize_pair(example, tiny_tokenizer, cfg(max_length=6, max_prompt_length=3), stats=stats)
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "hello", "world")]
    assert pair.chosen_ids == ids(tiny_tokenizer, "five", "six", "seven")  # keeps its start, no EOS
    assert pair.rejected_ids == [*ids(tiny_tokenizer, "bad"), EOS]
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 6
    assert stats["response_truncated"] == 1


def test_prompt_and_response_truncation_together(tiny_tokenizer) -> None:
    example = PreferenceExample("what is two plus four", " five six seven", " ten")
    pair = tokenize_pair(example, tiny_tokenizer, cfg(max_length=5, max_prompt_length=3))
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "plus", "four")]
    assert pair.chosen_ids == ids(tiny_tokenizer, "five", "six")
    assert pair.rejected_ids == [*ids(tiny_tokenizer, "ten"), EOS]


def test_no_room_for_response_is_too_long(tiny_tokenizer) -> None:
    example = PreferenceExample("what is two plus four", " five", " six")
    assert tokenize_pair(example, tiny_tokenizer, cfg(max_length=3, max_prompt_length=3)) == "too_long"
    pairs, dropped = tokenize_examples(
        [example, PreferenceExample("hi", " good", " bad")],
        tiny_tokenizer,
        cfg(max_length=3, max_prompt_length=3),
    )
    assert len(pairs) == 1 and dropped == Counter({"too_long": 1})


# --------------------------------------------------------------------------------------------------
# Conversational format


def test_chat_template_boundary(tiny_tokenizer) -> None:
    example = PreferenceExample([user("hello world")], [assistant("good")], [assistant("bad movie")])
    pair = tokenize_pair(example, tiny_tokenizer, cfg())
    user_id, assistant_id = ids(tiny_tokenizer, "<|user|>", "<|assistant|>")
    assert pair.prompt_ids == [BOS, user_id, *ids(tiny_tokenizer, "hello", "world"), EOS, assistant_id]
    # the template closes the turn with </s>, so EOS is not appended a second time
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good"), EOS]
    assert pair.rejected_ids == [*ids(tiny_tokenizer, "bad", "movie"), EOS]
    full = tiny_tokenizer.apply_chat_template([user("hello world"), assistant("good")], tokenize=False)
    assert pair.prompt_ids + pair.chosen_ids == tiny_tokenizer(full)["input_ids"]


def test_chat_template_with_bos_text_has_one_bos(tiny_tokenizer) -> None:
    template = "<s>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    example = PreferenceExample([user("hello")], [assistant("good")], [assistant("bad")])
    pair = tokenize_pair(example, tiny_tokenizer, cfg(chat_template=template))
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "<|user|>", "hello", "<|assistant|>")]
    assert (pair.prompt_ids + pair.chosen_ids).count(BOS) == 1
    # this template does not end the turn with </s>: EOS is appended
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good"), EOS]


def test_chat_template_from_jinja_file(tiny_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{% endif %}{{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    example = PreferenceExample([user("hello")], [assistant("good")], [assistant("bad")])
    pair = tokenize_pair(example, tiny_tokenizer, cfg(chat_template=str(path)))
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "hello", "<|assistant|>")]
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good"), EOS]


def test_implicit_conversation_through_template(tiny_tokenizer) -> None:
    example = parse_row(
        {"chosen": [user("hello"), assistant("good")], "rejected": [user("hello"), assistant("bad")]}
    )
    pair = tokenize_pair(example, tiny_tokenizer, cfg())
    assert pair.prompt_ids == [BOS, *ids(tiny_tokenizer, "<|user|>", "hello", "</s>", "<|assistant|>")]
    assert pair.chosen_ids == [*ids(tiny_tokenizer, "good"), EOS]


def test_template_mismatch_is_dropped_or_raises_in_strict(tiny_tokenizer) -> None:
    template = (
        "{% if add_generation_prompt %}PROMPT {% endif %}{% for m in messages %}{{ m.content }} {% endfor %}"
    )
    example = PreferenceExample([user("hello")], [assistant("good")], [assistant("bad")], origin="c.jsonl:4")
    assert tokenize_pair(example, tiny_tokenizer, cfg(chat_template=template)) == "template_mismatch"
    ok = PreferenceExample("hello", " good", " bad")
    pairs, dropped = tokenize_examples([example, ok], tiny_tokenizer, cfg(chat_template=template))
    assert len(pairs) == 1 and dropped == Counter({"template_mismatch": 1})
    with pytest.raises(DataError, match=r"c\.jsonl:4: template_mismatch"):
        tokenize_examples([example, ok], tiny_tokenizer, cfg(chat_template=template, strict=True))


def test_template_error_is_dropped(tiny_tokenizer) -> None:
    template = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m.content }}{% endfor %}"
    example = PreferenceExample([{"role": "system", "content": "x"}], [assistant("good")], [assistant("bad")])
    assert tokenize_pair(example, tiny_tokenizer, cfg(chat_template=template)) == "template_error"


def test_missing_chat_template_says_what_to_set(bpe_tokenizer, tmp_path: Path) -> None:
    example = PreferenceExample([user("hello")], [assistant("good")], [assistant("bad")])
    saved = bpe_tokenizer.chat_template
    bpe_tokenizer.chat_template = None
    try:
        with pytest.raises(DataError, match="data.chat_template"):
            tokenize_pair(example, bpe_tokenizer, cfg())
    finally:
        bpe_tokenizer.chat_template = saved
    with pytest.raises(DataError, match="no such file"):
        tokenize_pair(example, bpe_tokenizer, cfg(chat_template=str(tmp_path / "missing.jinja")))


# --------------------------------------------------------------------------------------------------
# Batches


def test_tokenize_examples_counts_and_logs(tiny_tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    examples = [
        PreferenceExample("hello", " good", " bad", origin="a:1"),
        PreferenceExample("what is two plus four", " five", " six", origin="a:2"),
    ]
    stats: Counter[str] = Counter()
    with caplog.at_level(logging.INFO, logger="sparsealign.data"):
        pairs, dropped = tokenize_examples(
            examples, tiny_tokenizer, cfg(max_length=3, max_prompt_length=3), stats=stats
        )
    assert [p.origin for p in pairs] == ["a:1"]
    assert dropped == Counter({"too_long": 1})
    assert "too_long=1 (first: a:2)" in caplog.text
    assert stats["eos_appended"] == 2


def test_all_dropped_is_an_error(tiny_tokenizer) -> None:
    example = PreferenceExample("what is two plus four", " five", " six")
    with pytest.raises(DataError, match=r"None of the 1 examples survived tokenisation \(too_long=1\)"):
        tokenize_examples([example], tiny_tokenizer, cfg(max_length=3, max_prompt_length=3))
    assert tokenize_examples([], tiny_tokenizer, cfg()) == ([], Counter())


def test_tokenizer_without_bos(bpe_tokenizer) -> None:
    import copy

    from tokenizers import processors

    no_bos = copy.deepcopy(bpe_tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert no_bos("hello")["input_ids"][0] != BOS
    pair = tokenize_pair(PreferenceExample("hello", " world", " plot"), no_bos, cfg())
    assert pair.prompt_ids == no_bos("hello")["input_ids"]
    assert pair.chosen_ids == no_bos(" world")["input_ids"] + [EOS]
    # nothing at all in front of the response: there is no token to predict its first token from
    assert tokenize_pair(PreferenceExample("", "hello", "world"), no_bos, cfg()) == "empty_prompt"
    assert bpe_tokenizer("hello")["input_ids"][0] == BOS  # the shared fixture is untouched
