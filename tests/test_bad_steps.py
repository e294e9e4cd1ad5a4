"""Bad numbers: a step with a non-finite loss or gradient norm is skipped (weights and optimizer state
unchanged), counted in metrics.jsonl with its examples logged; ``train.max_bad_steps`` consecutive ones stop
the run with a checkpoint of the last good weights. Method guards: ORPO's log-odds near probability 1 and
masked-out rows stay finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsealign.train.loop as loop
from sparsealign.errors import TrainingError
from sparsealign.losses import log_odds, orpo_loss
from sparsealign.recipes.load import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"


def smoke(out: Path, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        "train.save_every=0",
        "train.eval_every=0",
        "eval.max_batches=1",
    ]
    return load_config(SMOKE, base + list(overrides))


class Spy:
    """Wraps the loop's ``compute_loss``: before each training step's forward it records the trainable
    weights, the optimizer's state and the batch's origins; on the steps in ``nan_loss`` it multiplies the
    loss by NaN, on those in ``inf_grad`` it makes one parameter's gradient infinite (the loss stays finite)."""

    def __init__(self, monkeypatch, nan_loss=(), inf_grad=()):
        self.nan_loss, self.inf_grad = set(nan_loss), set(inf_grad)
        self.weights: list[dict[str, torch.Tensor]] = []
        self.adam_steps: list[list[float]] = []
        self.origins: list[list[str]] = []
        self.optimizer = None
        self.hooks = []
        real_loss, real_optimizer = loop.compute_loss, loop.build_optimizer

        def build_optimizer(*args, **kwargs):
            self.optimizer = real_optimizer(*args, **kwargs)
            return self.optimizer

        def compute_loss(policy, inputs):
            if not policy.training:  # the held-out evaluation
                return real_loss(policy, inputs)
            for hook in self.hooks:
                hook.remove()
            self.hooks.clear()
            step = len(self.weights) + 1
            params = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
            self.weights.append({n: p.detach().clone() for n, p in params})
            state = self.optimizer.state_dict()["state"]
            self.adam_steps.append([float(s["step"]) for s in state.values()])
            self.origins.append([pair.origin for pair in inputs.pairs])
            out = real_loss(policy, inputs)
            if step in self.nan_loss:
                out.loss = out.loss * float("nan")
            if step in self.inf_grad:
                self.hooks.append(params[0][1].register_hook(lambda g: torch.full_like(g, float("inf"))))
            return out

        monkeypatch.setattr(loop, "compute_loss", compute_loss)
        monkeypatch.setattr(loop, "build_optimizer", build_optimizer)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["loss", "gradient norm"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, caplog, kind):
    spy = Spy(monkeypatch, **({"nan_loss": [3]} if kind == "loss" else {"inf_grad": [3]}))
    result = loop.train(smoke(tmp_path, "train.max_steps=5"))
    assert result.steps == 5 and len(spy.weights) == 5
    # step 3 changed nothing: weights and Adam's state at the start of step 4 are those of step 3 ...
    assert same(spy.weights[2], spy.weights[3])
    assert spy.adam_steps[2] == spy.adam_steps[3] and set(spy.adam_steps[3]) == {2.0}
    # ... while the good steps do update them
    assert not same(spy.weights[1], spy.weights[2]) and not same(spy.weights[3], spy.weights[4])
    assert set(spy.adam_steps[4]) == {3.0}
    records = {r["step"]: r for r in lines(tmp_path) if "eval/loss" not in r}
    assert records[3]["skipped"] is True and records[3]["bad_steps"] == 1 and "loss" not in records[3]
    assert "bad_steps" not in records[2] and records[4]["bad_steps"] == 1 and records[5]["bad_steps"] == 1
    assert all(torch.isfinite(torch.tensor(records[s]["loss"])) for s in (1, 2, 4, 5))
    assert f"step 3 skipped: non-finite {kind} (no optimizer update); its examples: " in caplog.text
    assert ", ".join(spy.origins[2]) in caplog.text and spy.origins[2][0]


