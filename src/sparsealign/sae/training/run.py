"""``train_sae``: a TopK SAE trained end to end on a model's streamed activations and written to a folder.

Loads the model, streams activations of ``config.site`` of ``config.layer``
(:class:`~sparsealign.sae.training.stream.ActivationStream`), trains
(:class:`~sparsealign.sae.training.trainer.TopKSAETrainer`), evaluates on the held-out tokens
(:func:`~sparsealign.sae.training.metrics.evaluate_sae`) and writes the SAE (SAELens layout, loadable with
:func:`~sparsealign.sae.loading.load_sae`) and ``metrics.json`` atomically: a temporary sibling folder
renamed at the end, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsealign.config import ModelConfig
from sparsealign.errors import SAEError
from sparsealign.io import atomic_folder
from sparsealign.models.hooks import decoder_layers
from sparsealign.models.loading import load_model
from sparsealign.sae.model import SAEMetadata, SparseAutoencoder
from sparsealign.sae.training.config import SAETrainConfig, model_dtype
from sparsealign.sae.training.documents import load_documents
from sparsealign.sae.training.metrics import evaluate_sae
from sparsealign.sae.training.stream import ActivationStream
from sparsealign.sae.training.trainer import StepStats, TopKSAETrainer

__all__ = ["METRICS_FILE", "Progress", "SAETrainResult", "stderr_progress", "train_sae"]

METRICS_FILE = "metrics.json"
"""Written next to the SAE's ``cfg.json`` by :func:`train_sae`."""

Progress = Callable[[str], None]
"""Receives one progress line at a time."""


def stderr_progress(message: str) -> None:
    """The default :data:`Progress`: ``[sparsealign] sae train: message`` on stderr."""
    print(f"[sparsealign] sae train: {message}", file=sys.stderr, flush=True)


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


def train_sae(
    config: SAETrainConfig, out: str | Path, *, progress: Progress | None = stderr_progress
) -> SAETrainResult:
    """Train a TopK SAE on ``config.model``'s activations at ``config.site`` of ``config.layer`` and write
    it to ``out`` (SAELens layout + ``metrics.json``), atomically. ``progress`` gets one line every
    ``config.log_every_s`` seconds (None: silent). Bad input raises :class:`SAEError` (a ``UserError``)."""
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

    with atomic_folder(folder) as work:
        write(work)
    say(
        f"held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.4f} "
        f"({metrics['seconds']:.0f} s); wrote {folder}"
    )
    return SAETrainResult(folder, sae, metrics)
