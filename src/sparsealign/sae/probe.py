"""Pooled SAE features of one hook site, computed inside a model's forward (FPO's feature constraint).

For row n with response tokens y_1..y_R (y_R the EOS), prompt length P, and SAE codes c_p of the site's
activation at input position p (0-based), the pooled vector is the mean of the codes over R positions
(Yin et al. 2025, FPO, Eq. 10, as a masked mean)::

    positions="response":    c̄ = (1/R) Σ_{t=1..R} c_{P-1+t}     the response tokens' own positions: the
                                                                 state after reading each response token
    positions="predicting":  c̄ = (1/R) Σ_{t=1..R} c_{P-2+t}     the positions whose logits predict the
                                                                 response tokens (the released FPO code's
                                                                 ``features[:, :-1]`` under the response
                                                                 mask): the last prompt token included,
                                                                 the final EOS token's position excluded

In a :class:`~sparsealign.data.collate.Batch`, ``response_index[n, t]`` is the position predicting response
token t, so "predicting" reads ``response_index`` and "response" reads ``response_index + 1``; both average
over ``response_mask``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from sparsealign.data.collate import Batch
from sparsealign.errors import SAEError, TrainingError
from sparsealign.losses.fpo import pool_features
from sparsealign.models import hooks
from sparsealign.models.hooks import Tap, site_module
from sparsealign.models.logprobs import unwrap_causal_lm
from sparsealign.sae.builtins import BUILTIN_SAES, ensure_builtin_sae, resolve_builtin_sae
from sparsealign.sae.loading import load_sae
from sparsealign.sae.model import SparseAutoencoder

if TYPE_CHECKING:
    from sparsealign.config import SAEConfig

__all__ = ["POOL_POSITIONS", "FeatureProbe", "PoolPositions", "build_feature_probe"]

logger = logging.getLogger(__name__)

PoolPositions = Literal["response", "predicting"]
POOL_POSITIONS: tuple[str, ...] = ("response", "predicting")
"""Where :meth:`FeatureProbe.pooled` reads the activations (module docstring)."""


class FeatureProbe(nn.Module):
    """A frozen SAE at ``site`` of block ``layer``, pooling its codes over one position per response token.

    Around a decoder forward, :meth:`capture` records the site's activations; :meth:`pooled` takes them at
    the ``positions`` of each response token (module docstring), encodes them with the SAE and averages the
    codes over each response: ``[N, d_sae]``. Gradients reach the model through the activations; the SAE
    itself is frozen.
    """

    def __init__(
        self, sae: SparseAutoencoder, site: str, layer: int, positions: PoolPositions = "response"
    ) -> None:
        super().__init__()
        if positions not in POOL_POSITIONS:
            raise ValueError(
                f"unknown pooling positions {positions!r} (choose from {', '.join(POOL_POSITIONS)})"
            )
        self.sae = sae.freeze()
        self.site = site
        self.layer = layer
        self.positions = positions

    def extra_repr(self) -> str:
        return f"site={self.site}, layer={self.layer}, positions={self.positions}"

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Record the site's activations during the forward run inside the block.

        Yields a dict that, after the forward, holds ``"activations"``: the ``[N, L, d]`` tensor of
        :func:`~sparsealign.models.hooks.site_module`, NOT detached (a loss on the pooled codes backpropagates
        into the model). ``ValueError`` for an unknown site or a layer out of range; ``RuntimeError`` when the
        block exits without the site having been run (see :func:`~sparsealign.models.hooks.capture`).
        """
        taps = {"activations": Tap(site_module(model, self.site, self.layer))}
        with hooks.capture(taps, detach=False) as captured:
            yield captured

    def position_index(self, batch: Batch) -> torch.Tensor:
        """``[N, T]``: the input position read for response token t of row n (meaningful where
        ``batch.response_mask`` is set)."""
        return batch.response_index + 1 if self.positions == "response" else batch.response_index

    def pooled(self, activations: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Masked mean over each response of the SAE codes at :meth:`position_index`: ``[N, d_sae]``,
        float32."""
        at_positions = batch.gather(activations, self.position_index(batch))  # [N, T, d]
        codes = self.sae.encode(at_positions)
        return pool_features(codes.float(), batch.response_mask.to(codes.device))


def _sae_location(path: str) -> str:
    """``sae.path`` as a file location: a built-in name becomes its cached folder, built first (logged) when
    it is not cached yet, as the FPO recipes expect."""
    if path not in BUILTIN_SAES:
        return path
    try:
        return str(resolve_builtin_sae(path))
    except SAEError:
        logger.warning(
            "sae.path=%s is a built-in SAE that is not built yet: training it now, once "
            "(`sparsealign sae train --builtin %s` builds it ahead of time).",
            path,
            path,
        )
    return str(ensure_builtin_sae(path))


def build_feature_probe(
    sae_cfg: SAEConfig,
    model: nn.Module,
    device: torch.device | str,
    positions: PoolPositions = "response",
) -> FeatureProbe:
    """FPO's probe: the frozen SAE of ``sae_cfg`` (``cfg.sae``) at its hook site of ``model`` (the policy,
    PEFT- or accelerate-wrapped or not), on ``device``, pooling at ``positions``.

    ``sae_cfg.path`` is a file, folder or hub id (:func:`~sparsealign.sae.loading.load_sae`), or a built-in
    name (:data:`~sparsealign.sae.builtins.BUILTIN_SAES`), trained into the cache first when missing.
    The SAE's input width is checked against the model's hidden size (:class:`SAEError`); a layer neither
    set nor recorded with the SAE, or a site/layer the model does not have, is a :class:`TrainingError`.
    """
    if not sae_cfg.path:
        raise SAEError("no SAE: set sae.path (an SAE folder, file, hub id or built-in name).")
    lm = unwrap_causal_lm(model)
    sae = load_sae(_sae_location(sae_cfg.path), d_in=lm.config.hidden_size)
    layer = sae_cfg.layer if sae_cfg.layer is not None else sae.layer
    if layer is None:
        raise TrainingError(f"The SAE at {sae_cfg.path} records no layer: set sae.layer.")
    try:
        site_module(lm, sae_cfg.site, layer)
    except ValueError as error:
        raise TrainingError(f"sae.site={sae_cfg.site} sae.layer={layer}: {error}") from None
    return FeatureProbe(sae, sae_cfg.site, layer, positions).to(device)
