"""Pure loss functions on per-token log-probs (``[B, T]`` tensors plus masks); no model inside.

Each returns a :class:`LossOutput` with ``loss`` (scalar), ``per_example`` (``[B]``) and ``metrics``.

One loss per module. Every module of this package is imported here and the names in its ``__all__`` are
exported from ``sparsealign.losses``, so a new loss is one new file (no list to extend).
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []

for _module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"{__name__}.{_module_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)

del _module_info, _module, _name
