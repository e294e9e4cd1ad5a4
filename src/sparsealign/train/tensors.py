"""One walk over the tensors nested in a step's outputs (dataclasses, dicts, tuples, named tuples, lists)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor nested in it; other values are kept. Containers in which
    ``fn`` changed nothing are returned as the same objects."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            old = getattr(value, f.name)
            new = map_tensors(old, fn)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, dict):
        new_items = {k: map_tensors(v, fn) for k, v in value.items()}
        changed = any(new_items[k] is not value[k] for k in value)
        return type(value)(new_items) if changed else value
    if isinstance(value, tuple | list):
        items = [map_tensors(v, fn) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value
