"""The equality check of benchmarks/vs_trl.py: it passes equal probes and refuses any difference in token ids,
response positions, log-probs or loss (then the benchmark reports no speed). Skipped without TRL, a
benchmark-only dependency (``pip install -e '.[bench]'``)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_trl_check as check  # noqa: E402


def probe() -> dict:
    """One pair: prompt [256, 72, 105], chosen [33, 257], rejected [63, 257] (right-padded rows)."""
    return {
        "rows": [
            {"ids": [256, 72, 105, 33, 257], "response": [3, 4]},
            {"ids": [256, 72, 105, 63, 257], "response": [3, 4]},
        ],
        "policy_logps": [-11.0, -12.5],
        "reference_logps": [-11.25, -12.0],
        "loss": 0.6563501,  # -log sigmoid(0.1 * ((-11 + 11.25) - (-12.5 + 12))) = log(1 + e^-0.075)
    }


def test_equal_probes_pass():
    assert check.compare_probes(probe(), copy.deepcopy(probe())) == []
    check.require_equal(probe(), copy.deepcopy(probe()))


def test_non_padding_tokens_counts_both_rows():
    assert check.non_padding_tokens(probe()) == 10


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda p: p["rows"][1]["ids"].__setitem__(3, 64), "rows[1]: token ids differ"),
        (lambda p: p["rows"][0]["response"].insert(0, 2), "rows[0]: response positions differ"),
        (lambda p: p["rows"].pop(), "rows: 1 sequences vs 2"),
        (lambda p: p["policy_logps"].__setitem__(0, -11.0 * (1 + 1e-4)), "policy_logps[0]"),
        (lambda p: p["reference_logps"].__setitem__(1, float("nan")), "reference_logps[1]"),
        (lambda p: p.__setitem__("loss", 0.6563501 + 1e-4), "loss[0]"),
    ],
)
def test_any_difference_is_refused(change, expected):
    other = probe()
    change(other)
    problems = check.compare_probes(other, probe())
    assert len(problems) == 1 and problems[0].startswith(expected)
    with pytest.raises(check.ProbeMismatch, match="no speed is reported"):
        check.require_equal(other, probe(), ("trl", "sparsealign"))


def test_float32_rounding_of_a_long_sum_is_tolerated():
    # about 100 float32 log-probs of size 5: a sum near -500 differs by a few 1e-5 between correct codes
    other = probe()
    other["policy_logps"] = [-500.0 + 4e-3, -12.5]
    base = probe()
    base["policy_logps"] = [-500.0, -12.5]
    assert check.compare_probes(other, base) == []  # 4e-3 <= 1e-5 + 1e-5 * 500 = 5.01e-3
    other["policy_logps"][0] = -500.0 + 6e-3
    assert len(check.compare_probes(other, base)) == 1


@pytest.mark.slow
def test_both_tools_probe_the_same_numbers_on_the_tiny_llama(tmp_path, monkeypatch):
    """The real probes of the two tools (tiny random Llama, 2 pairs) agree; a changed token is refused."""
    import vs_trl
    import vs_trl_tools
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from sparsealign.recipes.load import load_config
    from sparsealign.train.loop import build

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    folder = vs_trl.trl_model_folder("tiny-random-llama", 42)
    data = tmp_path / "pairs.jsonl"
    rows = vs_trl.build_pairs(AutoTokenizer.from_pretrained(folder), pairs=2, length=64)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "model": "tiny-random-llama",
        "model_folder": folder,
        "data": str(data),
        "reference": "live",
        "device": "cpu",
        "precision": "fp32",
        "pairs": 2,
        "max_length": 64,
        "seed": 42,
        "warmup": 1,
        "steps": 1,
        "workdir": str(tmp_path),
    }
    ours = vs_trl_tools.probe_sparsealign(build(load_config(None, vs_trl_tools.sparsealign_overrides(spec))))

    from datasets import load_dataset

    trainer = DPOTrainer(
        model=folder,
        args=vs_trl_tools.trl_config(spec),
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(folder),
    )
    theirs = vs_trl_tools.probe_trl(trainer)
    assert check.non_padding_tokens(ours) > 4 * 32  # two pairs of prompt + responses, real text
    check.require_equal(theirs, ours)
    theirs["rows"][0]["ids"][1] += 1
    with pytest.raises(check.ProbeMismatch):
        check.require_equal(theirs, ours)


def test_loss_gap_compares_the_steps_both_tools_logged():
    ours = {"1": 0.6931472, "2": 0.6931001, "3": 0.6930500}
    theirs = {"1": 0.6931472, "2": 0.6931003}  # TRL's last line comes after its last step: not recorded
    steps, gap = check.loss_gap(ours, theirs)
    assert steps == 2 and gap == pytest.approx(2e-7, abs=1e-12)


def test_mfu_counts_six_flops_per_parameter_and_two_more_for_a_live_reference():
    import vs_trl

    out = {"settings": {r: {t: {"tokens_per_s": 1000.0} for t in vs_trl.TOOLS} for r in vs_trl.REFERENCES}}
    vs_trl.add_mfu(out, parameters=10**9, peak_tflops=989.0)
    # live: (6 + 2) x 1e9 x 1000 / 989e12; precomputed: 6 x 1e9 x 1000 / 989e12
    assert out["settings"]["live"]["sparsealign"]["mfu"] == pytest.approx(8e12 / 989e12)
    assert out["settings"]["precomputed"]["trl"]["mfu"] == pytest.approx(6e12 / 989e12)
    assert out["parameters"] == 10**9


def test_the_1b_model_is_refused_on_cpu_and_left_out_by_default():
    import vs_trl

    assert "llama-1b-random" not in vs_trl.parse_args([]).models
    with pytest.raises(SystemExit):
        vs_trl.parse_args(["--models", "llama-1b-random"])
