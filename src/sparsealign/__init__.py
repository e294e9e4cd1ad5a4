"""sparsealign: sparse preference optimisation (SparsePO, MaPO, FPO) and the DPO family.

The Python API (``docs/python.md``)::

    from sparsealign import Config, Trainer, load_config, train

Importing the package is cheap; torch and transformers load only when a name that needs them is used (the
names below come from :mod:`sparsealign.api`, :mod:`sparsealign.config`, :mod:`sparsealign.sae.loading` and
:mod:`sparsealign.eval`). The loss functions are the subpackage :mod:`sparsealign.losses`.

``sparsealign.train`` is both the package of the training loop (``sparsealign.train.loop``, ...) and the
function :func:`sparsealign.api.train`: Python stores an imported subpackage as an attribute of its parent,
which would hide a function of that name whenever ``sparsealign.train.loop`` had been imported, so instead the
subpackage itself is made callable here (it is empty, so importing it costs nothing). Calling it calls
:func:`sparsealign.api.train`; ``from sparsealign import train`` gives the same object in any import order.
"""

from __future__ import annotations

import types
from typing import Any

import sparsealign.train as _train_package
from sparsealign.version import __version__

__all__ = [
    "Callback",
    "Config",
    "RunResult",
    "Trainer",
    "__version__",
    "evaluate_generations",
    "load_config",
    "load_sae",
    "train",
    "write_masks_page",
]

_LAZY = {
    "Callback": "sparsealign.api",
    "RunResult": "sparsealign.api",
    "Trainer": "sparsealign.api",
    "load_config": "sparsealign.recipes.load",
    "Config": "sparsealign.config",
    "load_sae": "sparsealign.sae.loading",
    "evaluate_generations": "sparsealign.eval.report",
    "write_masks_page": "sparsealign.eval.masks_page",
}


class _CallableTrainPackage(types.ModuleType):
    """The class of the ``sparsealign.train`` package: a module that trains when called."""

    def __call__(self, config: Any, callbacks: Any = ()) -> Any:
        """Train with ``config`` and ``callbacks``: :func:`sparsealign.api.train` (returns a ``RunResult``)."""
        from sparsealign.api import train as api_train

        return api_train(config, callbacks)


_train_package.__class__ = _CallableTrainPackage
train = _train_package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsealign' has no attribute {name!r}")
