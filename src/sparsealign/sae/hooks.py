"""Hook sites where an SAE reads a Hugging Face causal LM's activations (with gradient).

Configs name a site as ``sae.site=resid_post sae.layer=L`` (0-based decoder-layer index). Sites, for any
model whose decoder-layer list :func:`~sparsealign.models.activations.decoder_layers` finds:

``resid_post``
    The OUTPUT hidden state of decoder layer L (forward hook on the layer; ``output[0]`` when it returns a
    tuple). This is TransformerLens' ``blocks.L.hook_resid_post`` and sparsify's ``layers.L``. For
    ``L < last`` it equals ``hidden_states[L + 1]`` of ``output_hidden_states=True``; for the last layer
    it is the stream *before* the final norm, whereas HF's ``hidden_states[-1]`` is after it (the FPO
    code's hook bug, spec ``fpo.md`` §1.3).
``mlp_out``
    The output of the layer's MLP module (``layer.mlp``: Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, GPT-J...),
    i.e. what is added to the residual stream (``blocks.L.hook_mlp_out``). Gemma-2/3 normalise the MLP
    output before adding it (``post_feedforward_layernorm``), and TransformerLens' ``hook_mlp_out`` is
    after that norm, so for layers with that module its output is captured instead.

:func:`capture_site` keeps the tensor in the autograd graph: encoded by the SAE inside the policy forward,
the loss backpropagates through it into the model.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from sparsealign.models.activations import decoder_layers

SITES: tuple[str, ...] = ("resid_post", "mlp_out")
"""Supported hook sites."""

MLP_MODULES: tuple[str, ...] = ("mlp",)
"""Paths (relative to a decoder layer) of the MLP module."""

POST_MLP_NORMS: tuple[str, ...] = ("post_feedforward_layernorm",)
"""Norms applied to the MLP output before the residual add (Gemma-2/3); ``mlp_out`` is their output."""


def _sub(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def site_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    """The module whose forward output is ``site`` of decoder layer ``layer``.

    Raises ``ValueError`` for an unknown site (with the closest valid one), a layer out of range, or a
    layer without an MLP module (``mlp_out``).
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
        module = _sub(block, path)
        if module is not None:
            return module
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    raise ValueError(
        f"cannot find the MLP of decoder layer {layer} ({type(block).__name__}): looked for "
        f"{', '.join(MLP_MODULES)}; the layer has: {children}"
    )


def _output_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the hidden state in a hooked module's output of type {type(output).__name__}"
    )


@contextmanager
def capture_site(model: nn.Module, site: str, layer: int) -> Iterator[dict[str, Tensor]]:
    """Capture ``site`` of decoder layer ``layer`` during the forwards run inside the block.

    Yields a dict that, after a forward, holds ``"activations"``: the ``[N, L, d]`` tensor, NOT detached
    (it carries gradient back into the model). A later forward overwrites it. The hook is removed on exit,
    also when the block raises. ``ValueError`` as in :func:`site_module`::

        with capture_site(policy, "resid_post", 25) as captured:
            out = policy(input_ids, attention_mask=mask)
        codes = sae.encode(captured["activations"])
    """
    module = site_module(model, site, layer)
    captured: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        captured["activations"] = _output_tensor(output)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
