"""Reference-model activation capture for MaPO, through forward hooks on any Hugging Face causal LM.

MaPO (spec ``sparsepo.md`` §4) turns the frozen reference model's activations into a token mask. The
``method.activations`` option (:func:`resolve_activation_types`) says which activation *types* are taken
(``mlp``, ``attn``, ``resid``, ``logits``) and at which *hook set*: ``compact`` (the default: ``all``, a
type, or a comma-separated list of types) or ``original`` (``original``, or ``original:TYPES``), the
original SparsePO code's hook points. Both are read with :func:`sparsealign.models.hooks.capture` on the
unmodified modules of the model; a module that cannot be found raises a ``ValueError`` naming what was
looked for, and a hook that never fires raises a ``RuntimeError`` when the context exits. Nothing fails
silently. Every value is gathered at ``batch.response_index`` inside its hook (response-aligned
``[N, T, W]``, detached, zero where ``batch.response_mask`` is False), so the full tensors are freed with
the forward. LoRA wrappers (PEFT) sit at the same module paths and are hooked like the plain modules.

Compact hook set (one tensor per module; what each type captures, per decoder layer ``i``):

``mlp``
    The MLP activation output, i.e. the *input* of the MLP's output projection (``mlp.down_proj`` for
    Llama/Qwen2/Gemma-2/Mistral, ``mlp.c_proj`` for GPT-2 and GPT-BigCode, ``mlp.dense_4h_to_h`` for
    GPT-NeoX, ``mlp.fc_out`` for GPT-J); width = intermediate size. For gated MLPs this is
    ``act(gate_proj(x)) * up_proj(x)``.
``attn``
    The query/key/value projection outputs -- ``q_proj``, ``k_proj``, ``v_proj`` separately where the
    attention has them (Llama-like, GPT-J), else the fused projection's output as one tensor (GPT-2 /
    BigCode ``c_attn``, NeoX ``query_key_value``) -- then the attention output before the output
    projection (the input of ``o_proj`` / ``c_proj`` / ``dense`` / ``out_proj``); q and k before rotary
    embeddings.
``resid``
    Each decoder layer's output hidden state. For layers ``< L-1`` this equals ``hidden_states[i + 1]`` of
    ``output_hidden_states=True``; HF replaces the last entry by the final-normed state, the capture of the
    last layer is *before* the final norm.
``logits``
    LM-head logits at the response positions, ``[N, T, V]``. :class:`~sparsealign.models.logprobs.TokenModel`
    runs the decoder and applies the head to gathered rows itself, so the head module never sees the full
    sequence; instead the decoder's output (the final-normed hidden states) is hooked, gathered, and sent
    through :func:`~sparsealign.models.logprobs.output_head` (which includes Gemma-2's soft-capping etc.)
    after the forward, for the real response rows only: at most ``[N, T, V]``, never ``[N, L, V]``.

Original hook set (``original``): exactly the hook points that fire in the SparsePO code's patched modeling
files (``src/masks/modeling_*.py`` with the MaPO trainer's ``config_hooks``, spec §4.2), read from the
modules of the unmodified model. The paper's MaPO mask is the mean of their maps within, then across,
types. Points are named by their original hook paths; per decoder layer unless marked *body*:

GPT-2 (the IMDB model)
    attn: ``attn.q``, ``attn.k``, ``attn.v`` (the three thirds of ``c_attn``'s output), ``attn.v_out``
    (``c_proj``'s input). resid: body ``resid.post_emb`` (``drop``'s output: token + position
    embeddings), ``resid.torso.input_ln_attn`` (``ln_1`` out), ``post_ln_attn`` (``ln_2`` out),
    ``delta_attn`` (``ln_2``'s input: the post-attention residual stream), ``delta_mlp`` (``mlp`` out),
    ``post_mlp`` (layer out), body ``resid.post_ln_f`` (``ln_f`` out). **No mlp**: the original block
    calls its MLP without hooks.
GPT-BigCode (MBPP)
    As GPT-2, with q/k/v split as the model splits ``c_attn`` (multi-query ``[q | k | v]``, else each
    head's ``[q | k | v]``) and ``attn.v_out`` = the attention module's output (after ``c_proj``). No mlp.
GPT-NeoX (HH, Pythia)
    attn: q, k, v (each head's thirds of ``query_key_value``), ``post_rota_emb_q``, ``post_rota_emb_k``,
    ``v_out`` (``dense``'s input). mlp: ``mlp.post_act`` (``dense_4h_to_h``'s input). resid: body
    ``post_emb`` (``emb_dropout`` out), ``input_ln_attn``, ``post_ln_attn``, ``delta_attn``
    (``post_attention_dropout`` out: the attention output), ``post_attn`` (``post_attention_layernorm``'s
    input; sequential blocks only, Pythia's parallel blocks have none), ``delta_mlp`` (``post_mlp_dropout``
    out), ``post_mlp``, body ``post_ln_f`` (``final_layer_norm`` out).
GPT-J (TL;DR)
    attn: q, k, v (``q_proj``/``k_proj``/``v_proj`` out), ``post_rota_emb_q/k``, ``v_out`` (the attention
    module's output, after ``out_proj``). mlp: ``mlp.post_act`` (``fc_out``'s input). resid: body
    ``post_emb``, ``input_ln_attn`` (``ln_1`` out), ``delta_attn`` (attention out), ``delta_mlp``,
    ``post_mlp``, body ``post_ln_f``: a parallel block has no ``post_ln_attn``.
Llama, Mistral, Qwen2 (not in the original code; its closest layout, sequential GPT-NeoX, is used)
    attn: q, k, v (``*_proj`` out), ``post_rota_emb_q/k``, ``v_out`` (``o_proj``'s input). mlp:
    ``mlp.post_act`` (``down_proj``'s input). resid: body ``post_emb`` (``embed_tokens`` out),
    ``input_ln_attn``, ``post_ln_attn``, ``delta_attn`` (``self_attn`` out), ``post_attn``, ``delta_mlp``
    (``mlp`` out), ``post_mlp``, body ``post_ln_f`` (``norm`` out).

Each of q, k and v is its own map (never the fused projection as one tensor). ``post_rota_emb_q/k`` are q
and k after the rotary embedding, computed after the forward from the captured q/k and the decoder's
rotary table (``rotary_emb``'s output, hooked) by the model's own rule: rotate-half on the first
``rotary_dim`` channels of each head for NeoX and Llama-like models, rotate-every-two for GPT-J. GPT-2 and
GPT-BigCode follow the original's default SDPA attention path (under eager attention the original took
only v_out; its BigCode eager path crashed); the original's ``resid.torso.post_ln_mlp`` fired in no
architecture. ``logits`` is as in the compact set. Other architectures raise a ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparsealign.data.collate import Batch
from sparsealign.masks.activation import ACTIVATION_TYPES
from sparsealign.models.hooks import Tap, at_positions, capture, decoder_layers, first_tensor, submodule
from sparsealign.models.logprobs import output_head, unwrap_causal_lm

__all__ = [
    "ALL",
    "COMPACT",
    "ORIGINAL",
    "ORIGINAL_ARCHITECTURES",
    "UNIFORM",
    "ActivationSpec",
    "HookPoint",
    "capture_activations",
    "decoder_layers",
    "hook_points",
    "resolve_activation_types",
]

ALL = "all"
"""Every type of :data:`~sparsealign.masks.activation.ACTIVATION_TYPES`."""

UNIFORM = "uniform"
"""No capture: the caller uses an all-ones mask (MaPO then equals TDPO1, the paper's ablation)."""

COMPACT = "compact"
"""The default hook set: one tensor per module (see the module docstring)."""

ORIGINAL = "original"
"""The SparsePO code's hook points per architecture (see the module docstring)."""

AUX = ""
"""The type of a value captured only to compute others (the decoder output for logits, a rotary table)."""

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
class ActivationSpec:
    """A resolved ``method.activations`` value: the activation ``types`` to capture (in order) and the
    hook set (``hooks``: ``"compact"`` or ``"original"``). Empty ``types`` is ``uniform`` (no capture, an
    all-ones mask); the spec is then false in a boolean context."""

    types: tuple[str, ...]
    hooks: Literal["compact", "original"] = COMPACT

    def __bool__(self) -> bool:
        return bool(self.types)


def resolve_activation_types(spec: str | Sequence[str] | ActivationSpec) -> ActivationSpec:
    """Validate and resolve a ``method.activations`` (the SparsePO code's ``--activation_hook``) value.

    Compact hook set: one name, a comma-separated string (``"mlp,attn"``) or a list; ``all`` expands to
    ``mlp, attn, resid, logits``; duplicates are dropped (first occurrence kept). ``uniform`` gives no
    types: nothing is captured and the caller uses an all-ones mask; it cannot be combined with other
    names. Original hook set: ``original`` (all four types, the paper's ``all``) or ``original:TYPES`` with
    TYPES as above (``original:attn``: the original code's ``--activation_hook=attn``). An unknown name
    raises ``ValueError`` with the closest valid name; so does an empty specification (the original code
    crashed on ``none`` only when concatenating an empty list). An :class:`ActivationSpec` is returned as is.
    """
    if isinstance(spec, ActivationSpec):
        return spec
    text = spec if isinstance(spec, str) else ",".join(str(part) for part in spec)
    hooks = COMPACT
    prefix, colon, rest = text.partition(":")
    if colon:
        if prefix.strip() != ORIGINAL:
            raise ValueError(
                f"unknown hook set {prefix.strip()!r} in {text!r}: only {ORIGINAL!r} may prefix the types "
                f"(e.g. {ORIGINAL}:attn,resid)"
            )
        hooks, text = ORIGINAL, rest
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not colon and names == [ORIGINAL]:
        return ActivationSpec(ACTIVATION_TYPES, ORIGINAL)
    valid = (*ACTIVATION_TYPES, ALL, UNIFORM) + (() if colon else (ORIGINAL,))
    if not names:
        raise ValueError(f"no activation type given; choose from {', '.join(valid)}")
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name.lower(), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown activation type {name!r}{hint} (valid: {', '.join(valid)})")
    if ORIGINAL in names:
        raise ValueError(
            f"{ORIGINAL!r} selects the original code's hook points and cannot be listed with types; write "
            f"{ORIGINAL}:{','.join(n for n in names if n != ORIGINAL)}"
        )
    if UNIFORM in names:
        if colon:
            raise ValueError(f"{UNIFORM!r} captures nothing (an all-ones mask): write it without a hook set")
        if len(set(names)) > 1:
            raise ValueError(f"{UNIFORM!r} (no capture, all-ones mask) cannot be combined with {text!r}")
        return ActivationSpec(())
    types: list[str] = []
    for name in names:
        for expanded in ACTIVATION_TYPES if name == ALL else (name,):
            if expanded not in types:
                types.append(expanded)
    return ActivationSpec(tuple(types), hooks)


@dataclass(frozen=True)
class HookPoint:
    """One activation of the plan.

    ``type``: the activation type (:data:`AUX` for a value only used to compute others); ``layer``: the
    decoder layer index (``None`` for the body: embeddings, final norm, decoder output, rotary table);
    ``name``: a module path relative to the layer (compact set; ``""`` = the layer itself) or the original
    code's hook path (original set, e.g. ``"attn.q"``); ``module``: the hooked module, or ``None`` for a
    value computed after the forward by ``derive`` from the captured values (keyed by :attr:`key`);
    ``pre``: read the module's first input (a forward pre-hook) instead of its output; ``select``: turns
    the hooked value into the tensor (e.g. the query third of a fused projection).
    """

    type: str
    layer: int | None
    name: str
    module: nn.Module | None
    pre: bool = False
    select: Callable[[Any], Tensor] = first_tensor
    derive: Callable[[Mapping[str, Tensor]], Tensor] | None = None

    @property
    def key(self) -> str:
        """A unique, readable name: ``"layer 3 attn.q"``, ``"layer 0 <layer>"``, ``"resid.post_emb"``."""
        return self.name if self.layer is None else f"layer {self.layer} {self.name or '<layer>'}"


# ------------------------------------------------------------------------------------------------------
# Module lookup


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
        if submodule(layer, path) is not None:
            return path
    raise ValueError(
        f"cannot find the {what} in decoder layer {index} ({type(layer).__name__}); looked for "
        f"{', '.join(candidates)}; the layer has: {_layer_contents(layer)}. This architecture is not "
        "supported for these activation types (add its module name to the table in "
        "sparsealign.models.activations)"
    )


def _module(root: nn.Module, path: str, where: str) -> nn.Module:
    """``root``'s module at ``path`` (``""``: root itself), or a ``ValueError`` saying what is there."""
    module = submodule(root, path) if path else root
    if module is None:
        raise ValueError(
            f"cannot find {path!r} in {where} ({type(root).__name__}), which the original hook set reads; "
            f"it has: {_layer_contents(root)}"
        )
    return module


# ------------------------------------------------------------------------------------------------------
# The logits, computed after the forward from the gathered decoder output


def _logits_point(model: nn.Module, mask: Tensor | None) -> list[HookPoint]:
    """The decoder output (hooked) and the logits computed from it for the rows of ``mask`` (``[N, T]``)."""
    head = output_head(model)
    decoder = HookPoint(AUX, None, "<decoder>", unwrap_causal_lm(model).get_decoder())

    def logits(values: Mapping[str, Tensor]) -> Tensor:
        hidden = values[decoder.key]
        on = hidden.new_ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask.to(hidden.device)
        rows = head(hidden[on])  # [M, V]: real response rows only
        return rows.new_zeros((*on.shape, rows.shape[-1])).masked_scatter(on.unsqueeze(-1), rows)

    return [decoder, HookPoint("logits", None, "logits", None, derive=logits)]


# ------------------------------------------------------------------------------------------------------
# Compact hook set


def _compact_points(model: nn.Module, types: Sequence[str], mask: Tensor | None) -> list[HookPoint]:
    points: list[HookPoint] = []
    layers = decoder_layers(model) if set(types) & {"mlp", "attn", "resid"} else nn.ModuleList()
    for kind in types:
        if kind == "logits":
            points.extend(_logits_point(model, mask))
            continue
        for index, layer in enumerate(layers):
            if kind == "resid":
                points.append(HookPoint("resid", index, "", layer))
            elif kind == "mlp":
                path = _find(layer, index, MLP_OUTPUT_PROJECTIONS, "MLP output projection")
                points.append(HookPoint("mlp", index, path, layer.get_submodule(path), pre=True))
            else:  # attn
                out_path = _find(layer, index, ATTENTION_OUTPUT_PROJECTIONS, "attention output projection")
                parent = out_path.rpartition(".")[0]
                prefix = f"{parent}." if parent else ""
                separate = [submodule(layer, prefix + name) for name in SEPARATE_QKV]
                if all(module is not None for module in separate):
                    qkv = list(SEPARATE_QKV)
                else:
                    qkv = [name for name in FUSED_QKV if submodule(layer, prefix + name) is not None][:1]
                for name in qkv:
                    path = prefix + name
                    points.append(HookPoint("attn", index, path, layer.get_submodule(path)))
                points.append(HookPoint("attn", index, out_path, layer.get_submodule(out_path), pre=True))
    return points


# ------------------------------------------------------------------------------------------------------
# Original hook set


@dataclass(frozen=True)
class _Site:
    """One original hook point of a layer (or of the body): where the unmodified model holds its value."""

    type: str
    name: str
    path: str  # relative to the layer ("" = the layer), or to the decoder for body sites
    pre: bool = False
    select: Callable[[Any], Tensor] = first_tensor
    rotates: str | None = None  # a post-rotary q/k: computed from this site of the same layer, not hooked


@dataclass(frozen=True)
class _Rotary:
    """How q and k are rotated: the decoder's rotary module, how its output becomes one ``[B, L, ·]``
    tensor, and the rotation ``rotate(x [N, T, heads, hd], table [N, T, ·]) -> [N, T, heads, hd]``."""

    path: str
    table: Callable[[Any], Tensor]
    rotate: Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _Layout:
    """An architecture's original hook points: body sites, per-layer sites, rotary embedding, head size."""

    body: tuple[_Site, _Site]  # resid.post_emb, resid.post_ln_f
    layer: Callable[[nn.Module], list[_Site]]
    rotary: _Rotary | None = None
    head_dim: Callable[[nn.Module], int] | None = None


def _columns(start: int, stop: int) -> Callable[[Any], Tensor]:
    """Selector of the channels ``start:stop`` (e.g. the query third of GPT-2's ``c_attn``)."""
    return lambda value: first_tensor(value)[..., start:stop]


def _head_part(head_dim: int, parts: int, part: int) -> Callable[[Any], Tensor]:
    """Selector of part ``part`` of a per-head interleaved projection ``[..., heads · parts · hd]`` (GPT-NeoX,
    multi-head GPT-BigCode: each head holds its ``[q | k | v]``), heads merged back: ``[..., heads · hd]``."""

    def select(value: Any) -> Tensor:
        fused = first_tensor(value)
        per_head = fused.reshape(*fused.shape[:-1], -1, parts * head_dim)
        return per_head[..., part * head_dim : (part + 1) * head_dim].reshape(*fused.shape[:-1], -1)

    return select


def _cos_sin(value: Any) -> Tensor:
    """``(cos, sin)`` of a rotate-half rotary module as one ``[B, L, 2r]`` tensor."""
    cos, sin = value
    return torch.cat((cos, sin), dim=-1)


def _sin_cos(value: Any) -> Tensor:
    """``(sin, cos)`` of GPT-J's rotary module (each ``[B, L, r/2]``) as one ``[B, L, r]`` tensor."""
    sin, cos = value
    return torch.cat((sin, cos), dim=-1)


def _rotate_half(x: Tensor, table: Tensor) -> Tensor:
    """GPT-NeoX / Llama RoPE on the first ``r`` channels of each head: ``x·cos + rotate_half(x)·sin`` with
    ``rotate_half([a, b]) = [−b, a]`` (halves of the ``r`` channels); ``table`` = ``[cos | sin]``."""
    cos, sin = table.unsqueeze(-2).chunk(2, dim=-1)
    width = cos.shape[-1]
    rot, rest = x[..., :width], x[..., width:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1)


def _rotate_every_two(x: Tensor, table: Tensor) -> Tensor:
    """GPT-J RoPE on the first ``r`` channels of each head: ``x·cos + rotate_every_two(x)·sin`` with
    ``rotate_every_two`` mapping each pair ``(a, b)`` to ``(−b, a)``, and sin/cos repeated per pair;
    ``table`` = ``[sin | cos]``, each ``r/2`` wide."""
    sin, cos = table.unsqueeze(-2).chunk(2, dim=-1)
    sin, cos = sin.repeat_interleave(2, dim=-1), cos.repeat_interleave(2, dim=-1)
    width = cos.shape[-1]
    rot, rest = x[..., :width], x[..., width:]
    pairs = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((rot * cos + pairs * sin, rest), dim=-1)


ROTARY_QK: tuple[_Site, _Site] = (
    _Site("attn", "attn.post_rota_emb_q", "", rotates="attn.q"),
    _Site("attn", "attn.post_rota_emb_k", "", rotates="attn.k"),
)
"""q and k after the rotary embedding (NeoX, GPT-J, Llama-like)."""


def _gpt_resid(delta_attn: _Site) -> list[_Site]:
    """GPT-2 / GPT-BigCode residual points (``delta_attn`` is the post-attention residual there)."""
    return [
        _Site("resid", "resid.torso.input_ln_attn", "ln_1"),
        _Site("resid", "resid.torso.post_ln_attn", "ln_2"),
        delta_attn,
        _Site("resid", "resid.torso.delta_mlp", "mlp"),
        _Site("resid", "resid.torso.post_mlp", ""),
    ]


def _gpt2_layer(layer: nn.Module) -> list[_Site]:
    width = layer.attn.split_size
    return [
        _Site("attn", "attn.q", "attn.c_attn", select=_columns(0, width)),
        _Site("attn", "attn.k", "attn.c_attn", select=_columns(width, 2 * width)),
        _Site("attn", "attn.v", "attn.c_attn", select=_columns(2 * width, 3 * width)),
        _Site("attn", "attn.v_out", "attn.c_proj", pre=True),
        *_gpt_resid(_Site("resid", "resid.torso.delta_attn", "ln_2", pre=True)),
    ]


def _bigcode_layer(layer: nn.Module) -> list[_Site]:
    attn = layer.attn
    if attn.multi_query:  # [q (heads·hd) | k (hd) | v (hd)]
        width, kv = attn.embed_dim, attn.kv_dim
        qkv = [_columns(0, width), _columns(width, width + kv), _columns(width + kv, width + 2 * kv)]
    else:
        qkv = [_head_part(attn.head_dim, 3, part) for part in range(3)]
    return [
        *(_Site("attn", f"attn.{n}", "attn.c_attn", select=s) for n, s in zip("qkv", qkv, strict=True)),
        _Site("attn", "attn.v_out", "attn"),
        *_gpt_resid(_Site("resid", "resid.torso.delta_attn", "ln_2", pre=True)),
    ]


def _neox_layer(layer: nn.Module) -> list[_Site]:
    head_dim = layer.attention.head_size
    sites = [
        *(
            _Site("attn", f"attn.{n}", "attention.query_key_value", select=_head_part(head_dim, 3, part))
            for part, n in enumerate("qkv")
        ),
        *ROTARY_QK,
        _Site("attn", "attn.v_out", "attention.dense", pre=True),
        _Site("mlp", "mlp.post_act", "mlp.dense_4h_to_h", pre=True),
        _Site("resid", "resid.torso.input_ln_attn", "input_layernorm"),
        _Site("resid", "resid.torso.post_ln_attn", "post_attention_layernorm"),
        _Site("resid", "resid.torso.delta_attn", "post_attention_dropout"),
    ]
    if not layer.use_parallel_residual:
        sites.append(_Site("resid", "resid.torso.post_attn", "post_attention_layernorm", pre=True))
    sites += [
        _Site("resid", "resid.torso.delta_mlp", "post_mlp_dropout"),
        _Site("resid", "resid.torso.post_mlp", ""),
    ]
    return sites


def _gptj_layer(layer: nn.Module) -> list[_Site]:
    return [
        *(_Site("attn", f"attn.{n}", f"attn.{n}_proj") for n in "qkv"),
        *ROTARY_QK,
        _Site("attn", "attn.v_out", "attn"),
        _Site("mlp", "mlp.post_act", "mlp.fc_out", pre=True),
        _Site("resid", "resid.torso.input_ln_attn", "ln_1"),
        _Site("resid", "resid.torso.delta_attn", "attn"),
        _Site("resid", "resid.torso.delta_mlp", "mlp"),
        _Site("resid", "resid.torso.post_mlp", ""),
    ]


def _llama_layer(layer: nn.Module) -> list[_Site]:
    return [
        *(_Site("attn", f"attn.{n}", f"self_attn.{n}_proj") for n in "qkv"),
        *ROTARY_QK,
        _Site("attn", "attn.v_out", "self_attn.o_proj", pre=True),
        _Site("mlp", "mlp.post_act", "mlp.down_proj", pre=True),
        _Site("resid", "resid.torso.input_ln_attn", "input_layernorm"),
        _Site("resid", "resid.torso.post_ln_attn", "post_attention_layernorm"),
        _Site("resid", "resid.torso.delta_attn", "self_attn"),
        _Site("resid", "resid.torso.post_attn", "post_attention_layernorm", pre=True),
        _Site("resid", "resid.torso.delta_mlp", "mlp"),
        _Site("resid", "resid.torso.post_mlp", ""),
    ]


def _body(embeddings: str, final_norm: str) -> tuple[_Site, _Site]:
    return _Site("resid", "resid.post_emb", embeddings), _Site("resid", "resid.post_ln_f", final_norm)


_LLAMA = _Layout(
    _body("embed_tokens", "norm"),
    _llama_layer,
    _Rotary("rotary_emb", _cos_sin, _rotate_half),
    lambda layer: layer.self_attn.head_dim,
)

ORIGINAL_LAYOUTS: dict[str, _Layout] = {
    "gpt2": _Layout(_body("drop", "ln_f"), _gpt2_layer),
    "gpt_bigcode": _Layout(_body("drop", "ln_f"), _bigcode_layer),
    "gpt_neox": _Layout(
        _body("emb_dropout", "final_layer_norm"),
        _neox_layer,
        _Rotary("rotary_emb", _cos_sin, _rotate_half),
        lambda layer: layer.attention.head_size,
    ),
    "gptj": _Layout(
        _body("drop", "ln_f"),
        _gptj_layer,
        _Rotary("rotary_emb", _sin_cos, _rotate_every_two),
        lambda layer: layer.attn.head_dim,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}
"""The original hook set per ``config.model_type``."""

ORIGINAL_ARCHITECTURES: tuple[str, ...] = tuple(ORIGINAL_LAYOUTS)
"""Model types the original hook set supports."""


def _rotated(source: str, table: str, rotate: Callable[[Tensor, Tensor], Tensor], head_dim: int) -> Callable:
    """``derive`` of a post-rotary q/k: the captured ``source`` ``[N, T, heads·hd]`` rotated by ``table``."""

    def derive(values: Mapping[str, Tensor]) -> Tensor:
        x = values[source]
        heads = x.reshape(*x.shape[:-1], -1, head_dim)
        return rotate(heads, values[table].to(x.dtype)).reshape(x.shape)

    return derive


def _original_points(model: nn.Module, types: Sequence[str], mask: Tensor | None) -> list[HookPoint]:
    lm = unwrap_causal_lm(model)
    model_type = getattr(lm.config, "model_type", None)
    layout = ORIGINAL_LAYOUTS.get(model_type)
    if layout is None:
        raise ValueError(
            f"the original hook set is defined for the model types {', '.join(ORIGINAL_ARCHITECTURES)} "
            f"(the SparsePO code's GPT-2, GPT-BigCode, GPT-NeoX, GPT-J, plus Llama-like models); this model "
            f"is {model_type!r}. Use method.activations=all (or a list of types) for the compact hook set"
        )
    decoder = lm.get_decoder()
    layers = decoder_layers(model)
    per_layer = [layout.layer(layer) for layer in layers]
    points: list[HookPoint] = []

    def hooked(site: _Site, layer: int | None, root: nn.Module, where: str) -> HookPoint:
        return HookPoint(site.type, layer, site.name, _module(root, site.path, where), site.pre, site.select)

    for kind in types:
        if kind == "logits":
            points.extend(_logits_point(model, mask))
            continue
        if not any(site.type == kind for sites in per_layer for site in sites):
            if tuple(types) == ACTIVATION_TYPES:  # "original": what the original code captures here
                continue
            raise ValueError(
                f"the original hook set has no {kind!r} activations on {model_type} (the original code's "
                f"hooks of that type never fire there); choose other types"
            )
        table = None
        if kind == "attn" and layout.rotary is not None:
            rotary = _module(decoder, layout.rotary.path, "the decoder")
            table = HookPoint(AUX, None, "rotary", rotary, select=layout.rotary.table)
            points.append(table)
        if kind == "resid":
            points.append(hooked(layout.body[0], None, decoder, "the decoder"))
        for index, (layer, sites) in enumerate(zip(layers, per_layer, strict=True)):
            for site in sites:
                if site.type != kind:
                    continue
                if site.rotates is None:
                    points.append(hooked(site, index, layer, f"decoder layer {index}"))
                    continue
                assert table is not None and layout.rotary is not None and layout.head_dim is not None
                source = HookPoint(kind, index, site.rotates, None).key
                derive = _rotated(source, table.key, layout.rotary.rotate, layout.head_dim(layer))
                points.append(HookPoint(kind, index, site.name, None, derive=derive))
        if kind == "resid":
            points.append(hooked(layout.body[1], None, decoder, "the decoder"))
    return points


def hook_points(model: nn.Module, spec: str | Sequence[str] | ActivationSpec) -> list[HookPoint]:
    """The activations of ``spec`` (see :func:`resolve_activation_types`) on ``model``, in capture order:
    type by type, then layer by layer (the original set's body ``resid`` points first and last).

    Raises ``ValueError`` when a requested type's modules cannot be found, or for the original set on an
    architecture it does not cover. Only the requested types are looked up, so e.g. compact ``resid``
    works on any model with a layer list.
    """
    return _plan(model, resolve_activation_types(spec), None)


def _plan(model: nn.Module, spec: ActivationSpec, mask: Tensor | None) -> list[HookPoint]:
    if not spec:
        return []
    if spec.hooks == ORIGINAL:
        return _original_points(model, spec.types, mask)
    return _compact_points(model, spec.types, mask)


@contextmanager
def capture_activations(
    model: nn.Module, spec: str | Sequence[str] | ActivationSpec, batch: Batch
) -> Iterator[dict[str, list[Tensor]]]:
    """Capture the reference model's activations of ``spec`` during one forward of ``batch``.

    Yields a dict, filled when the block exits, that maps each captured type to a list of response-aligned
    ``[N, T, W]`` tensors (one per :func:`hook_points` entry of that type, in that order), detached and zero
    outside ``batch.response_mask``, ready for :func:`~sparsealign.masks.activation.activation_mask`::

        with torch.no_grad(), capture_activations(ref_model, resolve_activation_types("original"), batch) as groups:
            ref_out = TokenModel(ref_model)(batch)
        mask = activation_mask(groups, batch.response_mask)

    Run one forward of exactly ``batch`` inside the block (a second forward overwrites the first's values).
    ``spec`` goes through :func:`resolve_activation_types`; ``uniform`` registers nothing and yields ``{}``.
    A type with no hook point on this architecture (original ``mlp`` on GPT-2) is absent from the dict.
    Hooks are registered only for the requested types, through :func:`~sparsealign.models.hooks.capture`,
    and removed on exit, also when the block raises; on a normal exit a hook that never fired raises
    ``RuntimeError`` (an activation silently missing from the mask would change the method).
    """
    plan = _plan(model, resolve_activation_types(spec), batch.response_mask.bool())
    taps = {
        p.key: Tap(p.module, "input" if p.pre else "output", p.select) for p in plan if p.module is not None
    }
    num_rows, length = batch.forward_shape
    rows, columns = batch.forward_positions(batch.response_index)
    gather = at_positions(columns, batch.response_mask, length=length, rows=rows, num_rows=num_rows)
    groups: dict[str, list[Tensor]] = {}
    with capture(taps, transform=gather) as values:
        yield groups
    with torch.no_grad():
        for point in plan:
            if point.type != AUX:
                value = values[point.key] if point.derive is None else point.derive(values)
                groups.setdefault(point.type, []).append(value)
