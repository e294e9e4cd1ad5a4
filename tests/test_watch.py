"""Runs you can watch: timestamps in metrics.jsonl (continued on resumption), the end-of-run summary, the
progress bar's postfix, trackers that fail fast with the install line, and accelerate configs that leave the
process count to the user."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from sparsealign.cli import main
from sparsealign.errors import TrainingError, UserError
from sparsealign.recipes import RECIPES_DIR
from sparsealign.recipes.load import load_config
from sparsealign.train import loop
from sparsealign.train.loop import RunResult, best_eval_loss, progress_postfix, train
from sparsealign.train.summary import format_duration, format_run_summary
from sparsealign.train.tracking import TRACKERS, require_tracker

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


# --- timestamps ------------------------------------------------------------------------------------------


def test_metrics_lines_carry_time_and_elapsed(tmp_path):
    before = datetime.now(timezone.utc)
    result = train(smoke(tmp_path, "train.max_steps=4", "train.eval_every=2", "train.save_every=0"))
    after = datetime.now(timezone.utc)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4]  # train lines, eval at 2 and at the end
    times = [datetime.fromisoformat(r["time"]) for r in rows]
    assert all(t.utcoffset() is not None and t.utcoffset().total_seconds() == 0 for t in times), "UTC"
    assert before <= times[0] and times[-1] <= after
    assert times == sorted(times)
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # the elapsed count and the wall clock advance together (to the 1 ms rounding of both)
    wall = (times[-1] - times[0]).total_seconds()
    assert elapsed[-1] - elapsed[0] == pytest.approx(wall, abs=0.05)

    # what the summary reads
    assert result.elapsed_s >= elapsed[-1]
    assert result.tokens_per_s is not None and result.tokens_per_s > 0
    evals = [(r["eval/loss"], r["step"]) for r in rows if "eval/loss" in r]
    assert (result.best_eval_loss, result.best_eval_step) == min(evals, key=lambda e: (e[0], e[1]))
    assert result.written == {
        "config": tmp_path / "config.yaml",
        "metrics": tmp_path / "metrics.jsonl",
        "checkpoints": tmp_path / "checkpoints",
        "final": tmp_path / "final",
    }
    assert all(path.exists() for path in result.written.values())


def test_resumed_run_continues_the_elapsed_count(tmp_path):
    common = ("train.save_every=2", "train.eval_every=0")
    train(smoke(tmp_path, "train.max_steps=2", *common))
    state = json.loads((tmp_path / "checkpoints/step-2/state.json").read_text())
    first = read_metrics(tmp_path)
    assert 0 < first[1]["elapsed_s"] <= state["elapsed_s"]

    train(smoke(tmp_path, "train.max_steps=4", *common, "train.resume=auto"))
    rows = read_metrics(tmp_path)
    assert rows[:2] == first[:2], "lines up to the checkpoint are kept as they were"
    resumed = [r for r in rows if r["step"] > 2]
    assert resumed and all(r["elapsed_s"] > state["elapsed_s"] for r in resumed)


def test_best_eval_loss_reads_the_lowest_first(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 0.1},
        {"step": 2, "eval/loss": 0.7},
        {"step": 4, "eval/loss": 0.5},
        {"step": 6, "eval/loss": 0.5},
        {"step": 8, "eval/loss": 0.6},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert best_eval_loss(path) == (0.5, 4)
    assert best_eval_loss(tmp_path / "missing.jsonl") is None
    path.write_text(json.dumps({"step": 1, "loss": 0.3}) + "\n")
    assert best_eval_loss(path) is None


# --- the end-of-run summary ------------------------------------------------------------------------------


def test_summary_text(tmp_path):
    result = RunResult(
        output_dir=tmp_path,
        steps=120,
        interrupted=False,
        final_metrics={"loss": 0.61234, "rewards/accuracies": 0.75, "lr": 1e-6, "rewards/margins": 0.5},
        eval_metrics={"eval/loss": 0.65, "eval/rewards/accuracies": 0.625},
        report={"reward_delta": 0.125},
        elapsed_s=3725.4,
        tokens_per_s=12345.6,
        best_eval_loss=0.6,
        best_eval_step=80,
        written={"config": tmp_path / "config.yaml", "final": tmp_path / "final"},
    )
    assert format_run_summary(result).splitlines() == [
        f"Done: 120 steps in 1h 02m 05s (12,346 tokens/s); run folder {tmp_path}",
        "  train:       loss 0.6123  rewards/accuracies 0.7500  rewards/margins 0.5000",
        "  eval:        eval/loss 0.6500  eval/rewards/accuracies 0.6250",
        "  best eval:   eval/loss 0.6000 at step 80",
        "  report:      reward delta (policy - reference) +0.1250",
        f"  config:      {tmp_path / 'config.yaml'}",
        f"  final:       {tmp_path / 'final'}",
        f"  report:      {tmp_path / 'report'}",
    ]


def test_summary_without_eval_or_throughput(tmp_path):
    result = RunResult(tmp_path, 0, False, {}, {}, elapsed_s=2.04)
    assert format_run_summary(result) == f"Done: 0 steps in 2.0s; run folder {tmp_path}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0.0s"), (59.94, "59.9s"), (60.0, "1m 00s"), (125.4, "2m 05s"), (7384, "2h 03m 04s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_cli_prints_the_summary(tmp_path, capsys):
    code = main(
        [
            "train",
            str(SMOKE),
            f"output_dir={tmp_path}",
            f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
            "train.progress=false",
            "train.max_steps=2",
            "train.save_every=0",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("Done:"))
    assert first.startswith("Done: 2 steps in ") and "tokens/s" in first and str(tmp_path) in first
    assert "  eval:        eval/loss " in out
    assert f"  final:       {tmp_path / 'final'}" in out


# --- the progress bar ------------------------------------------------------------------------------------


def test_progress_postfix():
    metrics = {"loss": 0.693147, "rewards/accuracies": 0.5, "tokens_per_s": 1234.56, "lr": 1e-6}
    assert progress_postfix(metrics) == {"loss": "0.6931", "acc": "0.500", "tok/s": "1235"}
    # a method without paired rewards (e.g. a per-example loss) shows no accuracy
    assert progress_postfix({"loss": 1.0, "tokens_per_s": 10.0}) == {"loss": "1.0000", "tok/s": "10"}


# --- trackers --------------------------------------------------------------------------------------------


def _hide(monkeypatch, *modules: str) -> None:
    """Make ``importlib.util.find_spec`` report ``modules`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in modules else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("tracker", sorted(TRACKERS))
def test_missing_tracker_names_the_extra(tracker, monkeypatch):
    _hide(monkeypatch, *TRACKERS[tracker][0])
    with pytest.raises(TrainingError) as caught:
        require_tracker(tracker)
    assert str(caught.value).startswith(
        f"train.tracker={tracker} needs the {tracker} package: pip install 'sparsealign[{tracker}]'"
    )
    assert isinstance(caught.value, UserError)


def test_tracker_present_or_none_passes(monkeypatch):
    require_tracker("none")
    # tensorboardX alone is enough for accelerate's tensorboard tracker
    _hide(monkeypatch, "tensorboard")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: object() if name == "tensorboardX" else real(name)
    )
    require_tracker("tensorboard")


def test_missing_tracker_fails_before_the_model_loads(tmp_path, monkeypatch):
    _hide(monkeypatch, "wandb")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the tracker check")

    monkeypatch.setattr(loop, "load_bundle", refuse)
    with pytest.raises(TrainingError, match=r"pip install 'sparsealign\[wandb\]'"):
        train(smoke(tmp_path / "run", "train.tracker=wandb"))
    assert not (tmp_path / "run").exists(), "nothing written"


def test_every_tracker_is_a_config_value_with_an_extra():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for tracker, (_, extra) in TRACKERS.items():
        assert smoke(Path("unused"), f"train.tracker={tracker}").train.tracker == tracker
        assert extra in extras, extra


# --- accelerate configs ----------------------------------------------------------------------------------


def test_accelerate_configs_leave_the_process_count_to_the_user():
    configs = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"}
    for path in configs:
        settings = yaml.safe_load(path.read_text())
        assert "num_processes" not in settings, path.name
        assert settings["num_machines"] == 1, path.name
        assert "--num_processes" in path.read_text(), f"{path.name} says how to set it"
