"""``sparsealign score`` and ``sparsealign evaluate``: the reward column, summaries, the implicit-reward
accuracy of a smoke run, and both commands end to end through ``sparsealign.cli.main``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsealign.cli import main
from sparsealign.eval.metrics import MetricContext
from sparsealign.eval.samples import read_rows, write_rows
from sparsealign.eval.score import add_rewards, column_stats, groups, score_samples

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"prompt": "I liked", "output": " the movie", "reference": "the film", "temperature": 0.0, "model": "m"},
    {"prompt": "I liked", "output": " the plot", "reference": "the film", "temperature": 1.0, "model": "m"},
    {"prompt": "the film", "output": " was bad", "reference": None, "temperature": 0.0, "model": "m"},
    {"prompt": "the film", "output": " was good", "reference": "was fun", "temperature": 1.0, "model": "m"},
]


class LengthReward:
    """A stub reward: the text's length in characters."""

    name = "length"

    def score(self, texts):
        return [float(len(t)) for t in texts]


def test_column_stats_and_groups():
    stats = column_stats([1.0, 2.0, None, 3.0])
    assert stats == {"mean": 2.0, "std": 1.0, "sem": pytest.approx(1 / math.sqrt(3)), "n": 3}
    assert column_stats([None])["n"] == 0
    labels = [label for label, _ in groups(ROWS)]
    assert labels == [{}, {"temperature": 0.0}, {"temperature": 1.0}]  # model does not vary
    assert [index for _, index in groups(ROWS)] == [[0, 1, 2, 3], [0, 2], [1, 3]]


def test_reward_text_modes():
    rows = [dict(r) for r in ROWS] + [{"prompt": [{"role": "user", "content": "x"}], "output": "y"}]
    assert add_rewards(rows, LengthReward(), "prompt+output") == 1
    assert rows[0]["reward"] == len("I liked the movie") and rows[-1]["reward"] is None
    assert add_rewards(rows, LengthReward(), "output") == 0
    assert rows[0]["reward"] == len(" the movie") and rows[-1]["reward"] == 1.0


def test_score_writes_in_place_atomically_and_summarises(tmp_path, capsys):
    path = write_rows(tmp_path / "samples.jsonl", ROWS)
    summary = score_samples(path, LengthReward())
    rows = read_rows(path)
    assert [r["reward"] for r in rows] == [17.0, 16.0, 16.0, 17.0]
    assert {k: r[k] for r in rows for k in ROWS[0]} == {k: ROWS[-1][k] for k in ROWS[0]}  # columns kept
    on_disk = json.loads((tmp_path / "samples.score.json").read_text())
    assert on_disk == summary and summary["grouped_by"] == ["temperature"]
    all_rows, t0, t1 = (g["values"]["reward"] for g in summary["groups"])
    assert all_rows["mean"] == 16.5 and all_rows["n"] == 4
    assert t0["mean"] == 16.5 and t0["std"] == pytest.approx(math.sqrt(0.5))
    assert t0["sem"] == pytest.approx(0.5)
    table = capsys.readouterr().out
    assert "temperature=0.0" in table and "16.5 ± 0.5" in table
    assert not list(tmp_path.glob("*.tmp*"))


def _tiny_sentiment():
    from sparsealign.rewards.sentiment import SENTIMENT_PARAMS, SentimentReward, fit_pipeline

    params = {**SENTIMENT_PARAMS, "min_df": 1, "max_df": 1.0}
    texts = ["good great fun", "great good", "bad boring awful", "awful bad"] * 3
    vectorizer, classifier = fit_pipeline(texts, [1, 1, 0, 0] * 3, params)
    return SentimentReward.from_fitted(vectorizer, classifier, params, "tiny", 1.0)


def test_score_cli_with_imdb_sentiment_scores_prompt_plus_output(tmp_path, monkeypatch):
    import sparsealign.rewards.sentiment as sentiment

    reward = _tiny_sentiment()
    monkeypatch.setattr(sentiment, "load_sentiment", lambda *a, **k: reward)
    path = write_rows(
        tmp_path / "s.jsonl",
        [{"prompt": "a great", "output": " fun film"}, {"prompt": "bad", "output": " awful"}],
    )
    assert main(["score", str(path), "--reward", "imdb-sentiment", "--out", str(tmp_path / "o.jsonl")]) == 0
    rows = read_rows(tmp_path / "o.jsonl")
    expected = reward.score(["a great fun film", "bad awful"])
    assert [r["reward"] for r in rows] == pytest.approx(expected)
    assert expected[0] > 0 > expected[1]
    assert "reward" not in read_rows(path)[0]  # --out leaves the input alone
    summary = json.loads((tmp_path / "s.score.json").read_text())
    assert summary["reward"] == "imdb-sentiment" and summary["text"] == "prompt+output"


def test_score_cli_with_a_sequence_classifier_folder(tmp_path, tiny_tokenizer):
    from tiny_models import save_tiny_classifier

    classifier = save_tiny_classifier(tmp_path / "clf", tiny_tokenizer)
    path = write_rows(tmp_path / "s.jsonl", ROWS[:2])
    code = main(["score", str(path), "--reward", str(tmp_path / "clf"), "--text", "output"])
    assert code == 0
    with torch.no_grad():
        logits = classifier(**tiny_tokenizer([" the movie"], return_tensors="pt")).logits[0]
    assert read_rows(path)[0]["reward"] == pytest.approx(float(logits[1] - logits[0]), abs=1e-4)


