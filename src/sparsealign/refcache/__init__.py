"""The offline reference cache: the reference model's outputs computed once, so training never runs it.

``sparsealign cache RECIPE`` (or the trainer, for a missing ``reference.cache``) runs the reference over the
training and evaluation pairs and stores per response the per-token reference log-probs and, for FPO, the
pooled reference SAE codes (sparse); for KTO also the log-probs of each pair's two mismatched rows (its prompt with other prompts'
responses). The file header records everything the numbers depend on; a cache that
does not match the run is refused with the mismatching fields named.
"""

from __future__ import annotations

from sparsealign.errors import CacheError
from sparsealign.refcache.build import build_cache, prepare_reference_cache
from sparsealign.refcache.identity import describe_mismatch, run_identity
from sparsealign.refcache.store import ReferenceCache, pair_key

__all__ = [
    "CacheError",
    "ReferenceCache",
    "build_cache",
    "describe_mismatch",
    "pair_key",
    "prepare_reference_cache",
    "run_identity",
]
