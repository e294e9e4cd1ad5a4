"""Named built-in SAEs: trained here once, on request, and cached, like the SmolLM2 model they read.

A built-in name is not a path: :func:`~sparsealign.sae.loading.load_sae` only reads files. Resolve a name
first:

* :func:`resolve_builtin_sae` returns the cached folder ``<cache>/saes/<name>/`` (``<cache>`` is
  :func:`sparsealign.io.cache_root`: ``$SPARSEALIGN_CACHE`` or ``~/.cache/sparsealign``) and
  raises :class:`~sparsealign.errors.SAEError` when it is not built yet, telling the user to run
  ``sparsealign sae train --builtin NAME``;
* :func:`ensure_builtin_sae` trains it when it is missing (or when ``refresh``), with progress on stderr.
  ``sparsealign sae train --builtin NAME`` calls it with ``refresh=True``; FPO's
  :func:`~sparsealign.sae.probe.build_feature_probe` calls it as an explicit, logged build step when a
  recipe names a built-in that is not cached yet.

Training writes into a temporary sibling folder renamed at the end, so an interrupted run leaves no
half-written SAE.

``smollm2-135m-instruct-imdb``: a TopK SAE (Gao et al. 2024) on the residual stream after block 20 of the
30 of SmolLM2-135M-Instruct (``blocks.20.hook_resid_post``, d_in 576), trained on IMDB review text. Why
these settings (measurements in ``docs/sae.md``):

* block 20 is late-middle: FPO constrains features of a deep residual layer (the paper's ablation found
  deeper better; its SAEs read the last block, which in a 135M model is close to next-token prediction),
  and the forward to block 20 costs 2/3 of the full model, the main cost of training on 2 CPU cores;
* width 4608 (8 × d_in) and k 32: few enough latents to be trained, with few dead, by the ~200k tokens
  that 2 CPU cores produce in about ten minutes, while reaching a held-out FVU well below 0.3 (on cached
  activations of this layer, 190k tokens: k 32 → FVU 0.26, k 64 → 0.22; width 2304 → 0.27);
* lr 2e-3 instead of Gao et al.'s 3.8e-4 for this width: their rule is fitted to runs of billions of
  tokens; on 200 steps it ends at FVU 0.39 (1e-3: 0.31, 2e-3: 0.26, 3e-3: 0.25 but 8% dead latents);
* every document starts with ``<|endoftext|>``, SmolLM2's pretraining document separator: the attention
  sink then forms on it (its position is dropped) and no later token carries a massive activation (with no
  prefix, or ``<|im_start|>``, an early word sometimes does);
* IMDB text is the domain of the repository's default FPO task.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsealign.errors import SAEError
from sparsealign.io import cache_root
from sparsealign.sae.training.config import SAETrainConfig

__all__ = [
    "BUILTIN_SAES",
    "SAE_CACHE_DIR",
    "BuiltinSAE",
    "builtin_sae_folder",
    "ensure_builtin_sae",
    "resolve_builtin_sae",
]

SAE_CACHE_DIR = "saes"
"""Sub-folder of the cache root holding the built-in SAEs."""


@dataclass(frozen=True)
class BuiltinSAE:
    """A named SAE that :func:`ensure_builtin_sae` trains from ``config()`` once and caches."""

    name: str
    description: str
    config: Callable[[], SAETrainConfig]


def _smollm2_imdb() -> SAETrainConfig:
    return SAETrainConfig(
        model="smollm2-135m-instruct",
        site="resid_post",
        layer=20,
        width=4608,
        k=32,
        source="imdb",
        context_length=128,
        prefix="<|endoftext|>",
        tokens=204_800,
        batch_tokens=1024,
        lr=2e-3,
        heldout_tokens=8192,
        seed=0,
        device="cpu",
        dtype="auto",
    )


BUILTIN_SAES: dict[str, BuiltinSAE] = {
    "smollm2-135m-instruct-imdb": BuiltinSAE(
        "smollm2-135m-instruct-imdb",
        "TopK SAE (width 4608, k 32) on SmolLM2-135M-Instruct's residual stream after block 20, IMDB text.",
        _smollm2_imdb,
    ),
}


def builtin_sae_folder(name: str) -> Path:
    """Where the built-in SAE ``name`` is cached: ``<cache_root>/saes/<name>``."""
    return cache_root() / SAE_CACHE_DIR / name


def _is_sae_folder(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()


def _check_name(name: str) -> None:
    if name not in BUILTIN_SAES:
        close = difflib.get_close_matches(name, list(BUILTIN_SAES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SAEError(f"unknown built-in SAE {name!r}{hint} (built-ins: {', '.join(BUILTIN_SAES)})")


def resolve_builtin_sae(name: str) -> Path:
    """The cached folder of the built-in SAE ``name``; never trains.

    Raises :class:`SAEError` for an unknown name (with the closest one) or a built-in not built yet (with
    the command that builds it).
    """
    _check_name(name)
    folder = builtin_sae_folder(name)
    if not _is_sae_folder(folder):
        raise SAEError(
            f"the built-in SAE {name!r} is not built yet (no {folder}); build it once with "
            f"`sparsealign sae train --builtin {name}`"
        )
    return folder


def ensure_builtin_sae(name: str, *, refresh: bool = False) -> Path:
    """The cached folder of the built-in SAE ``name``, training it first when missing (or ``refresh``).

    Training progress goes to stderr. Raises :class:`SAEError` for an
    unknown name.
    """
    _check_name(name)
    folder = builtin_sae_folder(name)
    if _is_sae_folder(folder) and not refresh:
        return folder
    from sparsealign.sae.training.run import stderr_progress, train_sae

    why = "being rebuilt" if refresh else "not cached yet"
    stderr_progress(f"built-in SAE {name} is {why}; training it into {folder}")
    train_sae(BUILTIN_SAES[name].config(), folder, progress=stderr_progress)
    return folder
