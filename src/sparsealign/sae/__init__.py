"""Sparse autoencoders: one common model, a registry of file formats, built-in SAEs, training, and the
feature probe FPO reads them through.

``model``
    :class:`SparseAutoencoder` (ReLU, JumpReLU, TopK) and its :class:`SAEMetadata`.
``formats``
    The format registry; one module per format (SAELens, Gemma Scope, sparsify): a new format is one file.
``loading``
    :func:`load_sae`: a file, folder or hub id, format detected. It only reads files.
``builtins``
    Named SAEs trained here: :func:`resolve_builtin_sae` (the cached folder) and :func:`ensure_builtin_sae`
    (trains it when missing).
``training``
    ``sparsealign sae train``: a TopK SAE on streamed activations.
``probe``
    :class:`FeatureProbe` and :func:`build_feature_probe`: pooled SAE codes inside the policy's forward.

The hook sites (``resid_post``, ``mlp_out``: :data:`~sparsealign.models.hooks.SITES`,
:func:`~sparsealign.models.hooks.site_module`) and the forward hooks that read them (the probe's and SAE
training's) are :mod:`sparsealign.models.hooks`, the one capture mechanism of the package.
"""

from __future__ import annotations

from sparsealign.errors import SAEError
from sparsealign.sae.builtins import BUILTIN_SAES, ensure_builtin_sae, resolve_builtin_sae
from sparsealign.sae.formats import SAEFormat, available_formats, register_format, save_sae
from sparsealign.sae.formats.gemma_scope import parse_gemma_scope_path
from sparsealign.sae.formats.saelens import save_saelens
from sparsealign.sae.loading import load_sae
from sparsealign.sae.model import ACTIVATIONS, SAEMetadata, SparseAutoencoder
from sparsealign.sae.probe import POOL_POSITIONS, FeatureProbe, build_feature_probe

__all__ = [
    "ACTIVATIONS",
    "BUILTIN_SAES",
    "POOL_POSITIONS",
    "SAEError",
    "SAEFormat",
    "SAEMetadata",
    "SparseAutoencoder",
    "available_formats",
    "build_feature_probe",
    "ensure_builtin_sae",
    "load_sae",
    "parse_gemma_scope_path",
    "register_format",
    "resolve_builtin_sae",
    "save_sae",
    "save_saelens",
    "FeatureProbe",
]
