"""Reference-model activation capture for MaPO, through forward hooks on any Hugging Face causal LM.

MaPO (spec ``sparsepo.md`` §4) turns the frozen reference model's activations into a token mask. The
original code got them from patched copies of four modeling files, with hooks that silently did not fire
on some architectures (no MLP hooks on GPT-2 / GPT-BigCode, a crash on BigCode's eager path). Here the
activations are taken with ordinary PyTorch hooks on the unmodified modules of the model's decoder-layer
list, found by a small table of known module names; a layout that matches none of them raises a
``ValueError`` naming what was looked for and what the layer has, and a hook that never fires during the
forward raises a ``RuntimeError`` when the context exits. Nothing fails silently.

What each type captures, per decoder layer ``i`` (layer order, then the order below):

``mlp``
    The MLP activation output, i.e. the *input* of the MLP's output projection (forward pre-hook on
    ``mlp.down_proj`` for Llama/Qwen2/Gemma-2/Mistral, ``mlp.c_proj`` for GPT-2 and GPT-BigCode,
    ``mlp.dense_4h_to_h`` for GPT-NeoX, ``mlp.fc_out`` for GPT-J); width = intermediate size. For gated
    MLPs this is ``act(gate_proj(x)) * up_proj(x)``.
``attn``
    The query/key/value projection outputs -- ``q_proj``, ``k_proj``, ``v_proj`` separately where the
    attention has them (Llama-like, GPT-J), else the fused projection's output (GPT-2 / BigCode
    ``c_attn``, NeoX ``query_key_value``) -- then the attention output before the output projection (the
    input of ``o_proj`` / ``c_proj`` / ``dense`` / ``out_proj``). q and k are taken *before* rotary
    embeddings (the original also hooked the rotated q/k; they carry the same content, rotated by
    position).
``resid``
    Each decoder layer's output hidden state (forward hook on the layer; ``output[0]`` for tuples). For
    layers ``< L-1`` this equals ``hidden_states[i + 1]`` of ``output_hidden_states=True``; HF replaces the
    last entry by the final-normed state, the capture of the last layer is *before* the final norm.
``logits``
    LM-head logits at the response positions, ``[N, T, V]``. :class:`~sparsealign.models.logprobs.TokenModel`
    runs the decoder and applies the head to gathered rows itself, so the head module never sees the full
    sequence; instead the decoder's output (the final-normed hidden states) is hooked, gathered at the
    response positions, and sent through :func:`~sparsealign.models.logprobs.output_head` (which includes
    Gemma-2's soft-capping etc.). This works the same when the full LM forward is called. Only the real
    response rows go through the head: memory is at most ``[N, T, V]``, never ``[N, L, V]``.

Every hook gathers the ``[N, L, W]`` tensor at ``batch.response_index`` straight away, keeping only the
response-aligned ``[N, T, W]`` rows (detached, zero where ``batch.response_mask`` is False), so the full
tensor is freed with the forward. Models wrapped by PEFT work: LoRA replaces a ``Linear`` by a wrapper at
the same module path, whose input is the same and whose output includes the adapter (or not, under
``disable_adapter()``), so the wrapper is hooked.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsealign.data.collate import Batch
from sparsealign.masks.activation import ACTIVATION_TYPES
from sparsealign.models.logprobs import output_head, unwrap_causal_lm

ALL = "all"
"""Every type of :data:`~sparsealign.masks.activation.ACTIVATION_TYPES`."""

UNIFORM = "uniform"
"""No capture: the caller uses an all-ones mask (MaPO then equals TDPO1, the paper's ablation)."""

MLP_OUTPUT_PROJECTIONS: tuple[str, ...] = (
    "mlp.down_proj",  # Llama, Mistral, Qwen2/3, Gemma/Gemma-2, Phi-3, OLMo
    "mlp.c_proj",  # GPT-2, GPT-BigCode
    "mlp.dense_4h_to_h",  # GPT-NeoX (Pythia), Falcon, BLOOM
    "mlp.fc_out",  # GPT-J
    "mlp.fc2",  # Phi
    "fc2",  # OPT
)
"""Paths (relative to a decoder layer) of the MLP's output projection; its input is the MLP activation."""

ATTENTION_OUTPUT_PROJECTIONS: tuple[str, ...] = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen2/3, Gemma/Gemma-2, Phi-3, OLMo
    "attn.c_proj",  # GPT-2, GPT-BigCode
    "attention.dense",  # GPT-NeoX (Pythia)
    "attn.out_proj",  # GPT-J
    "self_attention.dense",  # Falcon, BLOOM
    "self_attn.out_proj",  # OPT
    "self_attn.dense",  # Phi
)
"""Paths of the attention output projection; its input is the attention output (heads merged)."""

SEPARATE_QKV: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
"""Separate query/key/value projections, looked up next to the attention output projection."""

FUSED_QKV: tuple[str, ...] = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")
"""Fused query-key-value projections, used when the separate ones are absent."""


