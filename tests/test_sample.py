"""``sparsealign sample`` (eval/sampling.py, eval/run_model.py): prompt sets, the run's own prompt formatting,
seeded reproducible sampling, greedy decoding, resume after an interruption, benchmark formats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsealign.api import load_config
from sparsealign.cli import main
from sparsealign.data.examples import PreferenceExample
from sparsealign.data.formats import load_examples
from sparsealign.data.sources import SourceData, register_source
from sparsealign.data.tokenize import tokenize_examples
from sparsealign.errors import DataError, ModelError
from sparsealign.eval.run_model import EvalModel, load_eval_model
from sparsealign.eval.samples import SAMPLE_FIELDS, read_rows
from sparsealign.eval.sampling import (
    SampleSettings,
    _prompts_for_model,
    alpacaeval_records,
    arenahard_records,
    encode_prompts,
    load_prompts,
    sample_to_file,
)
from sparsealign.models.generate import decode_continuation
from tiny_models import train_smoke

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-recipe run trained for two steps (full fine-tuning)."""
    return train_smoke(tmp_path_factory.mktemp("smoke-run"))


@pytest.fixture(scope="module")
def loaded(smoke_run: Path) -> EvalModel:
    return load_eval_model(str(smoke_run))


def _sample(loaded: EvalModel, out: Path, source: str = "smoke", **settings) -> list[dict]:
    items, _ = encode_prompts(load_prompts(source, loaded.tokenizer), loaded.tokenizer, loaded.data)
    sample_to_file(loaded, items, SampleSettings(**settings), out, source=source, progress=False)
    return read_rows(out)


