"""Loading a user's object named ``path/to/file.py:name`` or ``package.module:name``.

Used for user-defined methods (``method.name=...``) and data sources (``data.source=...``): the file or
module is imported (a file once per path, under a private module name) and ``name`` is looked up in it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from sparsealign.errors import PluginError


def is_plugin_spec(spec: str) -> bool:
    """Whether ``spec`` names a user's object (``file.py:name`` or ``module:name``) rather than a built-in."""
    return ":" in spec and bool(spec.rsplit(":", 1)[1])


def import_plugin(spec: str, what: str) -> tuple[ModuleType, str]:
    """Import the module of ``spec`` (``path/to/file.py:name`` or ``package.module:name``) and return it with
    ``name``. ``what`` ("method", "data source") words the errors."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise PluginError(f"{what} '{spec}': expected path/to/file.py:name or package.module:name.")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"{what} '{spec}': the file {path} does not exist.")
        module_name = "sparsealign_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise PluginError(f"{what} '{spec}': {path} cannot be imported as Python.")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[module_name]
                raise
        return module, name
    try:
        return importlib.import_module(target), name
    except ModuleNotFoundError as error:
        raise PluginError(f"{what} '{spec}': cannot import module '{target}' ({error}).") from None
