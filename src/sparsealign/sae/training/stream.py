"""Shuffled batches of a model's activations at one hook site, computed on the fly.

Documents are tokenised a forward batch at a time, each with a prefix token in front (the tokenizer's BOS
by default) and truncated to ``context_length`` tokens; the model runs under ``torch.no_grad()`` and stops
right after the hooked block (:func:`run_to_site`), so later layers never run.
Padding and the first position are dropped: the attention sink forms there and its activation norm is
~100× the others'. A model may put a secondary sink on a later token (SmolLM2 does on an early word when a
document starts without a document-start token: 19 of 200k IMDB tokens with norms up to 23k against a
median of 240, 38% of the variance); rows whose norm exceeds ``max_norm_ratio`` × the forward's median are
dropped too, and counted. The rows are shuffled in a buffer of a few forwards and yielded as
``[batch_tokens, d_in]`` chunks. The held-out set comes from the first documents of the (seeded) document
order, training from the documents after them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sparsealign.errors import SAEError
from sparsealign.models import hooks
from sparsealign.models.hooks import Tap, site_module

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ActivationStream",
    "drop_outliers",
    "kept_positions",
    "pad_right",
    "resolve_prefix",
    "run_to_site",
    "site_activations",
    "tokenize_documents",
]


def resolve_prefix(tokenizer: PreTrainedTokenizerBase, prefix: str) -> int | None:
    """The token id put in front of every document: ``"bos"`` → the tokenizer's BOS token (None if it has
    none), ``"none"`` → None, anything else → that token, which must be one token of the vocabulary."""
    if prefix == "none":
        return None
    if prefix == "bos":
        return tokenizer.bos_token_id
    token_id = tokenizer.convert_tokens_to_ids(prefix)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id and prefix != tokenizer.unk_token:
        raise SAEError(
            f"SAE training: prefix {prefix!r} is not a token of the tokenizer (use 'bos' or 'none')"
        )
    return token_id


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_length: int,
    prefix_id: int | None = None,
) -> list[list[int]]:
    """Token ids per document, with the tokenizer's own special tokens, then ``prefix_id`` in front unless
    the ids already start with it (a tokenizer that adds its BOS itself), truncated to ``context_length``;
    documents of fewer than 2 tokens give an empty list."""
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    out = []
    for ids in encoded:
        ids = list(ids)
        if prefix_id is not None and (not ids or ids[0] != prefix_id):
            ids.insert(0, prefix_id)
        ids = ids[:context_length]
        out.append(ids if len(ids) >= 2 else [])
    return out


def drop_outliers(rows: Tensor, max_norm_ratio: float | None) -> tuple[Tensor, int]:
    """Rows whose norm is at most ``max_norm_ratio`` × the median row norm, and how many were dropped
    (massive activations: secondary attention sinks whose norm is 10-100× the others'; None keeps all)."""
    if max_norm_ratio is None or rows.shape[0] == 0:
        return rows, 0
    norms = rows.norm(dim=1)
    keep = norms <= max_norm_ratio * norms.median()
    return rows[keep], int((~keep).sum().item())


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max_len]``, padded on the right (real positions start at
    0, so the model's default position ids are right)."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def kept_positions(attention_mask: Tensor) -> Tensor:
    """Boolean ``[B, L]``: real tokens except each row's first (BOS / attention sink); right padding."""
    keep = attention_mask.bool().clone()
    keep[:, 0] = False
    return keep


def run_to_site(model: nn.Module, module: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``module``'s output ``[B, L, d]`` for this batch, under ``torch.no_grad()``; the forward stops right
    after ``module`` (:func:`~sparsealign.models.hooks.capture` with ``stop=True``), so the layers after it
    (and the head) never run. The tap is named by the module's path in ``model`` (``model.layers.20``), so
    the ``RuntimeError`` of a module the forward never calls says which site it was."""
    name = next((path for path, candidate in model.named_modules() if candidate is module), None)
    name = name or type(module).__name__
    with torch.no_grad(), hooks.capture({name: Tap(module)}, stop=True) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return captured[name]


def site_activations(
    model: nn.Module,
    module: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_length: int,
    prefix_id: int | None = None,
) -> Tensor:
    """The hooked activations of ``texts`` as float32 rows ``[n, d]`` (document order, then position),
    without padding and without each document's first position (see :func:`tokenize_documents`)."""
    sequences = [ids for ids in tokenize_documents(tokenizer, texts, context_length, prefix_id) if ids]
    device = next(model.parameters()).device
    if not sequences:
        return torch.empty(0, 0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask = pad_right(sequences, pad_id)
    activations = run_to_site(model, module, input_ids.to(device), mask.to(device))
    return activations[kept_positions(mask).to(device)].float()


class ActivationStream:
    """Shuffled ``[batch_tokens, d_in]`` chunks of a model's activations at one site, computed on the fly.

    ``documents`` are used in the given order: :meth:`heldout` takes the first ones (call it before
    iterating), training reads the rest, cycling through them again (reshuffled) if they run out. At most
    ``buffer_forwards`` forwards' rows (plus one batch) are held at a time. ``prefix`` (see
    :func:`resolve_prefix`) is put in front of every document; rows above ``max_norm_ratio`` × the median
    norm of their forward are dropped and counted in ``dropped``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        documents: Sequence[str],
        *,
        site: str,
        layer: int,
        context_length: int = 128,
        batch_tokens: int = 2048,
        docs_per_forward: int = 32,
        buffer_forwards: int = 4,
        prefix: str = "bos",
        max_norm_ratio: float | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        try:
            self.module = site_module(model, site, layer)
        except ValueError as error:
            raise SAEError(str(error)) from None
        self.model = model
        self.tokenizer = tokenizer
        self.documents = list(documents)
        self.context_length = context_length
        self.batch_tokens = batch_tokens
        self.docs_per_forward = docs_per_forward
        self.buffer_forwards = buffer_forwards
        self.prefix_id = resolve_prefix(tokenizer, prefix)
        self.max_norm_ratio = max_norm_ratio
        self.dropped = {"heldout": 0, "train": 0}
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.progress = progress
        self.train_start = 0
        self.epochs = 0
        self.d_in: int | None = None

    def _forward(self, texts: Sequence[str], split: str = "train") -> Tensor:
        rows = site_activations(
            self.model, self.module, self.tokenizer, texts, self.context_length, self.prefix_id
        )
        rows, dropped = drop_outliers(rows, self.max_norm_ratio)
        self.dropped[split] += dropped
        if rows.numel():
            self.d_in = rows.shape[1]
        return rows

    def heldout(self, n_tokens: int) -> Tensor:
        """``[n_tokens, d_in]`` activations of the first documents; training starts after them."""
        if self.train_start:
            raise RuntimeError("heldout() must be called once, before training")
        chunks: list[Tensor] = []
        count = 0
        position = 0
        while count < n_tokens:
            if position >= len(self.documents):
                raise SAEError(
                    f"the source has too few documents for {n_tokens} held-out tokens "
                    f"({count} tokens from all {len(self.documents)} documents)"
                )
            texts = self.documents[position : position + self.docs_per_forward]
            position += len(texts)
            rows = self._forward(texts, "heldout")
            if rows.numel():
                chunks.append(rows)
                count += rows.shape[0]
        if position >= len(self.documents):
            raise SAEError(
                f"the held-out set ({n_tokens} tokens) used all {len(self.documents)} documents; none are left "
                "for training: use a larger source or fewer held-out tokens"
            )
        self.train_start = position
        return torch.cat(chunks)[:n_tokens]

    def _training_texts(self) -> Iterator[list[str]]:
        order = list(range(self.train_start, len(self.documents)))
        while True:
            for start in range(0, len(order), self.docs_per_forward):
                yield [self.documents[i] for i in order[start : start + self.docs_per_forward]]
            self.epochs += 1
            if self.progress:
                self.progress(f"all {len(order)} training documents used; starting pass {self.epochs + 1}")
            random.Random(self.seed + self.epochs).shuffle(order)

    def __iter__(self) -> Iterator[Tensor]:
        buffer: Tensor | None = None
        forwards = 0
        for texts in self._training_texts():
            rows = self._forward(texts)
            if not rows.numel():
                continue
            buffer = rows if buffer is None else torch.cat([buffer, rows])
            forwards += 1
            if forwards < self.buffer_forwards or buffer.shape[0] < self.batch_tokens:
                continue
            buffer = buffer[torch.randperm(buffer.shape[0], generator=self.generator).to(buffer.device)]
            # Yield all but about half a buffer: the rest mixes with the next forwards' rows.
            keep = max(0, buffer.shape[0] // 2 - self.batch_tokens)
            while buffer.shape[0] - self.batch_tokens >= keep:
                yield buffer[: self.batch_tokens]
                buffer = buffer[self.batch_tokens :]
            forwards = self.buffer_forwards // 2