@dataclass(frozen=True)
class HookPoint:
    """One place an activation is taken from.

    ``type``: the activation type; ``layer``: the decoder layer index (``None`` for the decoder output used
    by ``logits``); ``name``: the module path relative to the layer (``""`` for the layer itself,
    ``"<decoder>"`` for the decoder); ``pre``: True for a forward pre-hook (the module's first input),
    False for a forward hook (its output).
    """

    type: str
    layer: int | None
    name: str
    module: nn.Module
    pre: bool


def resolve_activation_types(spec: str | Sequence[str]) -> list[str]:
    """Validate and expand an ``--activation_hook`` value into a list of activation types.

    Accepts one name, a comma-separated string (``"mlp,attn"``) or a list. ``all`` expands to
    ``mlp, attn, resid, logits``; duplicates are dropped (first occurrence kept). ``uniform`` returns ``[]``:
    nothing is captured and the caller uses an all-ones mask; it cannot be combined with other names. An
    unknown name raises ``ValueError`` with the closest valid name; so does an empty specification (the
    original code crashed on ``none`` only when concatenating an empty list).
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(part).strip() for part in parts]
    names = [name for name in names if name]
    valid = (*ACTIVATION_TYPES, ALL, UNIFORM)
    if not names:
        raise ValueError(f"no activation type given; choose from {', '.join(valid)}")
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name.lower(), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown activation type {name!r}{hint} (valid: {', '.join(valid)})")
    if UNIFORM in names:
        if len(set(names)) > 1:
            raise ValueError(f"{UNIFORM!r} (no capture, all-ones mask) cannot be combined with {names}")
        return []
    result: list[str] = []
    for name in names:
        for expanded in ACTIVATION_TYPES if name == ALL else (name,):
            if expanded not in result:
                result.append(expanded)
    return result


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list: the first ``nn.ModuleList`` in the decoder with ``num_hidden_layers`` entries.

    Covers GPT-2 / GPT-J / GPT-BigCode ``h`` and Llama / Qwen2 / Gemma-2 / GPT-NeoX ``layers``. Raises
    ``ValueError`` listing the module lists found when none has the configured length.
    """
    lm = unwrap_causal_lm(model)
    decoder = lm.get_decoder()
    config = lm.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    found = []
    for name, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList):
            if count is not None and len(module) == count:
                return module
            found.append(f"{name or '<decoder>'} (length {len(module)})")
    raise ValueError(
        f"cannot find the decoder-layer list of {type(decoder).__name__}: no nn.ModuleList of length "
        f"num_hidden_layers={count}; module lists found: {', '.join(found) or 'none'}"
    )


