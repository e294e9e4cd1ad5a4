"""Shared test fixtures: tiny tokenizers built in code (no hub access, milliseconds)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
"""Ids 0..6 in both tiny tokenizers: pad=0, bos=1, eos=2, unk=3."""

WORDS = [
    "hello",
    "world",
    "the",
    "movie",
    "was",
    "good",
    "bad",
    "great",
    "terrible",
    "i",
    "liked",
    "it",
    "hated",
    "a",
    "film",
    "plot",
    "fun",
    "boring",
    "what",
    "is",
    "two",
    "plus",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

BPE_CORPUS = [
    "hello world, the movie was great",
    "I liked the movie a lot, the plot was fun",
    "the plot was terrible and the film was boring",
    "what a wonderful world",
]


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Add BOS in front of every text and wrap for transformers, with the tiny chat template."""
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """One id per whitespace/punctuation-separated word (ids are predictable: specials, then WORDS)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tokenizer)


def build_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: merges can cross a prompt/response boundary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(BPE_CORPUS * 5, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with BOS ``<s>`` (added in front), EOS ``</s>``, pad and a chat template."""
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with the same special tokens and chat template."""
    return build_bpe_tokenizer()
