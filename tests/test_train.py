"""The training loop end to end on the tiny built-in model: run folder, equivalences, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsealign.methods import METHODS, Need
from sparsealign.recipes.load import load_config
from sparsealign.train import loop
from sparsealign.train.checkpoint import CheckpointError, list_checkpoints
from sparsealign.train.loop import train
from tiny_models import saved_random_sae

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"


def smoke(tmp_path: Path, *overrides: str):
    base = [
        f"output_dir={tmp_path}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
    ]
    return load_config(SMOKE, base + list(overrides))


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def train_losses(folder: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(folder) if "loss" in m}


def test_run_folder_and_metrics(tmp_path):
    result = train(smoke(tmp_path, "train.max_steps=6", "train.save_every=3", "train.eval_every=3"))
    assert result.steps == 6
    metrics = read_metrics(tmp_path)
    train_rows = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert key in train_rows[0], key
    assert train_rows[0]["loss"] == pytest.approx(0.6931, abs=2e-3), (
        "policy == reference at step 1: loss log 2"
    )
    assert any("eval/loss" in m for m in metrics)
    assert (tmp_path / "config.yaml").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-6"]
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert final.config.model_type == "llama"


def test_loss_goes_down(tmp_path):
    result = train(smoke(tmp_path, "train.max_steps=10", "train.save_every=0", "train.eval_every=0"))
    losses = train_losses(tmp_path)
    assert losses[10] < losses[1] - 0.05
    assert result.final_metrics["rewards/accuracies"] > 0.5


def test_gradient_accumulation_equivalence(tmp_path):
    """4 pairs x 1 micro-batch == 1 pair x 4 micro-batches: same losses and same weights."""
    common = ["train.max_steps=3", "train.save_every=0", "train.eval_every=0", "train.max_grad_norm=null"]
    train(smoke(tmp_path / "a", *common, "train.batch_size=4", "train.grad_accum=1"))
    train(smoke(tmp_path / "b", *common, "train.batch_size=1", "train.grad_accum=4"))
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-6)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a/checkpoints/step-3/trainable.safetensors")
    wb = load_file(tmp_path / "b/checkpoints/step-3/trainable.safetensors")
    for name in wa:
        torch.testing.assert_close(
            wa[name], wb[name], atol=2e-5, rtol=1e-4
        )  # Adam amplifies fp32 noise on ~0 grads


def test_kill_and_resume_reproduces_the_trajectory(tmp_path, monkeypatch):
    common = ["train.max_steps=8", "train.save_every=0", "train.eval_every=0"]
    train(smoke(tmp_path / "full", *common))
    full = train_losses(tmp_path / "full")

    original = loop.compute_loss
    calls = {"n": 0}

    def interrupt_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # one micro-batch per step: Ctrl-C during step 5
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", interrupt_at_step_5)
    result = train(smoke(tmp_path / "cut", *common))
    assert result.interrupted and result.steps == 4
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-4"]
    monkeypatch.setattr(loop, "compute_loss", original)
    result = train(smoke(tmp_path / "cut", *common, "train.resume=auto"))
    assert result.steps == 8 and not result.interrupted
    resumed = train_losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_checkpoint_from_another_run_is_refused(tmp_path):
    train(smoke(tmp_path, "train.max_steps=2", "train.save_every=2"))
    with pytest.raises(CheckpointError, match="method.beta"):
        train(smoke(tmp_path, "train.max_steps=4", "method.beta=0.5", "train.resume=auto"))


EXTRA = {
    "cdpo": ["method.label_smoothing=0.1"],
    "sparsepo-indp-mlp_last": ["method.shared_mask=false", "method.mask_model=mlp_last"],
    "sparsepo-random": ["method.mask_model=random"],
    "mapo-uniform": ["method.activations=uniform"],
}
VARIANTS = ["sparsepo-indp-mlp_last", "sparsepo-random", "mapo-uniform"]
# every registered method (those that need an SAE train in test_refcache.py and test_fpo*.py, where one is built)
TRAINED_HERE = sorted(name for name, m in METHODS.items() if Need.SAE_FEATURES not in m.needs)


@pytest.mark.parametrize("method", TRAINED_HERE + VARIANTS)
def test_every_method_trains(tmp_path, method):
    extra = EXTRA.get(method, [])
    method = method if method in METHODS else method.split("-")[0]
    result = train(
        smoke(tmp_path, f"method.name={method}", "train.max_steps=2", "train.save_every=0", *extra)
    )
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_metrics["loss"]))


def test_lora_run_saves_an_adapter(tmp_path):
    train(smoke(tmp_path, "train.max_steps=2", "model.lora.r=4", "model.merge_final=true"))
    assert (tmp_path / "final/adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final/merged")
    assert merged.config.model_type == "llama"


def _cli(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "sparsealign.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_cli_reports_unusable_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\nnot json\n')
    proc = _cli("train", str(SMOKE), f"output_dir={tmp_path}/run", f"data.path={bad}")
    assert proc.returncode == 2
    assert "identical_responses" in proc.stderr and "malformed_json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_key_suggests(tmp_path):
    proc = _cli("train", str(SMOKE), "train.max_step=3")
    assert proc.returncode == 2 and "Did you mean 'max_steps'?" in proc.stderr


def test_two_processes_match_one(tmp_path):
    """`accelerate launch` with 2 CPU processes x 2 pairs == 1 process x 2 pairs x 2 micro-batches.

    accelerate's `--cpu` flag starts several processes only through mpirun; torchrun's launcher
    (`--multi_gpu`) with ACCELERATE_USE_CPU=1 starts them directly and they talk over gloo.
    """
    common = [
        "train.max_steps=3",
        "train.save_every=0",
        "train.eval_every=0",
        "train.batch_size=2",
        "train.progress=false",
        "train.max_grad_norm=null",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
    ]
    one = _cli("train", str(SMOKE), f"output_dir={tmp_path}/one", "train.grad_accum=2", *common)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "sparsealign.cli",
        "train",
        str(SMOKE),
        f"output_dir={tmp_path}/two",
        "train.grad_accum=1",
        *common,
    ]
    two = subprocess.run(
        launch,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    la, lb = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)


def _mask_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(folder / "trainable.safetensors").items() if k.startswith("extra.")}


@pytest.mark.parametrize("lora", [False, True])
def test_mask_networks_train_and_resume(tmp_path, lora):
    """SparsePO's mask parameters change with training (also under LoRA) and come back on resume."""
    extra = ["model.lora.r=4"] if lora else []
    common = ["method.name=sparsepo", "train.save_every=1", "train.eval_every=0", *extra]
    train(smoke(tmp_path, "train.max_steps=2", *common))
    step1 = _mask_weights(tmp_path / "checkpoints/step-1")
    step2 = _mask_weights(tmp_path / "checkpoints/step-2")
    assert step1 and step1.keys() == step2.keys()
    assert any(not torch.equal(step1[k], step2[k]) for k in step1), "mask parameters did not change"
    assert (tmp_path / "final/method_module.safetensors").is_file()
    # resume from step 1 in a fresh folder: the third step starts from the saved mask weights
    import shutil

    shutil.copytree(tmp_path / "checkpoints/step-1", tmp_path / "again/checkpoints/step-1")
    train(smoke(tmp_path / "again", "train.max_steps=2", *common, "train.resume=auto"))
    torch.testing.assert_close(
        _mask_weights(tmp_path / "again/checkpoints/step-2"), step2, atol=1e-6, rtol=1e-5
    )


