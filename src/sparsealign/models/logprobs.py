"""The one per-token log-prob path, shared by every method and by evaluation.

``TokenModel`` wraps a causal LM. Its forward runs the decoder once over a concatenated batch (chosen and
rejected rows together), gathers the final hidden state at the positions that predict response tokens,
and sends only those rows through the output head, in chunks. Each chunk is checkpointed, so the backward
pass keeps the ``[M, d]`` hidden rows and recomputes the ``[chunk, V]`` logits instead of holding a
``[N, L, V]`` log-softmax: peak head memory is one chunk of logits, whatever the sequence length.

On request the same pass returns the per-token KL(reference || policy) over the vocabulary (from the
reference's gathered hidden states and head, also chunked) and the hidden states of chosen layers at the
response positions. When not requested they are not computed.

All outputs are response-aligned ``[N, T]`` (``[N, T, d]`` for hidden states), zero where
``batch.response_mask`` is False.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsealign.data.collate import Batch, PackingMode, collate_sequences
from sparsealign.errors import TrainingError

Head = Callable[[torch.Tensor], torch.Tensor]

CHECKPOINT_MIN_BYTES = 128 * 2**20
"""Below this size of the float32 head output (rows x vocabulary) the logits are kept for the backward
pass instead of being recomputed: the memory is small next to the model's and recomputation (the head's
forward again, the reference's too when the token KL is computed) would only cost time. The main job's
batches (about 380 response tokens x 49,152 = 75 MB) stay under it: keeping them made its SparsePO step 1.13x
faster on the development CPU (benchmarks/README.md); the vs_trl batch (1,440 x 49,152 = 283 MB) is still
recomputed."""


@dataclass
class TokenOutputs:
    """Response-aligned outputs of one forward.

    ``logps[n, t]``: log-prob of response token ``t``; ``head_inputs``: the ``[M, d]`` final hidden rows of
    the ``M`` real response tokens (in ``response_mask`` order), which a later KL computation needs;
    ``kl[n, t]``: KL(reference || policy) at that token, when asked; ``layers[i]``: ``[N, T, d]`` hidden
    states of decoder layer ``i`` (0 = embeddings) at the predicting positions, when asked; ``extra``: the
    output of the method's trainable module (e.g. SparsePO's mask networks), when there is one;
    ``features``: ``[N, F]`` pooled SAE codes of each response (FPO), when the model has a feature probe;
    ``reference_logps``: the reference's log-probs of the same tokens, when this forward computed the token
    KL (they come from the same reference logits).
    """

    logps: torch.Tensor | None
    mask: torch.Tensor
    head_inputs: torch.Tensor
    kl: torch.Tensor | None = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    extra: Any = None
    features: torch.Tensor | None = None
    reference_logps: torch.Tensor | None = None
    offsets: tuple[int, ...] = ()

    def chosen(self, num_pairs: int) -> TokenOutputs:
        return self._rows(slice(0, num_pairs))

    def rejected(self, num_pairs: int) -> TokenOutputs:
        return self._rows(slice(num_pairs, 2 * num_pairs))

    def _rows(self, rows: slice) -> TokenOutputs:
        if self.offsets:  # counted on the host at collation: no wait on the device
            last = len(self.offsets) - 1  # rows past the end are empty, as in tensor slicing (unpaired items)
            start, stop = self.offsets[min(rows.start, last)], self.offsets[min(rows.stop, last)]
        else:
            start, stop = int(self.mask[: rows.start].sum()), int(self.mask[: rows.stop].sum())
        return TokenOutputs(
            logps=None if self.logps is None else self.logps[rows],
            mask=self.mask[rows],
            head_inputs=self.head_inputs[start:stop],
            kl=None if self.kl is None else self.kl[rows],
            layers={i: h[rows] for i, h in self.layers.items()},
            features=None if self.features is None else self.features[rows],
            reference_logps=None if self.reference_logps is None else self.reference_logps[rows],
            offsets=tuple(o - start for o in self.offsets[rows.start : rows.stop + 1])
            if self.offsets
            else (),
        )  # ``extra`` (a method module's output) is sliced by the method that knows its shape


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT (and/or accelerate) wrapper."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_head(model: nn.Module) -> Head:
    """The function from final hidden states to logits, including model-specific logit transforms.

    Gemma-2/3 soft-cap their logits (``cap * tanh(logits / cap)``), Cohere multiplies by ``logit_scale`` and
    Granite divides by ``logits_scaling``; all happen in the LM class's forward after the head, so they are
    repeated here.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    config = lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


