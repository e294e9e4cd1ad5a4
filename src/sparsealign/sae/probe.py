"""Pooled SAE features of one hook site, computed inside a model's forward (FPO's feature constraint)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsealign.data.collate import Batch
from sparsealign.losses.fpo import pool_features
from sparsealign.sae.hooks import capture_site
from sparsealign.sae.model import SparseAutoencoder


class FeatureProbe(nn.Module):
    """A frozen SAE at ``site`` of block ``layer``.

    Around a decoder forward, :meth:`capture` records the site's activations; :meth:`pooled` takes them at
    the response tokens' own positions (the state after reading each response token), encodes them with
    the SAE and averages the codes over each response: ``[N, d_sae]``. Gradients reach the model through the
    activations; the SAE itself is frozen.
    """

    def __init__(self, sae: SparseAutoencoder, site: str, layer: int) -> None:
        super().__init__()
        self.sae = sae.freeze()
        self.site = site
        self.layer = layer

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        with capture_site(model, self.site, self.layer) as captured:
            yield captured

    def pooled(self, activations: torch.Tensor, batch: Batch) -> torch.Tensor:
        rows = torch.arange(activations.shape[0], device=activations.device).unsqueeze(1)
        at_tokens = activations[rows, batch.response_index + 1]  # [N, T, d]: the response tokens' positions
        codes = self.sae.encode(at_tokens)
        return pool_features(codes.float(), batch.response_mask)
