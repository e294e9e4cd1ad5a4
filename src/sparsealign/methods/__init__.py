"""Training methods: one module per method, each registering a :class:`Method` record.

Every module of this package other than ``base`` and ``registry`` is a method and is imported here, so a new
method is one new file (plus its loss in ``sparsealign.losses``, a recipe and tests). User-defined methods
load by ``method.name=path/to/file.py:name`` (see docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.modules import MODULE_CONFIG, MODULE_WEIGHTS, load_method_module, save_method_module
from sparsealign.methods.registry import (
    CACHE_PROVIDES,
    METHODS,
    build_method_options,
    cache_can_serve,
    cacheable_methods,
    describe_methods,
    get_method,
    method_options,
    register,
    validate_method,
)

__all__ = [
    "CACHE_PROVIDES",
    "METHODS",
    "MODULE_CONFIG",
    "MODULE_WEIGHTS",
    "Method",
    "MethodOptions",
    "Need",
    "StepOutputs",
    "build_method_options",
    "cache_can_serve",
    "cacheable_methods",
    "describe_methods",
    "get_method",
    "load_method_module",
    "method_options",
    "option",
    "register",
    "save_method_module",
    "validate_method",
]

_INFRASTRUCTURE = {"base", "registry", "modules"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_info.name}")
del _info
