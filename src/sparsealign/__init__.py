"""sparsealign: sparse preference optimisation (SparsePO, MaPO, FPO) and the DPO family.

Importing the package is cheap; torch and transformers load only when a name that needs them is used:
``sparsealign.load_config`` comes from :mod:`sparsealign.api`, whose ``train`` trains (``sparsealign.train``
is the package of the training loop).
"""

from __future__ import annotations

from typing import Any

from sparsealign.version import __version__

__all__ = ["RunResult", "__version__", "load_config"]

_API = ("RunResult", "load_config")


def __getattr__(name: str) -> Any:
    if name in _API:
        from sparsealign import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparsealign' has no attribute {name!r}")