def test_fpo_trains_with_a_live_reference(tmp_path):
    sae = saved_random_sae(tmp_path / "sae")
    result = train(
        smoke(
            tmp_path / "run",
            "method.name=fpo",
            f"sae.path={sae}",
            "sae.layer=1",
            "method.k=8",
            "train.max_steps=3",
            "train.save_every=0",
        )
    )
    rows = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4), "policy == reference: log 2"
    assert rows[0]["fpo/feature_dist_chosen"] == pytest.approx(0.0, abs=1e-10)
    assert rows[-1]["fpo/feature_dist_rejected"] > 0, "the policy moved away from the reference's features"
    assert rows[0]["fpo/active_features"] > 0
    assert result.steps == 3


def test_fpo_bad_sae_settings_are_clear(tmp_path):
    sae = saved_random_sae(tmp_path / "sae")
    from sparsealign.config import ConfigError
    from sparsealign.train.loop import TrainingError

    with pytest.raises(TrainingError, match="sae.layer=7"):
        train(
            smoke(tmp_path / "run", "method.name=fpo", f"sae.path={sae}", "sae.layer=7", "train.max_steps=1")
        )
    with pytest.raises(ConfigError, match="needs a sparse autoencoder"):
        smoke(tmp_path / "run", "method.name=fpo")
    wide = saved_random_sae(tmp_path / "wide", d_in=32)
    from sparsealign.errors import UserError

    with pytest.raises(UserError, match="32"):
        train(
            smoke(
                tmp_path / "run2", "method.name=fpo", f"sae.path={wide}", "sae.layer=1", "train.max_steps=1"
            )
        )


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    train(smoke(tmp_path / "plain", "train.max_steps=3", "train.save_every=0", "train.eval_every=0"))
    train(
        smoke(
            tmp_path / "ckpt",
            "train.max_steps=3",
            "train.save_every=0",
            "train.eval_every=0",
            "train.gradient_checkpointing=true",
        )
    )
    plain, ckpt = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")
    for a, b in zip(plain, ckpt, strict=True):
        for key in ("loss", "grad_norm", "eval/loss", "rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