def _selected_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _logps_and_kl(
    head: Head, hidden: torch.Tensor, targets: torch.Tensor, ref_head: Head, ref_hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probs, KL(ref || policy) and the reference log-probs from one pair of head calls."""
    logp_all = torch.log_softmax(head(hidden).float(), dim=-1)
    with torch.no_grad():
        ref_all = torch.log_softmax(ref_head(ref_hidden).float(), dim=-1)
    kl = (ref_all.exp() * (ref_all - logp_all)).sum(-1)
    index = targets.unsqueeze(-1)
    return logp_all.gather(-1, index).squeeze(-1), kl, ref_all.gather(-1, index).squeeze(-1)


def chunked_head(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    reference: tuple[Head, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs of ``targets`` for ``[M, d]`` rows; with ``reference`` (its head and hidden rows) also the
    KL(ref || policy) over the vocabulary and the reference's log-probs of ``targets`` (from the same
    reference logits, so the reference head runs once per token).

    With gradients enabled each chunk is checkpointed: only ``hidden`` is saved and the chunk's logits are
    recomputed in the backward pass (unless all logits together are smaller than ``CHECKPOINT_MIN_BYTES``).
    """
    with torch.no_grad():
        vocab = head(hidden[:1]).shape[-1] if hidden.shape[0] else 0
    large = hidden.shape[0] * vocab * 4 >= CHECKPOINT_MIN_BYTES
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad and large
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        if reference is None:
            args: tuple = (head, hidden[part], targets[part])
            fn: Callable = _selected_logps
        else:
            args = (head, hidden[part], targets[part], reference[0], reference[1][part])
            fn = _logps_and_kl
        out = checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args)
        parts.append(out if isinstance(out, tuple) else (out,))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty, empty) if reference is not None else (empty, None, None)
    columns = [torch.cat(column) for column in zip(*parts, strict=True)]
    return (columns[0], columns[1], columns[2]) if reference is not None else (columns[0], None, None)


