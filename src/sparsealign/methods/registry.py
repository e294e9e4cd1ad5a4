"""The method registry: names to :class:`Method` records, and everything derived from them.

Built-in methods are the modules of this package (each registers itself on import); a user's method is
``method.name=path/to/file.py:name`` or ``package.module:name``, where ``name`` is a :class:`Method` (or the
name of one that the module registered). From the registry come: the options of ``method:`` in a recipe
(:func:`build_method_options`), method-specific validation (:func:`validate_method`), the rows of
``sparsealign config --keys`` (:func:`describe_methods`) and whether a reference cache can serve a method.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

from sparsealign.config import Config, ConfigError, MethodOptions, build_section
from sparsealign.errors import MethodError
from sparsealign.methods.base import Method
from sparsealign.plugins import import_plugin, is_plugin_spec

logger = logging.getLogger("sparsealign.config")

METHODS: dict[str, Method] = {}
DEFAULT_METHOD = "dpo"
"""The method of a recipe that names none."""
_NAME_ALIASES: dict[str, str] = {}

CACHE_PROVIDES = frozenset({"reference_logps", "sae_features", "mismatched"})
"""What the offline reference cache (``sparsealign.refcache``) stores: reference log-probs, pooled SAE codes
and the mismatched rows' reference log-probs. A method whose needs are all in here can train from a cache."""


_NEED_WORDS = {
    "token_kl": "the reference's full distribution at every token (token KL)",
    "reference_layers": "the reference's hidden states",
    "activation_mask": "the reference's activations",
}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a second method with the same name is an error). Returns it, so a
    module can write ``DPO = register(Method(...))``."""
    for name in (method.name, *method.name_aliases):
        if name in METHODS or name in _NAME_ALIASES:
            raise ValueError(f"a method named '{name}' is already registered")
    METHODS[method.name] = method
    for alias in method.name_aliases:
        _NAME_ALIASES[alias] = method.name
    return method


def get_method(name: str) -> Method:
    """The method called ``name``: a registered name or alias, or a user's ``file.py:name`` /
    ``module:name``. An unknown name is a :class:`MethodError` naming the closest one."""
    if name in METHODS:
        return METHODS[name]
    if name in _NAME_ALIASES:
        return METHODS[_NAME_ALIASES[name]]
    if is_plugin_spec(name):
        return _user_method(name)
    close = difflib.get_close_matches(name, [*METHODS, *_NAME_ALIASES], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise MethodError(
        f"Unknown method '{name}'. Known: {', '.join(sorted(METHODS))}; or path/to/file.py:name for your "
        f"own (docs/extending.md).{hint}"
    )


def _user_method(spec: str) -> Method:
    module, name = import_plugin(spec, "method")
    found = getattr(module, name, None)
    if isinstance(found, Method):
        return found
    if name in METHODS:  # the module registered it under that name
        return METHODS[name]
    raise MethodError(
        f"method '{spec}': {module.__name__} defines no Method called '{name}' (define `{name} = Method(...)` "
        "or register one with that name; docs/extending.md)."
    )


def canonical_name(name: str) -> str:
    """``name`` with another program's name for the method (``sparse``) replaced by ours."""
    return _NAME_ALIASES.get(name, name)


def cache_can_serve(method: Method) -> bool:
    return method.cache_can_serve(CACHE_PROVIDES)


def cacheable_methods() -> list[str]:
    return sorted(name for name, method in METHODS.items() if cache_can_serve(method))


def users_of(option: str) -> list[str]:
    """Registered methods that have the option ``option``."""
    return sorted(name for name, m in METHODS.items() if option in m.option_names())


def _default(method: Method, option: str) -> Any:
    for f in dataclasses.fields(method.options):
        if f.name == option:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    raise KeyError(option)


def trl_loss_types() -> dict[str, str]:
    """TRL's ``DPOConfig.loss_type`` values that are a method here (each method's ``trl_loss_type``)."""
    return {m.trl_loss_type: name for name, m in METHODS.items() if m.trl_loss_type}


_TRL_LOSS_TYPES_REFUSED = {
    "hinge": "TRL's hinge loss is max(0, 1 − β·margin) on the log-ratios against the reference, which is not "
    "implemented here; method.name=slic is SLiC-HF's calibration hinge on the policy's own log-probs (no "
    "reference) plus an NLL term, a different objective.",
    "robust": "TRL's robust loss is Chowdhury et al. (2024)'s unbiased DPO under label noise, which is not "
    "implemented here; method.name=cdpo with method.label_smoothing=ε is conservative DPO (Mitchell 2023), a "
    "different loss for the same noise model.",
}


def method_of_loss_type(loss_type: Any) -> str:
    """The method that TRL's ``loss_type`` names; a :class:`ConfigError` for a loss we do not have."""
    by_loss = trl_loss_types()
    if loss_type in by_loss:
        return by_loss[loss_type]
    known = ", ".join(f"{trl} (method.name={ours})" for trl, ours in by_loss.items())
    why = _TRL_LOSS_TYPES_REFUSED.get(loss_type, f"TRL's loss_type={loss_type!r} is not implemented here.")
    raise ConfigError(
        f"{why} TRL loss types that map to a method: {known}; or choose a method with method.name "
        "(`sparsealign config --keys` lists them)."
    )


