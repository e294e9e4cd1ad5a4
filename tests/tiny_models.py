"""Tiny random causal LMs built in code for tests (no hub, milliseconds)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def random_pairs(n: int, seed: int = 0):
    """Token-id pairs with varied prompt and response lengths."""
    from sparsealign.data.examples import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 9, (3,), generator=g))
        ids = lambda k: torch.randint(3, VOCAB, (k,), generator=g).tolist()  # noqa: E731
        pairs.append(TokenizedPair([1, *ids(p)], ids(c) + [2], ids(r) + [2]))
    return pairs