def test_consecutive_bad_steps_stop_with_the_last_good_weights_saved(tmp_path, monkeypatch, capsys):
    spy = Spy(monkeypatch, nan_loss=[3, 4, 5, 6])
    with pytest.raises(TrainingError) as caught:
        loop.train(smoke(tmp_path, "train.max_steps=8"))
    message = str(caught.value)
    assert message.startswith("3 consecutive steps (up to step 5) had a non-finite loss")
    assert "train.max_bad_steps=3" in message and str(tmp_path / "checkpoints" / "step-5") in message
    assert len(spy.weights) == 5, "no step after the third bad one"
    saved = load_file(str(tmp_path / "checkpoints/step-5/trainable.safetensors"))
    assert same(saved, spy.weights[2]), "the checkpoint holds the weights after step 2, the last good one"
    assert json.loads((tmp_path / "checkpoints/step-5/state.json").read_text())["bad_steps"] == 3
    records = lines(tmp_path)
    assert [(r["step"], r.get("skipped", False), r.get("bad_steps", 0)) for r in records] == [
        (1, False, 0),
        (2, False, 0),
        (3, True, 1),
        (4, True, 2),
        (5, True, 3),
    ]
    assert not (tmp_path / ".lock").exists() and not (tmp_path / "final").exists()

    # the command line shows it as one line with exit status 2; train.max_bad_steps=1 stops at once
    from sparsealign.cli import main

    out = tmp_path / "cli"
    monkeypatch.undo()
    Spy(monkeypatch, nan_loss=[2])
    status = main(
        ["train", str(SMOKE), f"output_dir={out}", "train.max_steps=4", "train.max_bad_steps=1"]
        + ["train.progress=false", "train.save_every=0", "train.eval_every=0"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "error: 1 consecutive steps (up to step 2) had a non-finite loss" in err
    assert (out / "checkpoints/step-2/state.json").is_file()


def test_orpo_log_odds_near_probability_one_are_finite():
    for dtype in (torch.float32, torch.float64):
        a = torch.tensor([-1e-9, -1e-12, 0.0, -1e-3], dtype=dtype, requires_grad=True)
        odds = log_odds(a)
        assert torch.isfinite(odds).all()
        # p = 1 - 1e-3: log(p / (1 - p)) by hand
        p = torch.exp(torch.tensor(-1e-3, dtype=torch.float64))
        assert abs(float(odds.detach()[3]) - float(torch.log(p / (1 - p)))) < 1e-3
        # a = -1e-9 is capped at -eps in float32 (eps 1.2e-7: log-odds ~ 15.9) and kept in float64 (~ 20.7)
        capped = min(-1e-9, -torch.finfo(dtype).eps)
        assert float(odds.detach()[0]) == pytest.approx(capped - math.log(-math.expm1(capped)), rel=1e-5)
        assert float(odds.detach()[2]) == float(odds.detach()[1]) or dtype == torch.float64
        odds.sum().backward()
        assert torch.isfinite(a.grad).all()
    chosen = torch.tensor([[-1e-9, -1e-9], [-0.5, -0.7]], requires_grad=True)
    rejected = torch.tensor([[-2.0, -3.0], [-1e-9, -1e-9]], requires_grad=True)
    mask = torch.ones(2, 2)
    out = orpo_loss(chosen, rejected, mask, mask, lam=0.1)
    out.loss.backward()
    assert torch.isfinite(out.per_example).all() and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all()


def test_a_response_with_no_tokens_gives_a_finite_loss_not_nan():
    """An all-masked row (what a fully truncated response would be) averages to 0, never 0/0; the data
    pipeline drops such pairs as too_long before (tests/test_tokenize.py::test_no_room_for_response_is_too_long)."""
    logps = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    empty = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = orpo_loss(logps, logps.detach() - 1, empty, torch.ones(2, 2), lam=0.1)
    out.loss.backward()
    assert torch.isfinite(out.per_example).all() and torch.isfinite(logps.grad).all()
    assert logps.grad[1].abs().sum() == 0
