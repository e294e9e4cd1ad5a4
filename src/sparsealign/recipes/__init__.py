"""Built-in recipes: the YAML files in this folder, run by name, and how any recipe file is read.

The package ships its recipes (``smoke.yaml``, ``imdb/``, ``paper/``, ``ultrafeedback/``; the repository's
``configs/`` is a link to this folder), so an installed wheel runs them by name::

    sparsealign train smoke
    sparsealign train imdb/dpo method.beta=0.2

A recipe is named by its path below this folder without ``.yaml``. :func:`resolve_recipe` turns what a user
typed into a file: an existing file wins, else a built-in name (``imdb/dpo``, ``imdb/dpo.yaml`` and
``configs/imdb/dpo.yaml`` all name the same recipe). ``accelerate/`` holds ``accelerate launch`` configs,
not training recipes.

:func:`read_recipe` reads one recipe file into a nested dict:

* ``base: other`` inherits another recipe, whose sections this one updates key by key. ``other`` is looked up
  next to the recipe first, then among the built-in recipes, so a recipe in any folder can say
  ``base: smoke`` or ``base: imdb/sparsepo.yaml``. A recipe that inherits itself is an error.
* A string value that starts with ``./`` or ``../`` is a path relative to the recipe's own folder (it is made
  absolute), so a recipe can name a file that travels with it: ``smoke.yaml`` reads
  ``data.path: ./smoke_pairs.jsonl``. Other relative paths keep their meaning, relative to the working
  directory.

This module imports nothing heavy (no torch), so the command line's ``--help`` stays fast.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from sparsealign.errors import ConfigError

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES_DIR",
    "builtin_recipes",
    "read_recipe",
    "recipe_description",
    "resolve_recipe",
]

RECIPES_DIR = Path(__file__).resolve().parent
"""The folder of the built-in recipes (inside the installed package)."""

DEFAULT_RECIPE = "imdb/sparsepo"
"""The recipe that ``sparsealign train`` runs when it is given none."""

SUFFIX = ".yaml"
_NOT_RECIPES = ("accelerate",)  # top-level folders of other YAML files (``accelerate launch`` configs)
_CHECKOUT_PREFIX = "configs"  # the repository's link to this folder, as in ``configs/imdb/dpo.yaml``


def builtin_recipes() -> list[str]:
    """The names of the built-in recipes, sorted: ``imdb/dpo``, ..., ``smoke``."""
    names = []
    for path in RECIPES_DIR.rglob(f"*{SUFFIX}"):
        relative = path.relative_to(RECIPES_DIR)
        if relative.parts[0] not in _NOT_RECIPES:
            names.append(relative.with_suffix("").as_posix())
    return sorted(names)


def _builtin_name(spec: str) -> str:
    """``spec`` in the form of a built-in name: without ``.yaml`` and without a leading ``configs/``."""
    parts = PurePosixPath(spec.replace("\\", "/")).parts
    if parts and parts[0] == ".":
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == _CHECKOUT_PREFIX:
        parts = parts[1:]
    name = "/".join(parts)
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def _builtin_path(spec: str) -> Path | None:
    """The file of the built-in recipe that ``spec`` names, or None."""
    name = _builtin_name(spec)
    return RECIPES_DIR / f"{name}{SUFFIX}" if name in builtin_recipes() else None


def _close_names(spec: str) -> list[str]:
    """Built-in names close to ``spec``: those ending in the same file name, then difflib's closest."""
    name = _builtin_name(spec)
    names = builtin_recipes()
    same_file = [n for n in names if n.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1]]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return list(dict.fromkeys([*same_file, *close]))[:3]


def _not_found(what: str, spec: str) -> ConfigError:
    close = _close_names(spec)
    hint = f" Did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
    return ConfigError(
        f"{what} '{spec}' not found: it is neither a file nor a built-in recipe.{hint} "
        "`sparsealign recipes` lists the built-in recipes."
    )


def resolve_recipe(spec: str | Path) -> Path:
    """The recipe file that ``spec`` names: an existing file as given, else a built-in recipe by name
    (``smoke``, ``imdb/dpo``, ``imdb/dpo.yaml`` or ``configs/imdb/dpo.yaml``). Raises :class:`ConfigError`
    with the closest built-in names otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    builtin = _builtin_path(str(spec))
    if builtin is None:
        raise _not_found("Recipe", str(spec))
    return builtin


def recipe_description(name: str) -> str:
    """The one-line description of the built-in recipe ``name``: the first sentence of the comment at the top
    of its file (up to an indented or bulleted comment line), or ``""`` when it has none."""
    path = _builtin_path(name)
    if path is None:
        raise _not_found("Recipe", name)
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line[1:] if line.startswith("#") else None
        if text is None or (words and (text.startswith("  ") or text.lstrip().startswith("- "))):
            break
        words.extend(text.split())
    return re.split(r"(?<=\.)\s", " ".join(words), maxsplit=1)[0]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, section by section: nested mappings merge key by key, any other value
    (a scalar, a list, ``null``) replaces the base's."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _recipe_relative(value: Any, folder: Path) -> Any:
    """``value`` with every string that starts with ``./`` or ``../`` made an absolute path under ``folder``."""
    if isinstance(value, dict):
        return {key: _recipe_relative(item, folder) for key, item in value.items()}
    if isinstance(value, list):
        return [_recipe_relative(item, folder) for item in value]
    if isinstance(value, str) and value.startswith(("./", "../")):
        return str((folder / value).resolve())
    return value


def _base_path(base: Any, recipe: Path) -> Path:
    """The file that ``base: <base>`` in ``recipe`` names: next to ``recipe`` first, then a built-in."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"Recipe '{recipe}': 'base' must name a recipe file, not {base!r}.")
    beside = recipe.parent / base
    if beside.is_file():
        return beside
    builtin = _builtin_path(base)
    if builtin is None:
        raise _not_found(f"Recipe '{recipe}': base", base)
    return builtin


def _read(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Recipe '{path}' not found.")
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"Recipe '{path}' inherits itself through 'base': {chain}.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"Recipe '{path}' is not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"Recipe '{path}' must be a mapping of sections, not {type(loaded).__name__}.")
    tree = dict(loaded or {})
    base = tree.pop("base", None)
    tree = _recipe_relative(tree, path.parent)
    if base is None:
        return tree
    return _merge(_read(_base_path(base, path), (*seen, resolved)), tree)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe file ``path`` as a nested dict, its ``base:`` chain merged in (see the module docstring).
    Raises :class:`ConfigError` for a missing file, invalid YAML, a non-mapping, an unknown base or a cycle."""
    return _read(Path(path), ())
