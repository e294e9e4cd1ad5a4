"""TRL's DPOConfig / TrainingArguments names are accepted with a note, or refused with the key to use; unknown
keys get no unrelated suggestion; ``sparsealign --version``."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import yaml

from sparsealign.config import TRL_NAMES, ConfigError
from sparsealign.methods import get_method
from sparsealign.methods.registry import trl_loss_types
from sparsealign.recipes.load import load_config
from sparsealign.version import __version__

SIMPLE = [
    ("learning_rate", 1e-5, "train.lr", 1e-5),
    ("gradient_accumulation_steps", 4, "train.grad_accum", 4),
    ("per_device_train_batch_size", 3, "train.batch_size", 3),
    ("per_device_eval_batch_size", 5, "eval.batch_size", 5),
    ("num_train_epochs", 2, "train.epochs", 2.0),
    ("logging_steps", 7, "train.log_every", 7),
    ("save_steps", 20, "train.save_every", 20),
    ("eval_steps", 10, "train.eval_every", 10),
    ("lr_scheduler_type", "cosine", "train.schedule", "cosine"),
    ("lr_scheduler_type", "linear", "train.schedule", "linear"),
    ("lr_scheduler_type", "constant_with_warmup", "train.schedule", "constant"),
    ("report_to", "tensorboard", "train.tracker", "tensorboard"),
    ("report_to", "[wandb, tensorboard]", "train.tracker", "wandb"),
    ("report_to", "none", "train.tracker", "none"),
    ("bf16", "false", "train.precision", "fp32"),
    ("bf16", "true", "train.precision", "bf16-mixed"),
    ("overwrite_output_dir", "true", "train.overwrite", True),
    ("group_by_length", "true", "train.group_by_length", True),
    ("padding_free", "false", "train.packing", False),
]


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_every_trl_name_is_tested():
    tested = {name for name, *_ in SIMPLE} | {
        "max_completion_length",
        "loss_type",
        "precompute_ref_log_probs",
    }
    assert tested == set(TRL_NAMES)


@pytest.mark.parametrize(("name", "value", "ours", "expected"), SIMPLE)
@pytest.mark.parametrize("where", ["", "train.", "own"])
def test_an_override_with_trl_name_sets_our_key(name, value, ours, expected, where, caplog):
    prefix = f"{ours.split('.')[0]}." if where == "own" else where
    with caplog.at_level(logging.INFO, logger="sparsealign.config"):
        config = load_config(None, [f"{prefix}{name}={value}"])
    assert _get(config, ours) == expected
    assert f"is TRL's name; using {ours}=" in caplog.text


@pytest.mark.parametrize(("name", "value", "ours", "expected"), SIMPLE)
def test_a_recipe_with_trl_names(tmp_path, name, value, ours, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({name: yaml.safe_load(str(value))}))
    assert _get(load_config(recipe), ours) == expected
    recipe.write_text(yaml.safe_dump({"train": {name: yaml.safe_load(str(value))}}))
    assert _get(load_config(recipe), ours) == expected


def test_override_beats_the_recipe_and_a_recipe_conflict_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"lr": 1e-3}}))
    assert load_config(recipe, ["learning_rate=2e-5"]).train.lr == 2e-5
    recipe.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-4}}))
    assert load_config(recipe, ["train.lr=3e-5"]).train.lr == 3e-5
    recipe.write_text(yaml.safe_dump({"train": {"lr": 1e-3, "learning_rate": 1e-4}}))
    with pytest.raises(
        ConfigError, match=r"'train.learning_rate' \(TRL's name for 'train.lr'\) and 'train.lr'"
    ):
        load_config(recipe)


def test_loss_type_chooses_the_method(tmp_path, caplog):
    for trl, ours in trl_loss_types().items():
        with caplog.at_level(logging.INFO, logger="sparsealign.config"):
            assert load_config(None, [f"loss_type={trl}"]).method.name == ours
        assert f"loss_type='{trl}' is TRL's name; using method.name={ours}" in caplog.text
        assert load_config(None, [f"method.loss_type={trl}", "method.beta=0.3"]).method.beta == 0.3
    assert trl_loss_types()["sigmoid"] == get_method("dpo").name and get_method("ipo").name == "ipo"
    other = next(m for m in ("simpo", "orpo") if m not in trl_loss_types().values())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": other}}))
    assert load_config(recipe, ["loss_type=ipo"]).method.name == "ipo"  # an override chooses the method
    recipe.write_text(yaml.safe_dump({"method": {"loss_type": "ipo"}}))
    assert load_config(recipe, [f"method={other}"]).method.name == other
    recipe.write_text(yaml.safe_dump({"loss_type": "ipo", "method": {"name": other}}))
    with pytest.raises(ConfigError, match="disagree"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss_type=hinge", "method.name=slic is SLiC-HF's calibration hinge"),
        ("method.loss_type=robust", "Chowdhury et al. (2024)"),
        ("loss_type=exo_pair", "loss_type='exo_pair' is not implemented here"),
        ("max_completion_length=128", "data.max_prompt_length=P data.max_length=P+C"),
        ("data.max_completion_length=128", "data.max_length caps prompt + response"),
        ("bf16=maybe", "must be true or false"),
        ("lr_scheduler_type=polynomial", "train.schedule is one of constant, linear, cosine"),
        ("report_to=comet_ml", "train.tracker is one of"),
        ("logging_steps=0.1", "train.log_every counts optimizer steps"),
    ],
)
def test_names_without_an_honest_equivalent_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_precompute_ref_log_probs_is_the_reference_cache(tmp_path):
    config = load_config(None, ["precompute_ref_log_probs=true", f"output_dir={tmp_path}/run"])
    assert config.reference.cache == str(tmp_path / "run" / "reference-cache")
    config = load_config(None, ["reference.cache=/c", "precompute_ref_log_probs=true"])
    assert config.reference.cache == "/c"
    assert load_config(None, ["precompute_ref_log_probs=false"]).reference.cache is None
    with pytest.raises(ConfigError, match="asks for the live reference"):
        load_config(None, ["reference.cache=/c", "precompute_ref_log_probs=false"])


@pytest.mark.parametrize(
    ("override", "wanted", "misleading"),
    [
        (
            "train.gradient_acumulation_steps=4",
            "'train.grad_accum' (TRL: gradient_accumulation_steps)",
            "gradient_checkpointing",
        ),
        ("beta=0.1", "Did you mean 'method.beta'?", "'eval'"),
        ("data.learning_rate=1e-5", "'learning_rate' is TRL's name for 'train.lr'", "Did you mean"),
        ("train.warmup=3", "Did you mean 'warmup_steps'?", "TRL"),
        ("train.xyzzy=3", "Valid keys:", "Did you mean"),
    ],
)
def test_suggestions(override, wanted, misleading):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert wanted in str(info.value) and misleading not in str(info.value)


def test_the_issue_examples_now_work_or_point_right():
    config = load_config(None, ["train.gradient_accumulation_steps=2", "train.learning_rate=1e-6"])
    assert (config.train.grad_accum, config.train.lr) == (2, 1e-6)
    assert load_config(None, ["method.loss_type=sigmoid"]).method.name == get_method("dpo").name
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.max_completion_length=64"])
    assert "max_prompt_length'?" not in str(info.value) and "data.max_length" in str(info.value)


def test_keys_listing_shows_trl_names():
    proc = subprocess.run(
        [sys.executable, "-m", "sparsealign.cli", "config", "--keys"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "gradient_accumulation_steps" in proc.stdout and "train.grad_accum" in proc.stdout


def test_version_is_fast_and_imports_no_torch():
    code = (
        "import sys\nfrom sparsealign.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"sparsealign {__version__}"
    assert time.perf_counter() - start < 2.0
