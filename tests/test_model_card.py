"""Results you can share: the model card of every run, `sparsealign push` up to the upload call (the hub's
calls replaced by fakes), and `sparsealign train --nproc N`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard

from sparsealign.cli import build_parser, launch_command, main
from sparsealign.errors import TrainingError
from sparsealign.methods import METHODS, get_method
from sparsealign.recipes import RECIPES_DIR
from sparsealign.recipes.load import load_config
from sparsealign.train import push as push_module
from sparsealign.train.loop import train
from sparsealign.train.model_card import hub_model_id, last_metrics, model_card_text, write_model_card
from sparsealign.train.push import PushError, push_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"
TOKEN = "hf_secretTOKEN0123456789"


def _config(model: str = "tiny-random-llama", method: dict | None = None) -> dict:
    return {
        "output_dir": "runs/demo",
        "model": {"name": model, "revision": None, "lora": None},
        "data": {"path": "/data/pairs.jsonl", "dataset": None, "source": None},
        "method": method or {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0},
        "train": {"max_steps": 3},
    }


def _run_folder(tmp_path: Path, adapter: bool = False) -> Path:
    """A finished run as the loop leaves it, without the card: config, metrics and a final/ folder."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config()))
    lines = [
        {"step": 1, "loss": 0.7, "rewards/accuracies": 0.5},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75, "rewards/margins": 0.125},
        {"step": 2, "eval/loss": 0.55, "eval/rewards/accuracies": 1.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "final" / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    return run


# --------------------------------------------------------------------------------------------------
# The card.


def test_every_method_cites_its_paper():
    missing = sorted(name for name, method in METHODS.items() if not method.citation and name != "sft")
    assert not missing, f"methods without a citation: {missing}"
    assert get_method("sparsepo").citation.endswith("arXiv:2410.05102")
    assert get_method("dpo").citation.endswith("arXiv:2305.18290")
    assert get_method("fpo").citation.endswith("arXiv:2411.07618")


def test_hub_model_id(tmp_path):
    assert hub_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_model_id("tiny-random-llama") is None
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert hub_model_id(str(tmp_path / "a" / "b")) is None  # a local folder is no hub id
    assert hub_model_id("a/b/c") is None


def test_last_metrics(tmp_path):
    run = _run_folder(tmp_path)
    step, train_metrics, held_out = last_metrics(run / "metrics.jsonl")
    assert step == 2
    assert train_metrics["rewards/margins"] == 0.125
    assert held_out == {"step": 2, "eval/loss": 0.55, "eval/rewards/accuracies": 1.0}
    assert last_metrics(tmp_path / "none.jsonl") == (0, {}, {})


def test_card_front_matter_and_body():
    config = _config("smollm2-135m-instruct")
    report = {"policy": {"reward_mean": 1.5, "kl_mean": 2.25}, "reference": {"reward_mean": 0.5}}
    report["reward_delta"] = 1.0
    text = model_card_text(
        config,
        get_method("dpo"),
        2,
        {"loss": 0.6, "rewards/accuracies": 0.75, "lr": 1e-3},
        {"eval/loss": 0.55},
        report,
        config_path="runs/demo/config.yaml",
    )
    card = ModelCard(text)  # the hub's own parser reads the front matter
    assert card.data.to_dict() == {
        "library_name": "transformers",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "tags": ["sparsealign", "dpo", "preference-optimization"],
        "pipeline_tag": "text-generation",
    }
    body = card.text
    assert "**Base model:** `smollm2-135m-instruct`" in body
    assert "`dpo` with `beta=0.1`, `label_smoothing=0.0`" in body
    assert "the file `pairs.jsonl`" in body
    for row in ("| `loss` | 0.6 |", "| `rewards/accuracies` | 0.75 |", "| `eval/loss` | 0.55 |"):
        assert row in body
    assert "`lr`" not in body  # not a headline metric
    assert "| `report/policy/reward_mean` | 1.5 |" in body and "| `report/reward_delta` | 1 |" in body
    assert "sparsealign train runs/demo/config.yaml" in body
    resolved = body.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(resolved) == config  # the configuration that reproduces the run
    assert body.rstrip().endswith(get_method("dpo").citation)


def test_adapter_card_and_bibtex_citation():
    from dataclasses import replace

    method = replace(get_method("orpo"), citation="@article{x, title={X}}")
    text = model_card_text(_config("tiny-random-llama", {"name": "orpo"}), method, 0, {}, {}, adapter=True)
    card = ModelCard(text)
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.base_model is None  # a random built-in has no hub id
    assert "AutoPeftModelForCausalLM" in card.text and "No metrics were logged." in card.text
    assert "`orpo` with its defaults" in card.text
    assert "```bibtex\n@article{x, title={X}}\n```" in card.text


def test_every_run_writes_a_card(tmp_path):
    config = load_config(
        SMOKE,
        [
            f"output_dir={tmp_path}",
            f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
            "train.progress=false",
            "train.max_steps=2",
        ],
    )
    train(config)
    card = ModelCard.load(tmp_path / "final" / "README.md")
    assert card.data.library_name == "transformers" and "dpo" in card.data.tags
    _, train_metrics, held_out = last_metrics(tmp_path / "metrics.jsonl")
    assert f"| `eval/loss` | {held_out['eval/loss']:.4g} |" in card.text
    assert f"| `loss` | {train_metrics['loss']:.4g} |" in card.text
    assert f"sparsealign train {tmp_path / 'config.yaml'}" in card.text
    assert "for 2 optimizer steps" in card.text


def test_write_model_card_reads_the_run_folder(tmp_path):
    run = _run_folder(tmp_path, adapter=True)
    path = write_model_card(run)
    assert path == run / "final" / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "peft"
    assert "| `rewards/margins` | 0.125 |" in card.text


# --------------------------------------------------------------------------------------------------
# Push, with the hub's calls replaced.


@pytest.fixture
def fake_hub(monkeypatch):
    """Online, with a token in the environment; HfApi's calls record their arguments instead of uploading."""
    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(push_module, "hub_reachable", lambda: True)

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", (repo_id,), kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        calls.append(("upload_folder", (), kwargs))
        return "https://huggingface.co/me/demo/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _no_token_anywhere(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_push_uploads_final_with_its_card(tmp_path, fake_hub, capsys):
    run = _run_folder(tmp_path)
    assert main(["push", str(run), "--repo-id", "me/demo", "--private"]) == 0
    (create, args, kwargs), (upload, _, up) = fake_hub
    assert (create, args) == ("create_repo", ("me/demo",))
    assert kwargs == {"private": True, "repo_type": "model", "exist_ok": True}
    assert upload == "upload_folder"
    assert up["repo_id"] == "me/demo" and Path(up["folder_path"]) == run / "final"
    assert up["repo_type"] == "model" and "token" not in up  # huggingface_hub finds the token itself
    assert up["files"] == ["README.md", "config.json"]  # the card was written before the upload
    out = capsys.readouterr()
    assert "https://huggingface.co/me/demo/commit/abc" in out.out
    assert TOKEN not in out.out + out.err
    _no_token_anywhere(tmp_path)


def test_push_keeps_an_existing_card_and_defaults_to_public(tmp_path, fake_hub):
    run = _run_folder(tmp_path)
    (run / "final" / "README.md").write_text("my own card\n")
    push_run(run, "me/demo")
    assert fake_hub[0][2]["private"] is False
    assert (run / "final" / "README.md").read_text() == "my own card\n"


def test_push_errors_are_clear(tmp_path, fake_hub, monkeypatch):
    with pytest.raises(PushError, match="no final/ folder"):
        push_run(tmp_path, "me/demo")
    run = _run_folder(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_run(run, "me/demo")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(push_module, "hub_reachable", lambda: False)
    with pytest.raises(PushError, match="cannot be reached"):
        push_run(run, "me/demo")
    monkeypatch.setattr(push_module, "hub_reachable", lambda: True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PushError, match="HF_TOKEN"):
        push_run(run, "me/demo")
    assert fake_hub == []  # nothing was sent

    monkeypatch.setattr("huggingface_hub.get_token", lambda: TOKEN)

    def refused(self, repo_id, **kwargs):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(HfApi, "create_repo", refused)
    with pytest.raises(PushError, match="Could not reach the hub"):
        push_run(run, "me/demo")


def test_push_offline_from_the_command_line(tmp_path, monkeypatch, capsys):
    run = _run_folder(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(run), "--repo-id", "me/demo"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# train --nproc N.


def test_nproc_is_optional():
    parser = build_parser()
    assert parser.parse_args(["train", "smoke"]).nproc is None
    args = parser.parse_args(["train", "--nproc", "2", "smoke", "train.max_steps=2"])
    assert (args.nproc, args.args) == (2, ["smoke", "train.max_steps=2"])


def test_launch_command_on_cpu_and_gpus():
    argv, env = launch_command(2, ["smoke", "train.max_steps=2"], gpus=0, verbose=True)
    assert env == {"ACCELERATE_USE_CPU": "1"}
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[argv.index("--config_file") + 1] == str(RECIPES_DIR / "accelerate" / "ddp.yaml")
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert int(argv[argv.index("--main_process_port") + 1]) > 0
    assert argv[argv.index("-m", 3) :] == [
        "-m",
        "sparsealign.cli",
        "-v",
        "train",
        "smoke",
        "train.max_steps=2",
    ]
    argv, env = launch_command(4, ["smoke"], gpus=4)
    assert env == {} and argv[-3:] == ["sparsealign.cli", "train", "smoke"]
    with pytest.raises(TrainingError, match="has 4 GPU"):
        launch_command(5, [], gpus=4)
    with pytest.raises(TrainingError, match="at least 1"):
        launch_command(0, [], gpus=0)


def test_nproc_two_cpu_processes(tmp_path):
    """The real thing: two CPU processes through accelerate (about 20 s)."""
    result = subprocess.run(
        [sys.executable, "-m", "sparsealign.cli", "train", "--nproc", "2", str(SMOKE)]
        + [f"output_dir={tmp_path}", f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}"]
        + ["train.max_steps=2", "train.progress=false"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 2
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2]
    assert (tmp_path / "final" / "README.md").is_file()
