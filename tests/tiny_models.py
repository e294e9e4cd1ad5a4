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


def save_tiny_classifier(folder, tokenizer, num_labels: int = 2, seed: int = 0):
    """A tiny random Llama sequence classifier (hidden 32, one layer) saved with ``tokenizer`` in ``folder``:
    a reward model for ``reward.name=<folder>``. Returns the classifier (eval mode)."""
    from transformers import LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    classifier = LlamaForSequenceClassification(config).eval()
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return classifier


def train_smoke(folder, *overrides: str):
    """Train the smoke recipe for two steps into ``folder`` (no checkpoints, no evaluation); returns it."""
    from sparsealign import load_config, train

    base = [
        f"output_dir={folder}",
        "train.max_steps=2",
        "train.save_every=0",
        "train.eval_every=0",
        "train.progress=false",
    ]
    train(load_config("smoke", [*base, *overrides]))
    return folder


def random_sae(d_in: int = 64, d_sae: int = 96):
    """A ReLU SAE of the tiny models' width with N(0, 0.3) weights (seeded): codes far from zero, so that
    FPO's features and losses are not trivially equal."""
    from sparsealign.sae import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in, d_sae, "relu")
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def saved_random_sae(folder, d_in: int = 64, d_sae: int = 96):
    """:func:`random_sae` saved in ``folder`` (for ``sae.path=``); returns the folder."""
    random_sae(d_in, d_sae).save(folder)
    return folder