def _real_rows(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The ``[M, ...]`` entries of response-aligned ``[N, T, ...]`` values at the real response tokens, in
    ``response_mask`` order: an index chosen on the host at collation (no wait on the device for the count, as
    boolean indexing would), or the mask."""
    if batch.response_flat is None:
        return values[batch.response_mask]
    return values.flatten(0, 1).index_select(0, batch.response_flat.to(values.device))


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place ``[M]`` values of the real response tokens into a zero ``[N, T]`` tensor."""
    out = values.new_zeros(mask.shape)
    return out.masked_scatter(mask, values)


class TokenModel(nn.Module):
    """A causal LM whose forward returns response-aligned per-token outputs.

    It is an ``nn.Module`` so that accelerate (DDP, FSDP, DeepSpeed) can wrap it: the decoder and the head
    run inside its ``forward``, which is what distributed wrappers hook. ``extra`` is a method's own
    trainable module (SparsePO's mask networks, PPO's value head); it runs inside the same forward as
    ``extra(outputs, reference)`` on this forward's outputs and the reference's outputs on the same batch, so
    distributed wrappers see and synchronise its parameters like the model's.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk: int = 512,
        extra: nn.Module | None = None,
        features: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.extra = extra
        self.features = features  # a FeatureProbe (FPO): pooled SAE codes of one hook site

    def forward(
        self,
        batch: Batch,
        layers: Sequence[int] = (),
        reference: TokenOutputs | None = None,
        reference_head: Head | None = None,
        head: bool = True,
        run_extra: bool = True,
    ) -> TokenOutputs:
        """Run one forward. ``layers`` selects hidden states to return (0 = embeddings, ``i`` = after block
        ``i``). ``reference`` (outputs of the reference on the same batch) feeds ``extra``; with
        ``reference_head`` it also turns on the token KL, and the reference's log-probs are then taken from
        the same reference logits and returned as ``reference_logps`` (so a reference run for a KL method
        passes ``head=False`` and leaves its log-probs to this call). ``run_extra=False`` skips the method's
        module (rows it does not apply to, such as KTO's mismatched rows)."""
        lm = unwrap_causal_lm(self.model)
        decoder = lm.get_decoder()
        probe = self.features.capture(lm) if self.features is not None else contextlib.nullcontext({})
        with probe as captured:
            out = decoder(**batch.model_inputs(), output_hidden_states=bool(layers), use_cache=False)
        features = self.features.pooled(captured["activations"], batch) if self.features is not None else None
        mask = batch.response_mask
        hidden = _real_rows(batch.gather(out.last_hidden_state, batch.response_index), batch)  # [M, d]
        targets = _real_rows(batch.response_ids, batch)
        ref = None
        if reference_head is not None:
            if reference is None:
                raise ValueError("the token KL needs the reference's outputs on the same batch")
            ref = (reference_head, reference.head_inputs)
        if not head:
            return TokenOutputs(
                logps=None,
                mask=mask,
                head_inputs=hidden,
                layers=self._layers(out, batch, layers),
                offsets=batch.response_offsets,
            )
        logp, kl, ref_logp = chunked_head(output_head(self.model), hidden, targets, self.chunk, ref)
        outputs = TokenOutputs(
            logps=_scatter(logp, mask),
            mask=mask,
            head_inputs=hidden,
            kl=None if kl is None else _scatter(kl, mask),
            layers=self._layers(out, batch, layers),
            features=features,
            reference_logps=None if ref_logp is None else _scatter(ref_logp, mask),
            offsets=batch.response_offsets,
        )
        if self.extra is not None and run_extra:
            outputs.extra = self.extra(outputs, reference)
        return outputs

    @staticmethod
    def _layers(out: Any, batch: Batch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        mask = batch.response_mask.unsqueeze(-1)
        return {i: batch.gather(out.hidden_states[i], batch.response_index) * mask for i in layers}


def packing_is_exact(model: nn.Module) -> bool:
    """Whether ``model``'s packed forward (:meth:`Batch.packed`) equals its padded one: two sequences (6 and 4
    tokens) run padded and packed into one row; the final hidden states of the second must agree to 1e-3 of
    their scale (2e-2 in a half dtype). A model that ignores the position ids when masking attention (so
    that the second sequence sees the first) fails."""
    lm = unwrap_causal_lm(model)
    vocab = lm.config.vocab_size
    prompts = [[(7 * i + 3) % vocab for i in range(1, 4)], [(11 * i + 5) % vocab for i in range(1, 3)]]
    responses = [[(13 * i + 1) % vocab for i in range(1, 4)], [(17 * i + 2) % vocab for i in range(1, 3)]]
    device = next(lm.parameters()).device
    batch = collate_sequences(prompts, responses, pad_id=0).to(device)
    tokens = TokenModel(model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = tokens(batch, head=False).head_inputs.float()
            packed = tokens(batch.packed(width=10), head=False).head_inputs.float()
    finally:
        model.train(training)
    half = next(lm.parameters()).dtype in (torch.float16, torch.bfloat16)
    scale = padded.abs().max().clamp_min(1e-6)
    return bool(((packed - padded).abs().max() / scale) <= (2e-2 if half else 1e-3))


def resolve_packing(mode: PackingMode, model: nn.Module) -> PackingMode:
    """``train.packing`` for ``model``: unchanged when its packed forward is exact (:func:`packing_is_exact`);
    otherwise ``False`` for ``auto`` (logged) and a :class:`TrainingError` for ``true``."""
    if mode is False or packing_is_exact(model):
        return mode
    name = type(unwrap_causal_lm(model)).__name__
    if mode is True:
        raise TrainingError(
            f"train.packing=true, but {name}'s packed forward differs from its padded one (its attention mask "
            "ignores the position ids of packed sequences): set train.packing=false or auto."
        )
    logging.getLogger(__name__).info("%s: packed forwards are not exact; training on padded batches", name)
    return False