def _method_name(section: dict[str, Any]) -> Any:
    """Pop ``name`` (and TRL's ``loss_type``, which names the method too) from the ``method:`` section."""
    raw_name = section.pop("name", None)
    if "loss_type" not in section:
        return raw_name or DEFAULT_METHOD
    loss_type = section.pop("loss_type")
    by_loss = method_of_loss_type(loss_type)
    if raw_name is not None and (not isinstance(raw_name, str) or canonical_name(raw_name) != by_loss):
        raise ConfigError(
            f"method.name={raw_name!r} and TRL's loss_type={loss_type!r} (method.name={by_loss}) disagree; "
            "give one."
        )
    logger.info("config: loss_type=%r is TRL's name; using method.name=%s", loss_type, by_loss)
    return by_loss


def build_method_options(section: dict[str, Any]) -> MethodOptions:
    """The chosen method's options from the ``method:`` section of a recipe (``name`` defaults to dpo).

    The method's aliases (other programs' option names) are rewritten with a note. A key that is no option
    of the chosen method is dropped when it is another method's option at that method's default (a recipe
    written for another method, run with ``method=NAME``), and otherwise an error naming the methods that
    have it, or the closest option: nothing is silently ignored."""
    section = dict(section)
    raw_name = _method_name(section)
    if not isinstance(raw_name, str):
        raise ConfigError(f"'method.name' must be a string, got {raw_name!r}.")
    name = canonical_name(raw_name)
    if name != raw_name:
        logger.info("config: method.name=%s is another program's name; using method.name=%s", raw_name, name)
    try:
        method = get_method(name)
    except MethodError as error:
        raise ConfigError(str(error)) from None
    for alias, (target, convert) in method.aliases.items():
        if alias in section:
            value = section.pop(alias)
            if not target:  # an option with the one value our implementation has: checked, then dropped
                convert(value)
                logger.info(
                    "config: method.%s=%r is what method %s always does; accepted and dropped",
                    alias,
                    value,
                    name,
                )
                continue
            section[target] = convert(value)
            logger.info(
                "config: method.%s=%r is the original code's name; using method.%s=%r",
                alias,
                value,
                target,
                section[target],
            )
    options = method.option_names()
    for key in list(section):
        if key in options:
            continue
        users = users_of(key)
        if users and all(section[key] == _default(METHODS[user], key) for user in users):
            del section[key]  # another method's option at its default (a recipe written for it): no effect
            continue
        if users:
            raise ConfigError(
                f"'method.{key}' has no effect with method '{name}' (it is used by: {', '.join(users)})."
            )
        close = difflib.get_close_matches(str(key), options, n=1, cutoff=0.5)
        hint = f" Did you mean 'method.{close[0]}'?" if close else ""
        known = ", ".join(options) or "none"
        raise ConfigError(
            f"Unknown config key 'method.{key}' for method '{name}' (its options: {known}).{hint}"
        )
    return build_section(method.options, {"name": name, **section}, "method")


def method_options(options: MethodOptions) -> MethodOptions:
    """``options`` as the method's own options class (a bare :class:`MethodOptions`, as ``Config()`` makes,
    becomes the method's defaults)."""
    name = options.name or DEFAULT_METHOD
    method = get_method(name)
    if isinstance(options, method.options) and options.name:
        return options
    return method.options(name=name)


def validate_method(config: Config) -> None:
    """Checks that involve the chosen method: its own ``check``, the SAE (only for methods that need SAE
    features) and the reference cache (only for methods whose needs a cache provides)."""
    method = get_method(config.method.name)
    needs = {n.value for n in method.needs}
    if "sae_features" in needs and config.sae.path is None:
        raise ConfigError(
            f"method {config.method.name} needs a sparse autoencoder: set sae.path (and sae.site, sae.layer)."
        )
    if "sae_features" not in needs and config.sae.path is not None:
        users = sorted(n for n, m in METHODS.items() if any(x.value == "sae_features" for x in m.needs))
        raise ConfigError(
            f"'sae.path' has no effect with method '{config.method.name}' (it is used by: {', '.join(users)})."
        )
    if config.reference.cache is not None and not cache_can_serve(method):
        if not method.needs_reference:
            why = "it uses no reference model"
        else:
            missing = [_NEED_WORDS.get(m, m) for m in sorted(needs - CACHE_PROVIDES)]
            why = f"it needs {' and '.join(missing)} at every step, which a cache of log-probs cannot hold"
        raise ConfigError(
            f"'reference.cache' cannot serve method '{config.method.name}': {why}. "
            f"Methods that train from a cache: {', '.join(cacheable_methods())}."
        )
    if config.reference.feature_top_k is not None and "sae_features" not in needs:
        raise ConfigError(
            f"'reference.feature_top_k' has no effect with method '{config.method.name}' (it keeps SAE codes)."
        )
    if method.check is not None:
        method.check(config)


def describe_methods() -> list[tuple[str, str, str]]:
    """(key, default, help) rows of ``sparsealign config --keys`` for every method and option."""
    rows = []
    for name in sorted(METHODS):
        method = METHODS[name]
        tags = []
        if not method.needs_reference:
            tags.append("no reference model")
        elif cache_can_serve(method):
            tags.append("reference.cache can serve it")
        extra = f" [{'; '.join(tags)}]" if tags else ""
        rows.append((f"method.name={name}", "", f"{method.summary}{extra}"))
        for f in dataclasses.fields(method.options):
            if f.name == "name":
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"  method.{f.name}", repr(default), f.metadata.get("help", "")))
    return rows
