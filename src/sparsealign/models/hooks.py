"""Forward-hook capture: the one mechanism that takes activations out of a model's forward.

MaPO's activation masks (:mod:`sparsealign.models.activations`), the FPO feature probe and SAE training read
tensors out of a Hugging Face model's forward through :func:`capture`: it registers ordinary PyTorch
forward hooks for a set of named :class:`Tap` s (a module, whether its output or its first input is read,
and a selector), stores what each one reads -- optionally passed through a transform such as
:func:`at_positions`, detached or kept in the autograd graph -- and removes every hook when the block
exits, also when it raises. The modules are the model's own, unmodified; nothing is patched.

The module lookups shared by those users live here too: :func:`decoder_layers` (the decoder-layer list of
any causal LM) and :func:`site_module` (the module of an SAE hook site, :data:`SITES`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparsealign.models.logprobs import unwrap_causal_lm

SITES: tuple[str, ...] = ("resid_post", "mlp_out")
"""SAE hook sites (see :func:`site_module`)."""

MLP_MODULES: tuple[str, ...] = ("mlp",)
"""Paths (relative to a decoder layer) of the MLP module."""

POST_MLP_NORMS: tuple[str, ...] = ("post_feedforward_layernorm",)
"""Norms applied to the MLP output before the residual add (Gemma-2/3); ``mlp_out`` is their output."""


def first_tensor(value: Any) -> Tensor:
    """The tensor a module hands on: the value itself, a ``ModelOutput``'s ``last_hidden_state``, or the
    first element of a tuple / list / ``ModelOutput`` (decoder layers return ``(hidden, ...)`` in some
    architectures). Raises ``TypeError`` when there is none."""
    if isinstance(value, Tensor):
        return value
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    try:  # ModelOutput without last_hidden_state
        first = value[0]
    except (TypeError, IndexError, KeyError):
        first = None
    if isinstance(first, Tensor):
        return first
    raise TypeError(f"cannot find a tensor in a hooked module's value of type {type(value).__name__}")


@dataclass(frozen=True)
class Tap:
    """One value to read during a forward.

    ``module``: the hooked module. ``read``: ``"output"`` (a forward hook: the module's return value) or
    ``"input"`` (a forward pre-hook: its first argument, positional or else the first keyword argument --
    e.g. the input of an output projection, which is the attention output before it). ``select`` turns that
    value into the tensor to keep; the default, :func:`first_tensor`, unwraps tuples and ``ModelOutput`` s.
    A selector can slice (the query part of a fused qkv projection) or combine (a rotary module's
    ``(cos, sin)`` pair into one tensor).
    """

    module: nn.Module
    read: Literal["output", "input"] = "output"
    select: Callable[[Any], Tensor] = first_tensor


class _StopForward(Exception):
    """Raised by the last tap's hook under ``capture(..., stop=True)``; caught by :func:`capture`."""


@contextmanager
def capture(
    taps: Mapping[str, Tap],
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    detach: bool = True,
    stop: bool = False,
    require_all: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Capture the values of ``taps`` during the forwards run inside the block.

    Yields a dict that maps each tap's name to ``transform(select(value))`` of its latest call (detached
    first when ``detach``; with ``detach=False`` it stays in the autograd graph, so a loss computed from it
    backpropagates into the model). A later forward overwrites the entries. Several taps may share a
    module. ``transform`` runs inside the hook, so a transform that keeps only a few positions
    (:func:`at_positions`) lets the full ``[N, L, W]`` tensor be freed with the forward.

    ``stop=True`` ends the forward as soon as every tap has fired (the last hook raises a private
    exception, which the context swallows): the layers after the last hooked module never run, and the
    statements after the forward call inside the block are skipped. Every hook is removed on exit, also when
    the block raises. On a normal exit with ``require_all``, a tap that never fired raises ``RuntimeError``
    (a silently missing activation would change the result)::

        with torch.no_grad(), capture({"x": Tap(site_module(model, "resid_post", 3))}, stop=True) as got:
            model(input_ids=ids, attention_mask=mask)
        rows = got["x"]  # [N, L, d]; layers 4.. never ran

    An error raised by a selector or the transform (``ValueError``, ``TypeError``) names the tap.
    """
    names = list(taps)
    values: dict[str, Tensor] = {}
    fired: set[str] = set()

    def store(name: str, tap: Tap, raw: Any) -> None:
        try:
            value = tap.select(raw)
            if detach:
                value = value.detach()
            if transform is not None:
                value = transform(value)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}: {error}") from error
        values[name] = value
        fired.add(name)
        if stop and len(fired) == len(names):
            raise _StopForward

    def make_hook(name: str, tap: Tap) -> Callable[..., None]:
        if tap.read == "output":

            def output_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                store(name, tap, output)

            return output_hook

        def input_hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if args:
                store(name, tap, args[0])
            elif kwargs:
                store(name, tap, next(iter(kwargs.values())))
            else:
                raise ValueError(f"{name}: the module was called without arguments; cannot read its input")

        return input_hook

    handles = []
    try:
        for name in names:
            tap = taps[name]
            if tap.read not in ("output", "input"):
                raise ValueError(f"{name}: read must be 'output' or 'input', got {tap.read!r}")
            hook = make_hook(name, tap)
            if tap.read == "output":
                handles.append(tap.module.register_forward_hook(hook))
            else:
                handles.append(tap.module.register_forward_pre_hook(hook, with_kwargs=True))
        with suppress(_StopForward):
            yield values
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in fired]
    if require_all and missing:
        raise RuntimeError(
            f"{len(missing)} hook(s) never fired during the forward: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. Run the model inside the capture block; if you did, "
            "this model does not call these modules in its forward (the architecture is not supported for "
            "this capture)"
        )


def at_positions(
    index: Tensor,
    mask: Tensor | None = None,
    length: int | None = None,
    rows: Tensor | None = None,
    num_rows: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """A :func:`capture` transform that keeps the positions ``index`` of each ``[R, L, W]`` value: ``[N, T, W]``
    with ``out[n, t] = value[rows[n], index[n, t]]``, zero where ``mask`` (``[N, T]``) is False.

    ``rows`` (``[N]``) and ``num_rows`` (``R``) place each output row in the value's rows (a packed batch,
    :meth:`sparsealign.data.collate.Batch.forward_positions`); by default row ``n`` is value row ``n`` and
    ``R = N``. ``length``: the sequence length ``L`` of the forward, when known; then a value of shape
    ``[R·L, W]`` is read as ``[R, L, W]`` and any other ``L`` is an error. A value with a batch dimension of 1
    (a rotary table shared by all rows) is broadcast to the ``R`` rows. A shape that does not fit raises
    ``ValueError``. The gather is differentiable (the rows keep their gradient when the capture does not
    detach).
    """
    num_rows = num_rows if num_rows is not None else index.shape[0]
    # the shortest value that holds every index: a wait on the device to find it, only when L is not given
    need = length if length is not None else (int(index.max()) + 1 if index.numel() else 0)
    keep = None if mask is None else mask.bool()

    def gather(value: Tensor) -> Tensor:
        if value.dim() == 2 and length is not None and value.shape[0] == num_rows * length:
            value = value.reshape(num_rows, length, -1)
        if value.dim() == 3 and value.shape[0] == 1 and num_rows > 1:
            value = value.expand(num_rows, *value.shape[1:])
        fits = value.dim() == 3 and value.shape[0] == num_rows and value.shape[1] >= need
        if not fits or (length is not None and value.shape[1] != length):
            expected = f"[R, L, W] with R = {num_rows}, " + (
                f"L = {length}" if length is not None else f"L >= {need}"
            )
            raise ValueError(
                f"activation has shape {tuple(value.shape)}, expected {expected} (the batch the positions "
                "come from); run exactly that batch inside the capture"
            )
        position = index.to(value.device)
        row = torch.arange(position.shape[0]) if rows is None else rows
        picked = value[row.to(value.device).unsqueeze(1), position]
        if keep is None:
            return picked
        on = keep.to(value.device).unsqueeze(-1)
        return torch.where(on, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))

    return gather


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list: the first ``nn.ModuleList`` in the decoder with ``num_hidden_layers`` entries.

    Covers GPT-2 / GPT-J / GPT-BigCode ``h`` and Llama / Qwen2 / Gemma-2 / GPT-NeoX ``layers``, also inside a
    PEFT wrapper. Raises ``ValueError`` listing the module lists found when none has the configured length.
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


def site_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    """The module whose forward output is SAE hook site ``site`` of decoder layer ``layer`` (0-based).

    ``resid_post``: the layer itself -- its output hidden state (``output[0]`` when it returns a tuple),
    TransformerLens' ``blocks.L.hook_resid_post`` and sparsify's ``layers.L``. For ``L < last`` it equals
    ``hidden_states[L + 1]`` of ``output_hidden_states=True``; for the last layer it is the stream *before*
    the final norm, whereas HF's ``hidden_states[-1]`` is after it (the FPO code's hook bug, spec ``fpo.md``
    §1.3). ``mlp_out``: the layer's MLP module (``layer.mlp``), i.e. what is added to the residual stream
    (``blocks.L.hook_mlp_out``); Gemma-2/3 normalise the MLP output before adding it
    (``post_feedforward_layernorm``) and TransformerLens' ``hook_mlp_out`` is after that norm, so for layers
    with that module the norm is returned instead.

    Raises ``ValueError`` for an unknown site (with the closest valid one), a layer out of range, or a layer
    without an MLP module (``mlp_out``).
    """
    if site not in SITES:
        close = difflib.get_close_matches(str(site).lower(), SITES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown SAE hook site {site!r}{hint} (valid: {', '.join(SITES)})")
    layers = decoder_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(
            f"SAE hook layer {layer!r} is out of range: the model has {len(layers)} decoder layers "
            f"(0..{len(layers) - 1})"
        )
    block = layers[layer]
    if site == "resid_post":
        return block
    for path in POST_MLP_NORMS + MLP_MODULES:
        module = submodule(block, path)
        if module is not None:
            return module
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    raise ValueError(
        f"cannot find the MLP of decoder layer {layer} ({type(block).__name__}): looked for "
        f"{', '.join(MLP_MODULES)}; the layer has: {children}"
    )


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or None when there is no such module."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
