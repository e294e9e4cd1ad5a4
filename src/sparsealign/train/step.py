"""The step's components: what one batch goes through between collation and the optimizer.

:func:`step_outputs` meets a method's needs (``Method.needs``) with one provider per need and returns the
per-token outputs its loss reads; :func:`compute_loss` feeds them to the method. Order inside a step:

1. the reference side (only if a need uses it): from the offline cache, or one gradient-free forward of
   the reference model asking only for what the needs want (hidden states of the method module's layers,
   activations for a mask, pooled SAE codes; no output head when the policy's forward computes the token
   KL, which then returns the reference log-probs from the same logits);
2. the policy forward through the one per-token log-prob path (with the method's module, if any);
3. the needs that use both sides afterwards (mismatched rows for KTO's reference point).

The loop (``sparsealign.train.loop``) never names a method: it calls these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparsealign.config import Config
from sparsealign.data.collate import Batch, PackingMode, collate_mismatched
from sparsealign.data.examples import TokenizedPair
from sparsealign.data.prepare import PreparedData, prepare_data
from sparsealign.losses import LossOutput
from sparsealign.methods import Method, Need, StepOutputs
from sparsealign.models.loading import ModelBundle
from sparsealign.models.logprobs import Head, TokenModel, TokenOutputs, output_head
from sparsealign.refcache import ReferenceCache
from sparsealign.train.precision import Precision, precision_of, upcast
from sparsealign.train.tensors import map_tensors


@dataclass
class StepInputs:
    """Everything a step reads besides the policy: the method and its options, the batch and the pairs it
    was collated from (the cache is keyed by pairs), the models, the reference cache, the training
    precision (None: the forwards run in the weights' dtype, as ``fp32``) and ``train.packing`` (for the rows
    a step collates itself)."""

    method: Method
    options: Any
    batch: Batch
    pairs: Sequence[TokenizedPair]
    bundle: ModelBundle
    cache: ReferenceCache | None = None
    padding_side: str = "right"
    precision: Precision | None = None
    packing: PackingMode = False


@dataclass
class ReferenceSide:
    """The reference's outputs on the batch, before the policy forward: per-token outputs (log-probs, or
    only hidden rows when the policy's forward will take them from the token-KL logits), the reference's
    output head when the token KL is needed, and an activation mask."""

    outputs: TokenOutputs
    head: Head | None = None
    activation_mask: torch.Tensor | None = None


def _token_model(policy: torch.nn.Module) -> TokenModel:
    return getattr(policy, "module", policy)


def activation_mask_for(ref_model: torch.nn.Module, types: Any, batch: Batch, run: Callable[[], Any]):
    """Run ``run()`` (a reference forward) while capturing ``types`` of activations and return its result with
    the MaPO mask built from them (``types``: an ``ActivationSpec`` of ``models.activations``); an empty one
    captures nothing and gives the all-ones mask (TDPO1's
    weighting, MaPO's ``uniform``)."""
    if not types:
        return run(), batch.response_mask.float()
    from sparsealign.masks import activation_mask
    from sparsealign.models.activations import capture_activations

    with capture_activations(ref_model, types, batch) as groups:
        result = run()
    return result, activation_mask(groups, batch.response_mask)


def reference_forward(
    ref_model: torch.nn.Module, token_model: TokenModel, inputs: StepInputs
) -> ReferenceSide:
    """One gradient-free reference forward asking only for what the method's needs want."""
    needs = inputs.method.needs
    module = token_model.extra
    layers = module.layers() if (Need.REFERENCE_LAYERS in needs and module is not None) else ()
    kl = Need.TOKEN_KL in needs
    tokens = TokenModel(ref_model, token_model.chunk, features=token_model.features)

    def run() -> TokenOutputs:
        return tokens(inputs.batch, layers=layers, head=not kl)

    mask = None
    if Need.ACTIVATION_MASK in needs:
        types = inputs.method.activation_types(inputs.options)
        outputs, mask = activation_mask_for(ref_model, types, inputs.batch, run)
    else:
        outputs = run()
    return ReferenceSide(outputs, output_head(ref_model) if kl else None, mask)


def reference_side(token_model: TokenModel, inputs: StepInputs) -> ReferenceSide | None:
    """Provider of the reference needs: the cache when there is one, else the reference model."""
    if not inputs.method.needs_reference:
        return None
    if inputs.cache is not None:
        return ReferenceSide(inputs.cache.outputs(inputs.pairs, inputs.batch))
    with torch.inference_mode(), inputs.bundle.reference_model() as ref_model:
        side = reference_forward(ref_model, token_model, inputs)
    return _ordinary(side)


def _ordinary(value: Any) -> Any:
    """``value`` with each tensor made under ``torch.inference_mode`` cloned into an ordinary tensor (nested in
    dataclasses, dicts, tuples and lists): autograd may then save it for the backward pass, e.g. the
    reference's hidden states that feed SparsePO's mask networks. The copies are response-aligned, small next
    to the forward whose autograd bookkeeping inference mode skips."""
    return map_tensors(value, lambda t: t.clone() if t.is_inference() else t)


def mismatched_outputs(policy: torch.nn.Module, inputs: StepInputs) -> tuple[TokenOutputs, TokenOutputs]:
    """Provider of ``Need.MISMATCHED``: policy and reference log-probs, without gradients, of each pair's
    two mismatched rows, 2B in all (its prompt with other prompts' responses, fixed with the data)."""
    pairs = inputs.pairs
    if not pairs or pairs[0].mismatched_ids is None:
        raise ValueError(
            "mismatched rows need the pairs the batch was collated from, prepared with their mismatched responses"
        )
    pad = inputs.bundle.tokenizer.pad_token_id
    rows = collate_mismatched(pairs, pad, inputs.padding_side, inputs.packing).to(
        inputs.batch.input_ids.device
    )
    with torch.inference_mode():
        if inputs.cache is not None:
            reference = inputs.cache.mismatched_outputs(pairs, rows)
        else:
            with inputs.bundle.reference_model() as ref_model:
                reference = TokenModel(ref_model, _token_model(policy).chunk)(rows)
        policy_rows = _token_model(policy)(rows, run_extra=False)
    return _ordinary(policy_rows), _ordinary(reference)


def _fill_mismatched(policy: torch.nn.Module, inputs: StepInputs, out: StepOutputs) -> None:
    out.mismatched_policy, out.mismatched_reference = mismatched_outputs(policy, inputs)


AFTER_POLICY: dict[Need, Callable[[torch.nn.Module, StepInputs, StepOutputs], None]] = {
    Need.MISMATCHED: _fill_mismatched,
}
"""Providers that run after the policy forward, by need."""


def step_outputs(policy: torch.nn.Module, inputs: StepInputs) -> StepOutputs:
    """The per-token outputs of one batch that the method's needs ask for (see the module docstring).

    In a mixed precision every forward (reference, policy, mismatched rows) runs under the precision's
    autocast and the outputs are returned in float32 (:func:`~sparsealign.train.precision.upcast`), so the
    loss, computed after this returns, outside autocast, is float32 throughout."""
    precision = inputs.precision
    if precision is None or not precision.mixed:
        return _step_outputs(policy, inputs)
    with precision.autocast():
        out = _step_outputs(policy, inputs)
    return upcast(out)


def _step_outputs(policy: torch.nn.Module, inputs: StepInputs) -> StepOutputs:
    token_model = _token_model(policy)
    reference = reference_side(token_model, inputs)
    ref_outputs = reference.outputs if reference is not None else None
    ref_head = reference.head if reference is not None else None
    out = policy(inputs.batch, reference=ref_outputs, reference_head=ref_head)
    if ref_outputs is not None:
        # the reference's log-probs come from the token-KL logits when the policy forward computed them;
        # its hidden states have served the method's module and are not kept for the backward pass
        logps = out.reference_logps if out.reference_logps is not None else ref_outputs.logps
        ref_outputs = dataclasses.replace(ref_outputs, logps=logps, layers={})
    result = StepOutputs(
        out,
        ref_outputs,
        inputs.batch.num_pairs,
        reference.activation_mask if reference is not None else None,
        labels=inputs.batch.labels,
    )
    for need in sorted(inputs.method.needs, key=lambda n: n.value):
        provide = AFTER_POLICY.get(need)
        if provide is not None:
            provide(policy, inputs, result)
    return result


def compute_loss(policy: torch.nn.Module, inputs: StepInputs) -> LossOutput:
    """The method's loss on one batch."""
    return inputs.method.loss(step_outputs(policy, inputs), inputs.options)


def step_inputs(
    cfg: Config,
    method: Method,
    bundle: ModelBundle,
    batch: Batch,
    pairs: Sequence[TokenizedPair] = (),
    cache: ReferenceCache | None = None,
) -> StepInputs:
    """The :class:`StepInputs` of one batch under ``cfg`` (its precision on the batch's device)."""
    precision = precision_of(cfg, batch.input_ids.device)
    return StepInputs(
        method, cfg.method, batch, pairs, bundle, cache, cfg.data.padding_side, precision, cfg.train.packing
    )


def prepare_method_data(
    cfg: Config, method: Method, bundle: ModelBundle, is_main_process: bool = True
) -> PreparedData:
    """The run's data as the method needs it: with mismatched rows when it needs them, and its own rewrite of
    the tokenised pairs (conditional SFT's control prefixes) applied to train and eval pairs. Binary feedback
    is accepted only by a method with ``binary_feedback``, which then sees the training labels (on the main
    process, so that it warns once)."""
    rewrite = None
    if method.prepare_pairs is not None:
        prepare = method.prepare_pairs
        tokenizer = bundle.tokenizer

        def rewrite(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
            return prepare(pairs, cfg.method, tokenizer, cfg.data.max_length)

    data = prepare_data(
        cfg,
        bundle,
        is_main_process,
        mismatched=Need.MISMATCHED in method.needs,
        prepare_pairs=rewrite,
        chosen_only=method.rows == "chosen",
        binary_feedback=method.binary_feedback is not None,
    )
    if method.binary_feedback is not None and is_main_process:  # paired data: one item of each kind per pair
        labels = (
            [bool(p.label) for p in data.train]
            if data.unpaired
            else [True] * len(data.train) + [False] * len(data.train)
        )
        method.binary_feedback(labels, cfg.method)
    return data


def sae_pooling(method: Method, cfg: Config) -> str:
    """Where the method averages SAE codes (``Need.SAE_FEATURES``): its ``sae_pooling`` or the response tokens."""
    return method.sae_pooling(cfg.method) if method.sae_pooling is not None else "response"


def parameter_groups(model: TokenModel, cfg: Config, method: Method) -> list[dict[str, Any]]:
    """AdamW parameter groups: the policy's trainable parameters with ``train.weight_decay``; a method's own
    module with the method's weight decay on its weight matrices and none on biases and norms (SparsePO)."""
    policy = [p for p in model.model.parameters() if p.requires_grad]
    groups = [{"params": policy, "weight_decay": cfg.train.weight_decay}]
    if model.extra is not None:
        decay = (
            method.module_weight_decay(cfg.method)
            if method.module_weight_decay is not None
            else cfg.train.weight_decay
        )
        named = [(n, p) for n, p in model.extra.named_parameters() if p.requires_grad]
        groups += [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def clip_gradients(accelerator: Any, policy: torch.nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients before the optimizer step; return the norm of all gradients but those clipped apart.

    Every trainable parameter is clipped together to ``max_norm`` (``train.max_grad_norm``), except those of a
    method's module that sets a ``max_grad_norm`` attribute (not None): those are clipped by themselves to
    that norm, so that the module's and the language model's gradients never rescale each other (HALOs clips
    PPO's value head to 0.1 and the model to its own norm). Under DeepSpeed the engine clips everything
    together from its own config."""
    module = _token_model(policy).extra
    own = getattr(module, "max_grad_norm", None) if module is not None else None
    if own is None:
        return accelerator.clip_grad_norm_(policy.parameters(), max_norm)
    apart = list(module.parameters())
    accelerator.clip_grad_norm_(apart, own)
    ids = {id(p) for p in apart}
    return accelerator.clip_grad_norm_([p for p in policy.parameters() if id(p) not in ids], max_norm)


def build_optimizer(model: TokenModel, cfg: Config, method: Method) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`.

    The fused implementation (CPU and CUDA) updates each tensor in place: no optimizer-wide temporaries, so
    the step's peak memory is the states themselves (the for-each default allocates copies of all of them),
    and it is several times faster on CPU."""
    from sparsealign.errors import UserError

    groups = parameter_groups(model, cfg, method)
    if not groups:
        raise UserError("The model has no trainable parameters.")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), fused=fused)
