"""Saving and loading a method's own trained module (SparsePO's mask networks, PPO's value head) next to the
final model or adapter, with the options that rebuild it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from sparsealign.config import MethodOptions
from sparsealign.methods.registry import build_method_options, get_method

MODULE_WEIGHTS = "method_module.safetensors"
MODULE_CONFIG = "method_module.json"


def save_method_module(module: nn.Module, options: MethodOptions, folder: Path) -> None:
    """Write ``module``'s weights and the method options that built it into ``folder``."""
    from safetensors.torch import save_file

    from sparsealign.io import atomic_file, atomic_write

    with atomic_file(folder / MODULE_WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
    with atomic_write(folder / MODULE_CONFIG) as handle:
        handle.write(json.dumps(dataclasses.asdict(options), indent=1))


def load_method_module(folder: Path, model_config: Any) -> tuple[nn.Module, MethodOptions]:
    """Rebuild and load the module written by :func:`save_method_module`."""
    from safetensors.torch import load_file

    options = build_method_options(json.loads((folder / MODULE_CONFIG).read_text()))
    method = get_method(options.name)
    if method.module is None:
        raise ValueError(f"method '{options.name}' has no trainable module")
    module = method.module(options, model_config, 0)
    module.load_state_dict(load_file(str(folder / MODULE_WEIGHTS)))
    return module, options
