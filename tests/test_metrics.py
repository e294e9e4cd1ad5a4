"""The metrics of ``sparsealign evaluate`` against hand-derived values and identities."""

from __future__ import annotations

import math

import pytest
import torch

from sparsealign.errors import ConfigError
from sparsealign.eval.metrics import MetricContext, MetricUnavailable, get_metrics
from sparsealign.eval.metrics.diversity import distinct, distinct_n, self_bleu, self_bleu_of
from sparsealign.eval.metrics.edna import NO_NLI, edna, edna_rows, edna_score, entailment_label
from sparsealign.eval.metrics.entropy import token_entropies
from sparsealign.eval.metrics.kl import teacher_forced_kl
from sparsealign.eval.metrics.text import bertscore, rouge, rouge_scores
from tiny_models import tiny_llama

# -------------------------------------------------------------------------------------------------- text


def test_rouge_matches_a_hand_count():
    # output: the the cat sat on mat; reference: the the cat lay on mat
    # unigrams 5/6 matched each way; bigrams {the cat, on the, the mat} = 3 of 5; LCS "the cat on the mat" = 5
    scores = rouge_scores(["The cat sat on the mat."], ["the cat lay on the mat"])
    assert scores["rouge1"] == [pytest.approx(5 / 6)]
    assert scores["rouge2"] == [pytest.approx(3 / 5)]
    assert scores["rougeL"] == [pytest.approx(5 / 6)]


def test_rouge_stems_and_skips_rows_without_reference():
    rows = [
        {"output": "cats running", "reference": "cat run"},  # Porter stemming: identical
        {"output": "anything", "reference": None},
        {"output": "a b", "reference": "c d"},
    ]
    values = rouge(rows, MetricContext())
    assert values["rouge1"] == [pytest.approx(1.0), None, 0.0]
    with pytest.raises(MetricUnavailable, match="reference"):
        rouge([{"output": "x", "reference": None}], MetricContext())


