"""A registry of named data sources (``data.source=NAME``), HALOs style.

A source is any callable ``(request: SourceRequest) -> SourceData`` registered under a name::

    @register_source("my-pairs")
    def my_pairs(request: SourceRequest) -> SourceData:
        config = request.config            # the whole sparsealign Config
        model = request.context["policy"]  # runtime objects the trainer hands over
        ...
        return SourceData(train=[...], eval=[...], eval_prompts=[...])

Sources that build data at run time (e.g. on-policy pairs sampled from the reference model and scored by
a reward) get what they need through ``request.context``; the trainer decides what it puts there.
Built-in sources live in their own modules (e.g. ``sparsealign.data.imdb``) which register themselves
on import; :func:`get_source` imports them on first use.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.errors import DataError
from sparsealign.plugins import import_plugin, is_plugin_spec

__all__ = [
    "BUILTIN_SOURCE_MODULES",
    "SourceData",
    "SourceFn",
    "SourceRequest",
    "available_sources",
    "get_source",
    "load_source",
    "register_source",
]


@dataclass
class SourceRequest:
    """What a source is given: the whole run ``config`` (a ``sparsealign.config.Config``) and a ``context``
    of runtime objects (models, tokenizer, reward, accelerator...) chosen by the caller."""

    config: Any
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceData:
    """What a source returns: training and eval pairs, and held-out prompts for generation reports."""

    train: list[PreferenceExample]
    eval: list[PreferenceExample] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)


SourceFn = Callable[[SourceRequest], SourceData]

_REGISTRY: dict[str, SourceFn] = {}

BUILTIN_SOURCE_MODULES: dict[str, str] = {
    "imdb": "sparsealign.data.imdb",
    **{
        name: f"sparsealign.data.public.{module}"
        for module, names in {
            "hh": ("hh", "hh-helpful", "hh-harmless"),
            "shp": ("shp",),
            "oasst": ("oasst",),
            "ultrafeedback": ("ultrafeedback",),
            "ultrachat": ("ultrachat",),
            "tldr": ("tldr", "tldr-sft"),
            "imdb_hub": ("imdb-hub",),
            "mbpp": ("mbpp",),
            "prompts": ("alpacaeval", "arenahard"),
            "mix": ("mix",),
        }.items()
        for name in names
    },
}
"""Source name -> module that registers it on import; imported lazily by :func:`get_source`."""


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Decorator registering ``fn`` as the source ``name``.

    Registering the same function again (a module reload) replaces it; registering a different function
    under a taken name raises ``ValueError``.
    """

    def decorate(fn: SourceFn) -> SourceFn:
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified(existing) != _qualified(fn):
            raise ValueError(f"Data source '{name}' is already registered by {_qualified(existing)}.")
        _REGISTRY[name] = fn
        return fn

    return decorate


def _import_builtin(name: str) -> None:
    """Import the module of a built-in source so that it registers itself; absent modules are ignored."""
    module = BUILTIN_SOURCE_MODULES.get(name)
    if module is None or name in _REGISTRY:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:  # the module exists but one of its own imports is missing
            raise


def available_sources() -> list[str]:
    """Names of registered and built-in sources, sorted."""
    return sorted(set(_REGISTRY) | set(BUILTIN_SOURCE_MODULES))


def get_source(name: str) -> SourceFn:
    """The source registered as ``name``, or a user's ``path/to/file.py:name`` / ``package.module:name`` (a
    source function, or the name of one the module registered); a :class:`DataError` lists the known names
    and the closest one."""
    if is_plugin_spec(name):
        module, attribute = import_plugin(name, "data source")
        found = getattr(module, attribute, None) or _REGISTRY.get(attribute)
        if not callable(found):
            raise DataError(
                f"data source '{name}': {module.__name__} defines no source function called '{attribute}' "
                "(docs/extending.md)."
            )
        return found
    _import_builtin(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN_SOURCE_MODULES:
        raise DataError(
            f"Built-in data source '{name}' is not available: module {BUILTIN_SOURCE_MODULES[name]} "
            f"is missing or did not register it."
        )
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name, available_sources(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listed = ", ".join(known) if known else "none"
    raise DataError(f"Unknown data source '{name}'.{hint} Known sources: {listed}.")


def load_source(config: Any, context: dict[str, Any] | None = None) -> SourceData:
    """Call the source named by ``config.data.source`` and check that it returned :class:`SourceData`."""
    name = config.data.source
    if not name:
        raise DataError("data.source is not set.")
    result = get_source(name)(SourceRequest(config=config, context=dict(context or {})))
    if not isinstance(result, SourceData):
        raise DataError(f"Data source '{name}' returned {type(result).__name__}, expected SourceData.")
    if not result.train:
        raise DataError(f"Data source '{name}' returned no training examples.")
    return result
