"""Recipes, dotted overrides, type checking and suggestions."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from sparsealign.config import Config, ConfigError, LoraConfig, describe
from sparsealign.recipes.load import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_and_overrides():
    cfg = load_config(ROOT / "configs/smoke.yaml", ["method.beta=0.2", "train.max_steps=50", "train.lr=5e-4"])
    assert cfg.method.beta == 0.2 and cfg.train.max_steps == 50 and cfg.train.lr == 5e-4
    assert cfg.model.name == "tiny-random-llama"
    assert isinstance(cfg, Config)


def test_int_widens_to_float_and_yaml_lists():
    cfg = load_config(None, ["method.beta=1", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.method.beta == 1.0 and isinstance(cfg.method.beta, float)
    assert cfg.model.lora == LoraConfig(target_modules=["q_proj", "v_proj"])


def test_nested_section_can_be_disabled():
    cfg = load_config(ROOT / "configs/imdb/dpo.yaml", ["model.lora=null"])
    assert cfg.model.lora is None


def test_method_shorthand():
    assert load_config(None, ["method=simpo"]).method.name == "simpo"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=5", "Unknown config key 'train.max_step'. Did you mean 'max_steps'?"),
        ("trian.max_steps=5", "Unknown config key 'trian'. Did you mean 'train'?"),
        ("train.max_steps=five", "'train.max_steps': expected int, got 'five'"),
        ("method.name=dop", "Unknown method 'dop'"),
        ("train.batch_size=0", "must be at least 1"),
        ("nonsense", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_unknown_key_in_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"peak_lr": 1e-3}}))  # learning_rate is TRL's name: accepted
    with pytest.raises(ConfigError, match="Unknown config key 'train.peak_lr'"):
        load_config(recipe)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(None, ["method.name=cdpo"])
    assert load_config(None, ["method.name=cdpo", "method.label_smoothing=0.1"]).method.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="only one of"):
        load_config(None, ["data.path=a.jsonl", "data.dataset=x"])


def test_required_keys_exist():
    from sparsealign.methods import describe_methods

    keys = {row[0] for row in describe()} | {row[0].strip() for row in describe_methods()}
    required = {
        "output_dir",
        "model.name",
        "data.path",
        "method.name",
        "method.beta",
        "train.max_steps",
        "train.save_every",
        "train.log_every",
        "train.resume",
        "train.seed",
    }
    assert required <= keys
    assert all(row[2] for row in describe()), "every key has a help string"
    assert all(row[2] for row in describe_methods()), "every method and option has a help string"


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    recipes = [r for r in recipes if "accelerate" not in r.parts]
    assert recipes
    for recipe in recipes:
        load_config(recipe)


def test_options_a_method_does_not_use_are_refused():
    with pytest.raises(ConfigError, match="'method.l1_reward' has no effect with method 'dpo'"):
        load_config(None, ["method.name=dpo", "method.l1_reward=0.1"])
    with pytest.raises(ConfigError, match="'method.alpha' has no effect with method 'tdpo1'"):
        load_config(None, ["method.name=tdpo1", "method.alpha=0.3"])
    assert load_config(None, ["method.name=tdpo2", "method.alpha=0.3"]).method.alpha == 0.3


def test_sparsepo_code_option_names_are_aliases(caplog):
    caplog.set_level(logging.INFO, logger="sparsealign.config")
    cfg = load_config(
        None,
        [
            "method.pref_optim=sparse",
            "method.rw_kl_independent=true",
            "method.l1_norm_param_u=0.001",
            "method.l1_norm_param_d=0.002",
            "method.mask_model=simple_all",
        ],
    )
    m = cfg.method
    assert (m.name, m.shared_mask, m.l1_reward, m.l1_kl) == ("sparsepo", False, 0.001, 0.002)
    assert "rw_kl_independent" in caplog.text
    mapo = load_config(
        None, ["method=mapo", "method.activation_hook=mlp", "method.activation_mapping=zn_rescale"]
    )
    assert mapo.method.activations == "mlp"
    with pytest.raises(ConfigError, match="supports only 'zn_rescale'"):
        load_config(None, ["method=mapo", "method.activation_mapping=sigmoid"])


def test_recipes_inherit_with_base(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        yaml.safe_dump({"method": {"name": "dpo", "beta": 0.3}, "train": {"lr": 1e-4}})
    )
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "parent.yaml", "method": {"beta": 0.5}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.method.name, cfg.method.beta, cfg.train.lr) == ("dpo", 0.5, 1e-4)
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"base": "loop.yaml"}))
    with pytest.raises(ConfigError, match="inherits itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize(("size", "layer", "l0", "per_process"), [("2b", 25, 55, 8), ("9b", 41, 52, 8)])
def test_fpo_ultrafeedback_recipes_carry_the_paper_settings(size, layer, l0, per_process):
    cfg = load_config(ROOT / f"configs/ultrafeedback/fpo-gemma-2-{size}.yaml")
    assert cfg.method.name == "fpo" and cfg.method.stop_grad_chosen
    assert (cfg.method.beta, cfg.method.alpha, cfg.method.k) == (0.1, 0.5, 50)
    assert cfg.sae.path == f"google/gemma-scope-{size}-pt-res/layer_{layer}/width_16k/average_l0_{l0}"
    assert (cfg.sae.site, cfg.sae.layer) == ("resid_post", layer)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.schedule) == (5e-7, 150, "constant")
    assert cfg.train.batch_size * cfg.train.grad_accum * 4 == 32 and cfg.train.epochs == 1
    assert cfg.train.batch_size * cfg.train.grad_accum == per_process
    assert cfg.data.source == "ultrafeedback"
    # rendered and truncated as HALOs did (the FPO runs): <|user|>/<|assistant|> turns, keep_start
    assert (cfg.data.chat_template, cfg.data.truncation) == ("halos", "keep_start")
    assert cfg.reference.cache is not None
