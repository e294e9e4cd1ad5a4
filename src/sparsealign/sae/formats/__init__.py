"""The registry of SAE file formats: one module per format in this folder, found on first use.

A format is a :class:`SAEFormat` record, registered by its own module when imported::

    # src/sparsealign/sae/formats/my_format.py
    from sparsealign.sae.formats import SAEFormat, register_format

    def _detect(path: Path) -> bool: ...          # is this existing file or folder in my format?
    def _load(path: Path, *, d_in, dtype, device) -> SparseAutoencoder: ...

    register_format(SAEFormat("my_format", "weights.bin + meta.json", _detect, _load))

Every module of this package is imported the first time the registry is asked (:func:`available_formats`,
:func:`get_format`, :func:`detect_formats`), the way :func:`sparsealign.data.sources.get_source` imports the
built-in sources on first use, so a new format is one new file and no list to extend. A format defined
elsewhere registers itself the same way once its module is imported.

``detect`` answers for a path that exists (a folder, or one of the format's files). It may claim a
near miss that only its format explains (a SAELens ``cfg.json`` without its weights, a sparsify folder of
hookpoints), so that ``load`` can say exactly what is missing. ``load`` returns an unfrozen
:class:`~sparsealign.sae.model.SparseAutoencoder` or raises :class:`~sparsealign.errors.SAEError`;
``save`` (optional) writes one and returns the folder.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sparsealign.errors import SAEError

if TYPE_CHECKING:
    import torch

    from sparsealign.sae.model import SparseAutoencoder

__all__ = [
    "SAVE_FORMAT",
    "SAEError",
    "SAEFormat",
    "available_formats",
    "detect_formats",
    "get_format",
    "register_format",
    "save_sae",
]

SAVE_FORMAT = "saelens"
"""The format :func:`save_sae` (and ``SparseAutoencoder.save``) writes by default."""


class Loader(Protocol):
    def __call__(
        self,
        path: Path,
        *,
        d_in: int | None,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> SparseAutoencoder: ...


@dataclass(frozen=True)
class SAEFormat:
    """One on-disk SAE format.

    ``name``: recorded as ``SAEMetadata.format``; ``expected``: the files that make it up, for messages
    (``"cfg.json + sae_weights.safetensors"``); ``detect(path)``: whether the existing ``path`` (a folder
    or a file) is in this format; ``load(path, d_in=, dtype=, device=)``: the SAE at ``path``, its input
    width checked against ``d_in`` when given, its parameters in ``dtype`` (None: as stored) on ``device``;
    ``save(sae, folder)``: write ``sae`` into ``folder`` and return it (None: the format is read-only).
    """

    name: str
    expected: str
    detect: Callable[[Path], bool]
    load: Loader
    save: Callable[[SparseAutoencoder, Path], Path] | None = None


_REGISTRY: dict[str, SAEFormat] = {}
_discovered = False


def _qualified(fn: Callable[..., object]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_format(fmt: SAEFormat) -> SAEFormat:
    """Add ``fmt`` to the registry and return it.

    Registering the same format again (a module reload) replaces it; another format under a taken name
    raises ``ValueError``.
    """
    existing = _REGISTRY.get(fmt.name)
    if existing is not None and _qualified(existing.load) != _qualified(fmt.load):
        raise ValueError(f"SAE format '{fmt.name}' is already registered by {_qualified(existing.load)}.")
    _REGISTRY[fmt.name] = fmt
    return fmt


def _discover() -> None:
    """Import every module of this package once; each registers its format."""
    global _discovered
    if _discovered:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def available_formats() -> list[SAEFormat]:
    """The registered formats, by name."""
    _discover()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_format(name: str) -> SAEFormat:
    """The format registered as ``name``; :class:`SAEError` lists the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise SAEError(f"unknown SAE format {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def detect_formats(path: Path) -> list[SAEFormat]:
    """The formats whose ``detect`` claims the existing ``path`` (normally none or one)."""
    return [fmt for fmt in available_formats() if fmt.detect(path)]


def save_sae(sae: SparseAutoencoder, folder: str | Path, format: str = SAVE_FORMAT) -> Path:
    """Write ``sae`` into ``folder`` in ``format`` (default SAELens 6.x); returns the folder."""
    fmt = get_format(format)
    if fmt.save is None:
        writable = ", ".join(f.name for f in available_formats() if f.save is not None)
        raise SAEError(f"SAE format {format!r} cannot be written (writable: {writable})")
    return fmt.save(sae, Path(folder))