def test_score_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["score", str(tmp_path / "none.jsonl"), "--reward", "imdb-sentiment"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"output": "x"}\nnot json\n')
    assert main(["score", str(tmp_path / "bad.jsonl"), "--reward", str(tmp_path / "no-classifier")]) == 2
    err = capsys.readouterr().err
    assert "no such sample file" in err and err.count("error:") == 2


# -------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_cli_text_metrics_and_unavailable_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_rows(tmp_path / "s.jsonl", ROWS)
    code = main(
        [
            "evaluate",
            str(path),
            "--metrics",
            "rouge,bertscore,self-bleu,distinct,edna",
            "--bertscore-model",
            str(tmp_path / "missing-model"),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "s.evaluate.json").read_text())
    status = summary["metrics"]
    assert status["rouge"] == status["distinct"] == {"available": True}
    assert not status["bertscore"]["available"] and "--bertscore-model" in status["bertscore"]["reason"]
    assert not status["edna"]["available"] and "--nli" in status["edna"]["reason"]
    assert not status["self-bleu"]["available"]  # one sample per prompt and temperature
    everything = summary["groups"][0]["values"]
    assert everything["rouge1"]["n"] == 3  # one row has no reference
    assert everything["distinct_1"] == pytest.approx(6 / 8)  # the movie the plot was bad was good
    assert everything["distinct_3"] is None  # two-word outputs have no trigram
    out = capsys.readouterr().out
    assert "edna: unavailable: EDNA needs an NLI model" in out and "rouge1" in out


def test_evaluate_cli_needs_its_models(tmp_path, capsys):
    path = write_rows(tmp_path / "s.jsonl", ROWS)
    assert main(["evaluate", str(path), "--metrics", "kl", "--model", "tiny-random-llama"]) == 2
    assert main(["evaluate", str(path), "--metrics", "reward-accuracy", "--model", "tiny-random-llama"]) == 2
    err = capsys.readouterr().err
    assert "kl needs --reference" in err and "reward-accuracy needs --model RUN" in err


def test_evaluate_cli_kl_and_entropy_of_a_model_against_itself(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", ROWS)
    args = ["evaluate", str(path), "--metrics", "kl,entropy", "--model", "tiny-random-llama"]
    assert main([*args, "--reference", "tiny-random-llama"]) == 0  # both built from seed 0: one model
    values = json.loads((tmp_path / "s.evaluate.json").read_text())["groups"][0]["values"]
    assert values["kl_seq"]["mean"] == pytest.approx(0.0, abs=1e-6) and values["kl_seq"]["n"] == 4
    assert values["kl_exact_per_token"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < values["entropy"]["mean"] <= math.log(258) + 1e-6


# -------------------------------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from tiny_models import train_smoke

    return train_smoke(tmp_path_factory.mktemp("run"), "data.eval_fraction=0.2", "eval.generate=false")


def test_implicit_reward_accuracy_of_a_smoke_run_equals_a_direct_computation(smoke_run):
    from transformers import AutoModelForCausalLM

    from sparsealign.data.prepare import prepare_data
    from sparsealign.eval.metrics.implicit_reward import reward_accuracy
    from sparsealign.eval.metrics.models import load_run_reference
    from sparsealign.eval.report import sequence_logps
    from sparsealign.eval.run_model import load_eval_model, load_run_config
    from sparsealign.models.loading import ModelBundle, load_model

    cfg = load_run_config(smoke_run)
    ctx = MetricContext(
        policy=lambda: load_eval_model(str(smoke_run), "cpu"),
        run_config=lambda: cfg,
        run_reference=lambda: load_run_reference(cfg, "cpu"),
    )
    result = reward_accuracy(ctx)

    policy = AutoModelForCausalLM.from_pretrained(smoke_run / "final").eval()
    reference, tokenizer = load_model(cfg.model, cfg.train.seed, "cpu")  # the untrained start, as in training
    pairs = prepare_data(cfg, ModelBundle(reference, tokenizer)).eval
    assert len(pairs) == result["num_pairs"] > 1
    prompts = [p.prompt_ids for p in pairs]

    def ratio(responses):
        pi = sequence_logps(policy, prompts, responses, tokenizer.pad_token_id)
        ref = sequence_logps(reference, prompts, responses, tokenizer.pad_token_id)
        return [a - b for a, b in zip(pi, ref, strict=True)]

    chosen, rejected = ratio([p.chosen_ids for p in pairs]), ratio([p.rejected_ids for p in pairs])
    margins = [cfg.method.beta * (c - r) for c, r in zip(chosen, rejected, strict=True)]
    assert result["beta"] == cfg.method.beta == 0.1
    assert result["reward_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert result["reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert any(m != 0 for m in margins)


def test_evaluate_cli_on_a_run(smoke_run, tmp_path):
    pairs = [json.loads(line) for line in (ROOT / "configs/smoke_pairs.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    path = write_rows(tmp_path / "s.jsonl", ROWS)
    args = ["evaluate", str(path), "--metrics", "kl,reward-accuracy", "--model", str(smoke_run)]
    assert main([*args, "--data", str(tmp_path / "pairs.jsonl")]) == 0
    summary = json.loads((tmp_path / "s.evaluate.json").read_text())
    values = summary["groups"][0]["values"]
    assert values["num_pairs"] == 3 and 0 <= values["reward_accuracy"] <= 1
    assert values["kl_exact_seq"]["mean"] > 0  # trained two steps away from its reference
    assert "the run's reference" in summary["config"]["reference"]