def _lookup(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _layer_contents(layer: nn.Module, depth: int = 3) -> str:
    """Module paths of a layer (adapter internals left out), for error messages."""
    entries = []
    for name, module in layer.named_modules():
        parts = name.split(".")
        if not name or len(parts) > depth or any(p.startswith(("lora_", "base_layer")) for p in parts):
            continue
        entries.append(f"{name} ({type(module).__name__})")
    return ", ".join(entries) or "no submodules"


def _find(layer: nn.Module, index: int, candidates: Sequence[str], what: str) -> str:
    for path in candidates:
        if _lookup(layer, path) is not None:
            return path
    raise ValueError(
        f"cannot find the {what} in decoder layer {index} ({type(layer).__name__}); looked for "
        f"{', '.join(candidates)}; the layer has: {_layer_contents(layer)}. This architecture is not "
        "supported for these activation types (add its module name to the table in "
        "sparsealign.models.activations)"
    )


def hook_points(model: nn.Module, types: str | Sequence[str]) -> list[HookPoint]:
    """Where each requested activation type is taken from, in capture order (layer by layer).

    Raises ``ValueError`` when a requested type's modules cannot be found (see the module docstring).
    Only the requested types are looked up, so e.g. ``resid`` works on any model with a layer list.
    """
    wanted = resolve_activation_types(types)
    if not wanted:
        return []
    points: list[HookPoint] = []
    layers = decoder_layers(model) if set(wanted) & {"mlp", "attn", "resid"} else nn.ModuleList()
    for kind in wanted:
        if kind == "logits":
            decoder = unwrap_causal_lm(model).get_decoder()
            points.append(HookPoint("logits", None, "<decoder>", decoder, pre=False))
            continue
        for index, layer in enumerate(layers):
            if kind == "resid":
                points.append(HookPoint("resid", index, "", layer, pre=False))
            elif kind == "mlp":
                path = _find(layer, index, MLP_OUTPUT_PROJECTIONS, "MLP output projection")
                points.append(HookPoint("mlp", index, path, layer.get_submodule(path), pre=True))
            else:  # attn
                out_path = _find(layer, index, ATTENTION_OUTPUT_PROJECTIONS, "attention output projection")
                parent = out_path.rpartition(".")[0]
                prefix = f"{parent}." if parent else ""
                separate = [_lookup(layer, prefix + name) for name in SEPARATE_QKV]
                if all(module is not None for module in separate):
                    qkv = list(SEPARATE_QKV)
                else:
                    qkv = [name for name in FUSED_QKV if _lookup(layer, prefix + name) is not None][:1]
                for name in qkv:
                    path = prefix + name
                    points.append(HookPoint("attn", index, path, layer.get_submodule(path), pre=False))
                points.append(HookPoint("attn", index, out_path, layer.get_submodule(out_path), pre=True))
    return points


def _first_tensor(value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    try:  # ModelOutput without last_hidden_state
        first = value[0]  # type: ignore[index]
    except (TypeError, IndexError, KeyError):
        first = None
    if isinstance(first, Tensor):
        return first
    raise TypeError(f"cannot find a tensor in a hooked module's value of type {type(value).__name__}")


class _Gather:
    """Response-aligned gathering of ``[N, L, W]`` hook values (``[N·L, W]`` is reshaped first)."""

    def __init__(self, batch: Batch) -> None:
        self.rows, self.length = batch.input_ids.shape
        self.index = batch.response_index
        self.mask = batch.response_mask.bool()

    def __call__(self, value: Tensor, where: str) -> Tensor:
        value = value.detach()
        if value.dim() == 2 and value.shape[0] == self.rows * self.length:
            value = value.reshape(self.rows, self.length, -1)
        if value.dim() != 3 or value.shape[:2] != (self.rows, self.length):
            raise ValueError(
                f"activation at {where} has shape {tuple(value.shape)}, expected [N, L, W] with [N, L] = "
                f"{(self.rows, self.length)} (the batch given to capture_activations); run exactly that "
                "batch inside the context"
            )
        index = self.index.to(value.device)
        mask = self.mask.to(value.device).unsqueeze(-1)
        rows = torch.arange(self.rows, device=value.device).unsqueeze(1)
        gathered = value[rows, index]  # a copy: [N, T, W]
        return torch.where(mask, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


@contextmanager
def capture_activations(
    model: nn.Module, types: str | Sequence[str], batch: Batch
) -> Iterator[dict[str, list[Tensor]]]:
    """Capture the reference model's activations of ``types`` during one forward of ``batch``.

    Yields a dict mapping each requested type to a list of response-aligned ``[N, T, W]`` tensors (one per
    :func:`hook_points` entry of that type: layer order; for ``attn`` q, k, v (or fused qkv) then the
    attention output of each layer), detached and zero outside ``batch.response_mask``; the lists fill in
    as the forward runs and are ready for :func:`~sparsealign.masks.activation.activation_mask`::

        with torch.no_grad(), capture_activations(ref_model, ["mlp", "attn"], batch) as groups:
            ref_out = TokenModel(ref_model)(batch)
        mask = activation_mask(groups, batch.response_mask)

    Run one forward of exactly ``batch`` inside the block (a second forward overwrites the first's values).
    ``types`` goes through :func:`resolve_activation_types`; ``uniform`` registers nothing and yields
    ``{}``. Hooks are registered only for the requested types and removed on exit, also when the block
    raises. On a normal exit, a registered hook that never fired raises ``RuntimeError`` (an activation
    silently missing from the mask would change the method).
    """
    points = hook_points(model, types)
    groups: dict[str, list[Tensor]] = {point.type: [] for point in points}
    slots: dict[int, Tensor] = {}
    gather = _Gather(batch)
    head = output_head(model) if any(point.type == "logits" for point in points) else None
    mask = batch.response_mask.bool()

    def store(slot: int, value: Tensor) -> None:
        slots[slot] = value
        kind = points[slot].type
        groups[kind][:] = [slots[i] for i, p in enumerate(points) if p.type == kind and i in slots]

    def describe(point: HookPoint) -> str:
        return point.name if point.layer is None else f"layer {point.layer} {point.name or '<layer>'}"

    def make_hook(slot: int, point: HookPoint) -> Callable[..., None]:
        where = describe(point)

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not args:
                raise ValueError(f"{where} was called without a positional input; cannot capture it")
            with torch.no_grad():
                store(slot, gather(_first_tensor(args[0]), where))

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            with torch.no_grad():
                value = gather(_first_tensor(output), where)
                if point.type == "logits":
                    assert head is not None
                    rows = head(value[mask.to(value.device)])  # [M, V]: real response rows only
                    logits = rows.new_zeros((*mask.shape, rows.shape[-1]))
                    value = logits.masked_scatter(mask.to(rows.device).unsqueeze(-1), rows)
                store(slot, value)

        return pre_hook if point.pre else hook

    handles = []
    try:
        for slot, point in enumerate(points):
            fn = make_hook(slot, point)
            if point.pre:
                handles.append(point.module.register_forward_pre_hook(fn))
            else:
                handles.append(point.module.register_forward_hook(fn))
        yield groups
    finally:
        for handle in handles:
            handle.remove()
    missing = [describe(point) for slot, point in enumerate(points) if slot not in slots]
    if missing:
        raise RuntimeError(
            f"{len(missing)} activation hook(s) never fired during the forward: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. Run the model on the batch inside the "
            "capture_activations block; if you did, this architecture calls these modules differently "
            "and is not supported for these activation types"
        )
