"""Pretrained sparse autoencoders: one common model, offline loaders for three formats, and hook sites."""

from __future__ import annotations

from sparsealign.sae.formats import SAEError, load_sae, parse_gemma_scope_path, save_saelens
from sparsealign.sae.hooks import SITES, capture_site, site_module
from sparsealign.sae.model import ACTIVATIONS, SAEMetadata, SparseAutoencoder

__all__ = [
    "ACTIVATIONS",
    "SITES",
    "SAEError",
    "SAEMetadata",
    "SparseAutoencoder",
    "capture_site",
    "load_sae",
    "parse_gemma_scope_path",
    "save_saelens",
    "site_module",
]