def test_bertscore_unavailable_offline_names_what_to_download(monkeypatch, tmp_path):
    from huggingface_hub import try_to_load_from_cache

    rows = [{"output": "a", "reference": "b"}]
    with pytest.raises(MetricUnavailable, match="no such folder"):
        bertscore(rows, MetricContext(bertscore_model=str(tmp_path / "missing")))
    if isinstance(try_to_load_from_cache("roberta-large", "config.json"), str):
        pytest.skip("roberta-large is in the Hugging Face cache here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetricUnavailable, match=r"huggingface-cli download roberta-large.*--bertscore-model"):
        bertscore(rows, MetricContext())


def test_bertscore_of_identical_texts_is_one(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="<pad>")
    tokenizer.model_max_length = 64
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = [
        {"output": "the movie was good", "reference": "the movie was good"},
        {"output": "hello world", "reference": "a boring film"},
    ]
    values = bertscore(rows, MetricContext(bertscore_model=str(tmp_path / "bert")))
    assert values["bertscore_f1"][0] == pytest.approx(1.0, abs=1e-5)
    assert values["bertscore_f1"][1] < 0.999


# -------------------------------------------------------------------------------------------------- diversity


def test_distinct_n_exact():
    texts = ["a b a", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # a b a a b c
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab ba ab bc
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert math.isnan(distinct_n(["a"], 2))
    values = distinct([{"output": t} for t in texts], MetricContext())
    assert values == {"distinct_1": 0.5, "distinct_2": 0.75, "distinct_3": 1.0}


def test_self_bleu_identity_and_disjoint_samples():
    same = "the movie was a wonderful film with a great plot"
    assert self_bleu_of([same, same, same]) == [pytest.approx(100.0)] * 3
    disjoint = self_bleu_of(["alpha beta gamma delta", "one two three four", "red green blue black"])
    assert all(score < 1e-6 for score in disjoint)
    rows = [
        {"prompt": "p", "temperature": 1.0, "output": same},
        {"prompt": "p", "temperature": 1.0, "output": same},
        {"prompt": "p", "temperature": 0.5, "output": "alone at this temperature"},
        {"prompt": "q", "temperature": 1.0, "output": "one two three four"},
        {"prompt": "q", "temperature": 1.0, "output": "five six seven eight"},
    ]
    values = self_bleu(rows, MetricContext())["self_bleu"]
    assert values[:2] == [pytest.approx(100.0)] * 2 and values[2] is None and values[3] < 1e-6


# -------------------------------------------------------------------------------------------------- KL, entropy


PROMPTS = [[1, 5, 9, 11], [1, 7]]
OUTPUTS = [[20, 21, 22], [30, 31, 32, 33, 34]]


def _direct_logps(model, prompt, output):
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(output) - 1].float()
    return torch.log_softmax(logits, -1)


def test_kl_of_a_model_to_itself_is_zero():
    model = tiny_llama(0)
    values = teacher_forced_kl(model, model, PROMPTS, OUTPUTS, pad_id=2)
    for name in ("kl_seq", "kl_per_token", "kl_exact_seq", "kl_exact_per_token"):
        assert values[name] == [pytest.approx(0.0, abs=1e-6)] * 2


def test_kl_to_another_model_equals_a_direct_computation():
    policy, reference = tiny_llama(0), tiny_llama(1)
    values = teacher_forced_kl(policy, reference, [*PROMPTS, [1, 3]], [*OUTPUTS, []], pad_id=2, batch_size=2)
    for i, (prompt, output) in enumerate(zip(PROMPTS, OUTPUTS, strict=True)):
        pi, ref = _direct_logps(policy, prompt, output), _direct_logps(reference, prompt, output)
        target = torch.tensor(output)
        seq = float((pi[range(len(output)), target] - ref[range(len(output)), target]).sum())
        exact = float((pi.exp() * (pi - ref)).sum())
        assert values["kl_seq"][i] == pytest.approx(seq, abs=1e-4)
        assert values["kl_per_token"][i] == pytest.approx(seq / len(output), abs=1e-4)
        assert values["kl_exact_seq"][i] == pytest.approx(exact, abs=1e-4)
        assert values["kl_exact_per_token"][i] == pytest.approx(exact / len(output), abs=1e-4)
        assert values["kl_exact_seq"][i] > 0
    assert values["kl_seq"][2] is None  # an empty output has no per-token KL


def test_entropy_equals_a_direct_softmax_computation():
    model = tiny_llama(3)
    values = token_entropies(model, [*PROMPTS, [1, 3]], [*OUTPUTS, []], pad_id=2, batch_size=2)
    for i, (prompt, output) in enumerate(zip(PROMPTS, OUTPUTS, strict=True)):
        logp = _direct_logps(model, prompt, output)
        expected = float(-(logp.exp() * logp).sum(-1).mean())
        assert values[i] == pytest.approx(expected, abs=1e-5)
    assert values[2] is None
    assert 0 < values[0] <= math.log(128) + 1e-6


# -------------------------------------------------------------------------------------------------- EDNA


def test_edna_formula_on_stubbed_entailment():
    table = {
        ("src", "a"): 0.9,
        ("src", "b"): 0.5,
        ("a", "b"): 0.2,
        ("b", "a"): 0.4,
    }

    def entail(premises, hypotheses):
        return [table[(p, h)] for p, h in zip(premises, hypotheses, strict=True)]

    rows = [
        {"prompt": "src", "output": "a", "temperature": 1.0},
        {"prompt": "src", "output": "b", "temperature": 1.0},
        {"prompt": "src", "output": "a", "temperature": 0.0},  # alone: skipped
    ]
    values = edna_rows(rows, entail)
    f, d = (0.9 + 0.5) / 2, 1 - (0.2 + 0.4) / 2
    assert values["faithfulness"][:2] == [pytest.approx(f)] * 2
    assert values["diversity"][0] == pytest.approx(d)
    assert values["edna"][0] == pytest.approx(2 * f * d / (f + d)) == pytest.approx(0.7)
    assert values["edna"][2] is None
    assert edna_score(0.0, 0.0) == 0.0


def test_edna_without_nli_is_unavailable_and_labels_are_found():
    with pytest.raises(MetricUnavailable) as caught:
        edna([{"prompt": "p", "output": "o"}], MetricContext())
    assert str(caught.value) == NO_NLI and "--nli" in NO_NLI

    class Config:
        id2label = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}

    assert entailment_label(Config) == 2
    Config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    with pytest.raises(MetricUnavailable, match="entailment"):
        entailment_label(Config)


def test_metric_names():
    assert [s.name for s in get_metrics("rouge, distinct,rouge")] == ["rouge", "distinct"]
    with pytest.raises(ConfigError, match="unknown metric.*choose from"):
        get_metrics("rouge,bleurt")


def test_teacher_forced_metrics_refuse_rows_of_several_models():
    from sparsealign.eval.metrics.kl import text_rows

    rows = [{"prompt": "p", "output": "o", "model": "a"}, {"prompt": "p", "output": "o", "model": "b"}]
    with pytest.raises(MetricUnavailable, match="2 models"):
        text_rows(rows)
    assert text_rows(rows[:1] + [{"prompt": None, "output": "x", "model": "b"}]) == [0]


def test_rows_with_token_ids_are_scored_on_those_ids_not_their_text():
    """`sparsealign sample` writes the exact prompt_ids/output_ids; teacher forcing uses them even when the
    text would tokenise otherwise (a chat-formatted prompt stored as messages, a lossy decode)."""
    from sparsealign.eval.metrics.models import encode_rows
    from sparsealign.models.builtins import tiny_llama_tokenizer

    tokenizer = tiny_llama_tokenizer()
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "output": "?",
            "prompt_ids": PROMPTS[0],
            "output_ids": OUTPUTS[0],
        },
        {"prompt": "ab", "output": "c"},
    ]
    prompt_ids, output_ids = encode_rows(tokenizer, rows)
    assert (prompt_ids[0], output_ids[0]) == (PROMPTS[0], OUTPUTS[0])
    assert (prompt_ids[1], output_ids[1]) == ([256, *b"ab"], [*b"c"])  # text: <s> + bytes, no EOS appended