def test_rows_columns_and_counts(loaded: EvalModel, smoke_run: Path, tmp_path: Path) -> None:
    rows = _sample(loaded, tmp_path / "s.jsonl", n=3, temperatures=(0.0, 0.5, 1.0), max_new_tokens=5)
    config = load_config(smoke_run / "config.yaml")
    _, held_out, _ = load_examples(config.data)
    assert len(rows) == len(held_out) * 3 * 3  # prompts x temperatures x N
    for row in rows:
        assert set(SAMPLE_FIELDS) | {"prompt_index"} <= set(row)
        assert row["model"] == smoke_run.name
        example = held_out[row["prompt_index"]]
        assert row["prompt"] == example.prompt and row["reference"] == example.chosen
    keys = {(r["prompt_index"], r["temperature"], r["sample_index"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["temperature"] for r in rows} == {0.0, 0.5, 1.0}
    greedy = [r["output"] for r in rows if r["temperature"] == 0.0 and r["prompt_index"] == 0]
    assert len(set(greedy)) == 1  # T=0: every sample is the greedy decode


def test_prompt_ids_are_the_training_pipelines(loaded: EvalModel, smoke_run: Path) -> None:
    config = load_config(smoke_run / "config.yaml")
    train_examples, held_out, _ = load_examples(config.data)
    pairs, _ = tokenize_examples(held_out, loaded.tokenizer, config.data)
    items, _ = encode_prompts(load_prompts("smoke", loaded.tokenizer), loaded.tokenizer, loaded.data)
    assert [item.prompt_ids for item in items] == [pair.prompt_ids for pair in pairs]
    items, _ = encode_prompts(
        load_prompts("smoke", loaded.tokenizer, split="train"), loaded.tokenizer, loaded.data
    )
    pairs, _ = tokenize_examples(train_examples, loaded.tokenizer, config.data)
    assert [item.prompt_ids for item in items] == [pair.prompt_ids for pair in pairs]


def test_conversations_use_the_chat_template_and_truncation_as_training(
    loaded: EvalModel, tmp_path: Path
) -> None:
    data_file = tmp_path / "chat.jsonl"
    user = {"role": "user", "content": "long question " * 20}
    rows = [
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    data = load_config("smoke", [f"data.chat_template={template}", "data.max_prompt_length=40"]).data
    items, dropped = encode_prompts(load_prompts(str(data_file), loaded.tokenizer), loaded.tokenizer, data)
    assert not dropped and items[1].reference == "hello"
    examples = [
        PreferenceExample(
            item.prompt, [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
        )
        for item in items
    ]
    pairs, _ = tokenize_examples(examples, loaded.tokenizer, data)
    assert [item.prompt_ids for item in items] == [pair.prompt_ids for pair in pairs]
    assert len(items[0].prompt_ids) == 40  # truncated as training truncates
    text = loaded.tokenizer.decode(items[1].prompt_ids, skip_special_tokens=True)
    assert text == "[user]hi[assistant]"


def test_same_seed_same_file_other_seed_differs(loaded: EvalModel, tmp_path: Path) -> None:
    a = _sample(loaded, tmp_path / "a.jsonl", n=2, temperatures=(1.0,), max_new_tokens=6, seed=3)
    b = _sample(loaded, tmp_path / "b.jsonl", n=2, temperatures=(1.0,), max_new_tokens=6, seed=3)
    c = _sample(loaded, tmp_path / "c.jsonl", n=2, temperatures=(1.0,), max_new_tokens=6, seed=4)
    assert a == b
    assert [r["output"] for r in a] != [r["output"] for r in c]


def test_greedy_equals_a_manual_argmax_decode(loaded: EvalModel, tmp_path: Path) -> None:
    rows = _sample(loaded, tmp_path / "g.jsonl", n=1, temperatures=(0.0,), max_new_tokens=7, batch_size=1)
    items, _ = encode_prompts(load_prompts("smoke", loaded.tokenizer), loaded.tokenizer, loaded.data)
    eos = loaded.tokenizer.eos_token_id
    for item, row in zip(items, rows, strict=True):
        ids = list(item.prompt_ids)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(7):
                logits = loaded.model(torch.tensor([ids + new])).logits[0, -1]
                new.append(int(logits.argmax()))
                if new[-1] == eos:
                    break
        assert row["output"] == decode_continuation(loaded.tokenizer, ids, new)


def test_resume_after_a_kill_equals_an_uninterrupted_run(loaded: EvalModel, tmp_path: Path) -> None:
    settings = {"n": 2, "temperatures": (0.0, 1.0), "max_new_tokens": 5, "seed": 7, "batch_size": 1}
    whole = tmp_path / "whole.jsonl"
    _sample(loaded, whole, **settings)
    text = whole.read_text()
    lines = text.splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed mid-line
    (tmp_path / "cut.sample.json").write_text((tmp_path / "whole.sample.json").read_text())
    items, _ = encode_prompts(load_prompts("smoke", loaded.tokenizer), loaded.tokenizer, loaded.data)
    written, kept = sample_to_file(
        loaded, items, SampleSettings(**settings), cut, source="smoke", progress=False
    )
    assert (written, kept) == (len(lines) - 3, 3)
    assert cut.read_text() == text
    assert sample_to_file(loaded, items, SampleSettings(**settings), cut, source="smoke", progress=False) == (
        0,
        len(lines),
    )
    with pytest.raises(DataError, match="other settings.*seed"):
        sample_to_file(
            loaded, items, SampleSettings(**{**settings, "seed": 8}), cut, source="smoke", progress=False
        )


def test_named_source_through_the_registry(loaded: EvalModel) -> None:
    @register_source("test-sample-prompts")
    def prompts(request):  # noqa: ANN001, ANN202
        example = PreferenceExample("p", " a", " b")
        return SourceData(train=[example], eval=[], eval_prompts=["first prompt", "second prompt"])

    items = load_prompts("test-sample-prompts", loaded.tokenizer, limit=1)
    assert [(i.prompt, i.reference, i.index) for i in items] == [("first prompt", None, 0)]
    items = load_prompts("test-sample-prompts", loaded.tokenizer, split="train", chat=True)
    assert items[0].prompt == [{"role": "user", "content": "p"}] and items[0].reference == " a"


def test_control_prefix_of_a_csft_run(loaded: EvalModel) -> None:
    from sparsealign.data.control import control_ids

    items, _ = encode_prompts(load_prompts("smoke", loaded.tokenizer), loaded.tokenizer, loaded.data)
    with pytest.raises(DataError, match="conditional SFT"):
        _prompts_for_model(items, loaded, "good")
    csft = load_config("smoke", ["method.name=csft"])
    fake = EvalModel(loaded.model, loaded.tokenizer, "csft", csft.data, csft)
    good = control_ids(loaded.tokenizer, csft.method.good_token)
    assert _prompts_for_model(items, fake, "good") == [list(i.prompt_ids) + good for i in items]


def test_benchmark_formats(loaded: EvalModel) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": "Q2"}],
            "output": "A2",
            "prompt_index": 1,
            "question_id": "q2",
        },
        {
            "prompt": [{"role": "user", "content": "Q1"}],
            "output": "A1",
            "prompt_index": 0,
            "question_id": "q1",
            "dataset": "d",
        },
    ]
    assert alpacaeval_records(rows, "m") == [
        {"instruction": "Q1", "output": "A1", "generator": "m", "dataset": "d"},
        {"instruction": "Q2", "output": "A2", "generator": "m"},
    ]
    records = arenahard_records(rows, "m", loaded.tokenizer)
    assert [r["question_id"] for r in records] == ["q1", "q2"]
    first = records[0]
    assert set(first) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"}
    assert first["model_id"] == "m" and first["choices"] == [{"index": 0, "turns": [{"content": "A1"}]}]
    assert first["conv_metadata"]["token_len"] == 2  # byte-level tokenizer: one id per byte
    with pytest.raises(DataError, match="one answer per prompt"):
        alpacaeval_records(rows + [dict(rows[0])], "m")


def test_cli_alpacaeval_and_arenahard_on_a_builtin(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps([{"instruction": "Say hi", "output": "hi", "dataset": "x"}, {"instruction": "Count"}])
    )
    out = tmp_path / "alpaca_out.json"
    args = [
        "sample",
        "tiny-random-llama",
        "--prompts",
        str(alpaca),
        "--temperatures",
        "0",
        "--max-new-tokens",
        "4",
    ]
    assert main([*args, "--out", str(out), "--format", "alpacaeval", "--name", "tiny"]) == 0
    records = json.loads(out.read_text())
    assert [set(r) for r in records] == [
        {"instruction", "output", "generator", "dataset"},
        {"instruction", "output", "generator"},
    ]
    assert [r["generator"] for r in records] == ["tiny", "tiny"]
    samples = read_rows(tmp_path / "alpaca_out.samples.jsonl")
    assert [r["reference"] for r in samples] == ["hi", None]
    assert [r["output"] for r in records] == [r["output"] for r in samples]
    arena = tmp_path / "question.jsonl"
    arena.write_text(
        json.dumps({"question_id": "abc", "category": "c", "turns": [{"content": "Why?"}]}) + "\n"
    )
    answers = tmp_path / "tiny.jsonl"
    args[3] = str(arena)
    assert main([*args, "--out", str(answers), "--format", "arenahard"]) == 0
    (answer,) = read_rows(answers)
    assert answer["question_id"] == "abc" and answer["model_id"] == "tiny-random-llama"


def test_errors_are_one_line(smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text((smoke_run / "config.yaml").read_text())
    with pytest.raises(ModelError, match="no final/"):
        load_eval_model(str(run))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"question": "no prompt column"}) + "\n")
    out = str(tmp_path / "o.jsonl")
    for model, prompts, needle in [
        ("no-such-model-anywhere", "smoke", "Cannot load 'no-such-model-anywhere'"),
        (str(run), "smoke", "has no final/"),
        ("tiny-random-llama", str(empty), "gave no prompts"),
        ("tiny-random-llama", "no-such-source", "is not a data file"),
    ]:
        assert main(["sample", model, "--prompts", prompts, "--out", out, "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.startswith("error:") and "\n" not in err
