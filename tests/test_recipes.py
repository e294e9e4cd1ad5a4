"""Built-in recipes by name, recipe files, ``base:`` inheritance and the files the wheel must carry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsealign.cli import main
from sparsealign.errors import ConfigError
from sparsealign.recipes import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    builtin_recipes,
    read_recipe,
    recipe_description,
    resolve_recipe,
)

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory outside the checkout, as for an installed wheel."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_builtin_names_are_the_recipe_files_without_accelerate_configs():
    expected = {
        path.relative_to(RECIPES_DIR).as_posix().removesuffix(".yaml")
        for path in RECIPES_DIR.rglob("*.yaml")
        if path.relative_to(RECIPES_DIR).parts[0] != "accelerate"
    }
    names = builtin_recipes()
    assert names == sorted(expected)
    assert {"smoke", "imdb/sparsepo", "imdb/dpo", "paper/hh-sparsepo", DEFAULT_RECIPE} <= set(names)
    assert not any(name.startswith("accelerate/") or name.endswith(".yaml") for name in names)
    assert (RECIPES_DIR / "accelerate" / "ddp.yaml").is_file()


def test_the_repository_configs_folder_is_the_package_recipes():
    assert (ROOT / "configs").is_symlink()
    assert (ROOT / "configs").resolve() == RECIPES_DIR
    assert RECIPES_DIR.parent.name == "sparsealign"


@pytest.mark.parametrize(
    ("spec", "relative"),
    [
        ("smoke", "smoke.yaml"),
        ("smoke.yaml", "smoke.yaml"),
        ("configs/smoke.yaml", "smoke.yaml"),
        ("./configs/smoke.yaml", "smoke.yaml"),
        ("imdb/sparsepo", "imdb/sparsepo.yaml"),
        ("configs/imdb/sparsepo.yaml", "imdb/sparsepo.yaml"),
        (Path("paper/hh-sparsepo.yaml"), "paper/hh-sparsepo.yaml"),
    ],
)
def test_builtin_names_resolve_outside_the_checkout(elsewhere: Path, spec: str | Path, relative: str):
    assert resolve_recipe(spec) == RECIPES_DIR / relative


def test_an_existing_file_wins_over_a_builtin_name(elsewhere: Path):
    mine = _write(elsewhere / "smoke.yaml", {"output_dir": "mine"})
    assert resolve_recipe("smoke.yaml") == Path("smoke.yaml")
    assert read_recipe(resolve_recipe("smoke.yaml")) == {"output_dir": "mine"}
    assert resolve_recipe(mine) == mine
    assert resolve_recipe("smoke") == RECIPES_DIR / "smoke.yaml"  # no file named 'smoke' here


def test_accelerate_configs_are_not_recipes(elsewhere: Path):
    with pytest.raises(ConfigError, match="neither a file nor a built-in recipe"):
        resolve_recipe("accelerate/ddp")


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [
        ("imdb/sparspo", "imdb/sparsepo"),
        ("dpo", "imdb/dpo"),
        ("smok", "smoke"),
        ("configs/imdb/kto.yml", "imdb/kto"),
    ],
)
def test_an_unknown_name_suggests_the_closest_builtin(elsewhere: Path, spec: str, suggestion: str):
    with pytest.raises(ConfigError, match=f"Recipe '{spec}' not found") as info:
        resolve_recipe(spec)
    message = str(info.value)
    assert f"Did you mean '{suggestion}'" in message
    assert "`sparsealign recipes` lists the built-in recipes" in message


def test_a_name_like_nothing_gets_no_suggestion(elsewhere: Path):
    with pytest.raises(ConfigError) as info:
        resolve_recipe("zzzzzz")
    assert "Did you mean" not in str(info.value)


def test_base_next_to_the_recipe_merges_section_by_section(tmp_path: Path):
    _write(tmp_path / "a.yaml", {"model": {"name": "x"}, "train": {"lr": 1.0, "seed": 3}, "output_dir": "a"})
    child = _write(tmp_path / "b.yaml", {"base": "a.yaml", "train": {"lr": 2.0}, "method": {"name": "kto"}})
    assert read_recipe(child) == {
        "model": {"name": "x"},
        "train": {"lr": 2.0, "seed": 3},
        "output_dir": "a",
        "method": {"name": "kto"},
    }


def test_a_non_mapping_value_replaces_the_base_section(tmp_path: Path):
    _write(tmp_path / "a.yaml", {"model": {"name": "x", "lora": {"r": 8, "alpha": 16}}})
    child = _write(tmp_path / "b.yaml", {"base": "a.yaml", "model": {"lora": None}})
    assert read_recipe(child) == {"model": {"name": "x", "lora": None}}


def test_a_base_chain_of_three(tmp_path: Path):
    _write(tmp_path / "a.yaml", {"train": {"lr": 1.0, "seed": 1, "epochs": 1}})
    _write(tmp_path / "sub" / "b.yaml", {"base": "../a.yaml", "train": {"seed": 2}})
    child = _write(tmp_path / "c.yaml", {"base": "sub/b.yaml", "train": {"epochs": 3}})
    assert read_recipe(child) == {"train": {"lr": 1.0, "seed": 2, "epochs": 3}}


def test_base_among_the_builtin_recipes(tmp_path: Path):
    smoke = read_recipe(RECIPES_DIR / "smoke.yaml")
    child = _write(tmp_path / "mine.yaml", {"base": "smoke.yaml", "train": {"max_steps": 3}})
    tree = read_recipe(child)
    assert tree["train"] == {**smoke["train"], "max_steps": 3}
    assert tree["data"] == smoke["data"] and tree["method"] == {"name": "dpo", "beta": 0.1}

    deep = read_recipe(_write(tmp_path / "deep.yaml", {"base": "imdb/sparsepo", "output_dir": "runs/x"}))
    assert deep["method"]["name"] == "sparsepo"  # from imdb/sparsepo
    assert deep["model"]["name"] == "smollm2-135m-instruct"  # from imdb/dpo, its base
    assert deep["output_dir"] == "runs/x"
    same = read_recipe(
        _write(tmp_path / "same.yaml", {"base": "configs/imdb/sparsepo.yaml", "output_dir": "runs/x"})
    )
    assert same == deep


def test_a_base_next_to_the_recipe_wins_over_a_builtin(tmp_path: Path):
    _write(tmp_path / "smoke.yaml", {"output_dir": "local"})
    child = _write(tmp_path / "mine.yaml", {"base": "smoke.yaml"})
    assert read_recipe(child) == {"output_dir": "local"}


def test_a_cycle_is_refused(tmp_path: Path):
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="inherits itself through 'base'"):
        read_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="inherits itself"):
        read_recipe(_write(tmp_path / "self.yaml", {"base": "self.yaml"}))


def test_an_unknown_base_names_the_recipe_and_the_closest_builtin(tmp_path: Path):
    child = _write(tmp_path / "mine.yaml", {"base": "imdb/dop"})
    with pytest.raises(ConfigError, match=r"mine.yaml': base 'imdb/dop' not found") as info:
        read_recipe(child)
    assert "Did you mean 'imdb/dpo'" in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"), [("- a\n- b\n", "must be a mapping"), ("a: [1\n", "not valid YAML")]
)
def test_a_recipe_that_is_not_a_yaml_mapping_is_refused(tmp_path: Path, text: str, match: str):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_recipe(tmp_path / "bad.yaml")


def test_a_missing_recipe_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        read_recipe(tmp_path / "absent.yaml")


def test_an_empty_recipe_is_an_empty_mapping(tmp_path: Path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert read_recipe(tmp_path / "empty.yaml") == {}


def test_dot_slash_paths_are_relative_to_their_own_recipe(tmp_path: Path, elsewhere: Path):
    _write(
        tmp_path / "lib" / "base.yaml",
        {"data": {"path": "./pairs.jsonl", "template": "../t.jinja"}, "model": {"name": "./model"}},
    )
    child = _write(
        tmp_path / "exp" / "run.yaml",
        {
            "base": "../lib/base.yaml",
            "data": {"path": "./mine.jsonl"},
            "list": ["./a", "b/c", 1],
            "out": "runs/x",
        },
    )
    tree = read_recipe(child)
    assert tree["data"] == {
        "path": str(tmp_path / "exp" / "mine.jsonl"),
        "template": str(tmp_path / "t.jinja"),
    }
    assert tree["model"] == {"name": str(tmp_path / "lib" / "model")}  # the base's folder, not the child's
    # other relative paths keep their meaning (relative to the working directory)
    assert tree["list"] == [str(tmp_path / "exp" / "a"), "b/c", 1]
    assert tree["out"] == "runs/x"


def test_the_smoke_recipe_carries_its_data(elsewhere: Path):
    data = Path(read_recipe(resolve_recipe("smoke"))["data"]["path"])
    assert data == RECIPES_DIR / "smoke_pairs.jsonl"
    rows = data.read_text().splitlines()
    assert len(rows) == 48 and {"prompt", "chosen", "rejected"} <= set(yaml.safe_load(rows[0]))


def test_every_builtin_recipe_reads_as_a_mapping_with_a_description():
    for name in builtin_recipes():
        tree = read_recipe(resolve_recipe(name))
        assert isinstance(tree, dict) and tree, name
        assert "base" not in tree, name
        assert {"model", "method", "train"} <= set(tree), name
        assert recipe_description(name), f"{name} has no first comment line"
    assert recipe_description("smoke").startswith("Smoke run: a tiny random Llama")


def test_package_data_covers_every_recipe_file():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = RECIPES_DIR.parent
    shipped = {path for pattern in patterns["sparsealign"] for path in package.glob(pattern)}
    data_files = {
        path for path in RECIPES_DIR.rglob("*") if path.is_file() and path.suffix not in {".py", ".pyc"}
    }
    assert data_files and data_files <= shipped, sorted(map(str, data_files - shipped))


def test_cli_lists_the_builtin_recipes(capsys: pytest.CaptureFixture[str]):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in lines if line and not line.startswith("The files are in")}
    assert sorted(listed) == builtin_recipes()
    assert listed["smoke"].split(None, 1)[1] == recipe_description("smoke")


def test_cli_refuses_an_unknown_recipe_with_a_suggestion(elsewhere: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["train", "imdb/sparspo", "train.lr=1e-4"]) == 2
    assert "Did you mean 'imdb/sparsepo'" in capsys.readouterr().err


def test_cli_help_imports_no_torch():
    code = (
        "import sys; from sparsealign.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
