"""``load_config``: a recipe (a built-in name or a file) plus ``key=value`` overrides, as a validated
:class:`~sparsealign.config.Config` whose ``method`` section is the chosen method's own options.

This is where the configuration schema (``sparsealign.config``) meets the method registry
(``sparsealign.methods``), so it sits above both; it imports the registry (and so torch) when called.
"""

from __future__ import annotations

from pathlib import Path

from sparsealign.config import Config, apply_overrides, build_config
from sparsealign.methods import build_method_options, validate_method
from sparsealign.recipes import read_recipe, resolve_recipe

__all__ = ["load_config"]


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``recipe`` (a path, or a built-in name such as ``smoke`` or ``imdb/dpo``; ``None``: all
    defaults), apply dotted ``overrides`` (``["method.beta=0.2", "train.max_steps=50"]``), and return the
    validated :class:`Config`. Any mistake is a ``ConfigError`` that names the key and what to do."""
    tree = read_recipe(resolve_recipe(recipe)) if recipe is not None else {}
    tree = apply_overrides(tree, list(overrides or []))
    config = build_config(tree, build_method_options)
    validate_method(config)
    return config
