"""What a reference cache depends on, as a JSON-able header, and how two headers are compared.

A cache is valid for a run when the reference model would compute the same numbers on the same token ids:
same weights (a digest of every tensor, LoRA adapters excluded since the reference runs with the adapter
off), same dtype, same tokenizer (vocabulary digest, special tokens) and chat template, same length limits
and truncation, and, for FPO, the same SAE (weights digest, site, layer) pooled at the same positions.
Pair contents are checked per pair by key (:func:`sparsealign.refcache.store.pair_key`), so a cache may
hold more pairs than a run uses.
"""

from __future__ import annotations

import json
from typing import Any

from sparsealign.models.digest import digest_of, weights_digest

FORMAT = "sparsealign-reference-cache"
VERSION = 2
"""The layout of a cache file; a file of another version is refused (rebuild it). 2: KTO's mismatched rows
are two per pair, one for its chosen and one for its rejected row (version 1 held one per pair)."""

INFORMATIONAL = ("pairs", "split", "created", "sparsealign_version", "features.d_sae", "mismatched_responses")
"""Header fields that describe a file but do not decide whether it matches a run."""


def tokenizer_identity(tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items())
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "vocab": digest_of([json.dumps(vocab, ensure_ascii=False).encode()]),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": None if template is None else digest_of([str(template).encode()]),
    }


def sae_identity(probe: Any) -> dict[str, Any] | None:
    """The SAE of a :class:`~sparsealign.sae.probe.FeatureProbe` (None without one)."""
    if probe is None:
        return None
    sae = probe.sae
    return {
        "source": sae.metadata.source,
        "weights": weights_digest(sae),
        "site": probe.site,
        "layer": probe.layer,
        "positions": probe.positions,
        "activation": sae.activation,
        "k": sae.k,
    }


def _reference_model(cfg: Any, bundle: Any, digest: str | None) -> dict[str, Any]:
    """Which model produced the reference side: ``reference.model`` when set (its digest, computed by the
    bundle), else the policy's starting point (``digest``, or the untrained policy's weights)."""
    from sparsealign.errors import ModelError
    from sparsealign.models.logprobs import unwrap_causal_lm

    lm = unwrap_causal_lm(bundle.policy)
    dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
    separate = getattr(cfg.reference, "model", None)
    if separate is not None:
        if getattr(bundle, "reference_loader", None) is None:
            raise ModelError(
                "reference.model is set but the bundle was loaded without it; pass "
                "reference=cfg.reference to load_bundle."
            )
        return {
            "name": separate,
            "revision": cfg.reference.revision,
            "dtype": dtype,
            "weights": bundle.reference_digest(),
        }
    return {
        "name": cfg.model.name,
        "revision": cfg.model.revision,
        "dtype": dtype,
        "weights": digest if digest is not None else weights_digest(lm),
    }


def run_identity(cfg: Any, bundle: Any, probe: Any = None, digest: str | None = None) -> dict[str, Any]:
    """The header fields a run needs its cache to have. ``digest``: the reference weights' digest, when
    already computed (it must be taken from the untrained policy; ignored with ``reference.model``, whose
    own weights are digested)."""
    d = cfg.data
    features = None
    if probe is not None:
        top_k = cfg.reference.feature_top_k
        features = {"stored": "all_nonzero" if top_k is None else f"top_{top_k}", "d_sae": probe.sae.d_sae}
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": _reference_model(cfg, bundle, digest),
        "tokenizer": tokenizer_identity(bundle.tokenizer, d.chat_template),
        "data": {
            "max_length": d.max_length,
            "max_prompt_length": d.max_prompt_length,
            "truncation": d.truncation,
        },
        "sae": sae_identity(probe),
        "features": features,
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def describe_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``field: cache X, run Y`` for every deciding field that differs (empty when the cache matches).

    A run without an SAE accepts a cache that also holds SAE codes (an FPO cache serves DPO too)."""
    a, b = _flatten(found), _flatten(expected)
    skip = {"sae", "features"} if expected.get("sae") is None else set()
    lines = []
    for key in sorted(set(a) | set(b)):
        top = key.split(".")[0]
        if key in INFORMATIONAL or top in INFORMATIONAL or top in skip:
            continue
        if a.get(key) != b.get(key):
            lines.append(f"{key}: cache {a.get(key)!r}, run {b.get(key)!r}")
    return lines
