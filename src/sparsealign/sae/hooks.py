"""Hook sites where an SAE reads a Hugging Face causal LM's activations (with gradient).

Configs name a site as ``sae.site=resid_post sae.layer=L`` (0-based decoder-layer index). Sites, for any
model whose decoder-layer list :func:`~sparsealign.models.hooks.decoder_layers` finds:

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
the loss backpropagates through it into the model. :func:`run_to_site` (SAE training) runs a forward
without gradient that stops right after the hooked module. Every forward hook of the ``sae`` package is in
this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch
from torch import Tensor, nn

from sparsealign.models.hooks import SITES, site_module  # noqa: F401 (re-exported; they live in models)


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


class _StopForward(Exception):
    """Raised by :func:`run_to_site`'s hook to end the forward once the hooked module has run."""


def run_to_site(model: nn.Module, module: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``module``'s output ``[B, L, d]`` for this batch, under ``torch.no_grad()``; the forward stops right
    after ``module`` (its hook raises), so the layers after it (and the head) never run."""
    captured: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        captured["activations"] = _output_tensor(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if "activations" not in captured:
        raise RuntimeError(f"the hook on {type(module).__name__} did not fire during the forward")
    return captured["activations"]
