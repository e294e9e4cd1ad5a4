"""The method registry is the one place methods are described; user-defined methods and sources load by path."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsealign.config import ConfigError, MethodOptions
from sparsealign.methods import (
    CACHE_PROVIDES,
    METHODS,
    Method,
    cacheable_methods,
    describe_methods,
    get_method,
    register,
)
from sparsealign.methods.registry import METHODS as REGISTRY
from sparsealign.recipes import builtin_recipes
from sparsealign.recipes.load import load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src/sparsealign"


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_no_module_outside_the_registry_names_a_method():
    """A method name as a string constant anywhere but ``sparsealign/methods/`` would be a second list of
    methods (a literal, a tuple of cacheable methods, a ``== "fpo"`` test): all of those derive from the
    registry."""
    names = set(METHODS) | {alias for m in METHODS.values() for alias in m.name_aliases}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "methods" in path.relative_to(PACKAGE).parts[:1]:
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{line}: {value!r}"
            for line, value in _string_constants(path)
            if value in names
        ]
    assert not offenders, "method names listed outside the registry:\n" + "\n".join(offenders)


def test_no_test_hard_codes_the_list_of_methods():
    """Tests take the methods from the registry: no list, tuple or set literal holding four or more distinct
    method names (a few named examples, such as an experiment grid's, are fine)."""
    names = set(METHODS)
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List | ast.Tuple | ast.Set):
                listed = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
                if len(set(listed)) >= 4:
                    offenders.append(f"{path.name}:{node.lineno}: {listed}")
    assert not offenders, "\n".join(offenders)


def test_every_method_record_is_complete():
    for name, method in METHODS.items():
        assert method.name == name
        assert issubclass(method.options, MethodOptions) and dataclasses.is_dataclass(method.options)
        assert method.summary, name
        for f in dataclasses.fields(method.options):
            assert f.name == "name" or f.metadata.get("help"), f"{name}: method.{f.name} has no help"
        method.options(name=name)  # every option has a default


def test_keys_listing_is_derived_from_the_registry():
    rows = describe_methods()
    listed = {key.split("=", 1)[1] for key, _, _ in rows if key.startswith("method.name=")}
    assert listed == set(METHODS)
    beta_rows = [default for key, default, _ in rows if key.strip() == "method.beta"]
    assert len(beta_rows) == sum("beta" in m.option_names() for m in METHODS.values())


def test_cacheable_is_derived_from_the_needs():
    for name, method in METHODS.items():
        expected = method.needs_reference and {n.value for n in method.needs} <= CACHE_PROVIDES
        assert (name in cacheable_methods()) == expected, name
    # the methods whose reference side is log-probs (and SAE codes, mismatched rows) only
    assert "dpo" in cacheable_methods() and "kto" in cacheable_methods() and "fpo" in cacheable_methods()
    assert "tdpo1" not in cacheable_methods()  # token KL over the vocabulary
    assert "sparsepo" not in cacheable_methods()  # the reference's hidden states
    assert "simpo" not in cacheable_methods()  # no reference at all


def test_options_are_per_method():
    cfg = load_config(None, ["method=simpo", "method.gamma=1.0"])
    assert type(cfg.method).__name__ == "SimPOOptions" and cfg.method.gamma == 1.0
    with pytest.raises(ConfigError, match="'method.gamma' has no effect with method 'dpo' .*simpo"):
        load_config(None, ["method.gamma=1.0"])
    with pytest.raises(ConfigError, match="Did you mean 'method.beta'"):
        load_config(None, ["method.betta=0.2"])
    # another method's option at its default (a recipe written for it, run with method=...) has no effect
    assert load_config("smoke", ["method=sft"]).method.name == "sft"


def test_registering_a_second_method_with_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("dpo", lambda out, options: None, MethodOptions))
    assert REGISTRY["dpo"].summary.startswith("DPO")


def test_unknown_method_names_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'kto'"):
        load_config(None, ["method.name=ktoo"])


def test_every_builtin_recipe_loads_with_its_method():
    for name in builtin_recipes():
        cfg = load_config(name)
        assert cfg.method.name in METHODS, name


def test_every_method_has_an_imdb_recipe():
    recipes = {load_config(name).method.name for name in builtin_recipes() if name.startswith("imdb/")}
    assert set(METHODS) <= recipes, sorted(set(METHODS) - recipes)


# -- user-defined methods and sources ---------------------------------------------------------------------


def test_user_method_loads_from_a_file_with_its_options():
    spec = f"{ROOT / 'examples/custom_method.py'}:my_method"
    cfg = load_config("smoke", [f"method.name={spec}", "method.margin=0.5"])
    assert cfg.method.margin == 0.5 and get_method(spec).name == "my_method"
    with pytest.raises(ConfigError, match="its options: beta, margin"):
        load_config("smoke", [f"method.name={spec}", "method.marginn=0.5"])
    with pytest.raises(Exception, match="defines no Method called 'nothing'"):
        get_method(f"{ROOT / 'examples/custom_method.py'}:nothing")
    with pytest.raises(Exception, match="does not exist"):
        get_method("no/such/file.py:my_method")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sparsealign.cli", "train", *args, "train.progress=false"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_example_method_trains_from_the_command_line(tmp_path):
    run = _cli(
        tmp_path,
        "configs/smoke.yaml",
        "method.name=examples/custom_method.py:my_method",
        "train.max_steps=2",
        f"output_dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    losses = _losses(tmp_path)
    assert len(losses) == 2 and losses[0] == pytest.approx(1.0, abs=1e-4)  # margin 1 − 0 at the reference
    assert "examples/custom_method.py:my_method" in (tmp_path / "config.yaml").read_text()


def test_example_source_trains_from_the_command_line(tmp_path):
    run = _cli(
        tmp_path,
        "configs/smoke.yaml",
        "data.path=null",
        "data.source=examples/custom_source.py:my_source",
        "train.max_steps=2",
        f"output_dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "36 training pairs" in run.stderr
    assert len(_losses(tmp_path)) == 2
