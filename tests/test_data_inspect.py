"""``sparsealign data``: the inspector reads and tokenises as training does, and reports it exactly."""

from __future__ import annotations

import json
from pathlib import Path

from sparsealign.cli import main
from sparsealign.data.inspect import percentiles
from sparsealign.data.tokenize import tokenize_pair
from sparsealign.models.builtins import tiny_llama_tokenizer
from sparsealign.recipes.load import load_config

EXAMPLE_KEYS = {
    "prompt_text",
    "chosen_text",
    "rejected_text",
    "prompt_tokens",
    "chosen_tokens",
    "rejected_tokens",
}


def _json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_percentiles_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentiles(values) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([3, 1, 2]) == {"p50": 2, "p90": 3, "p99": 3, "max": 3}
    assert percentiles([]) == {}


def test_smoke_json_objects_match_the_training_tokenisation(capsys) -> None:
    assert main(["data", "smoke", "--show", "3", "--json"]) == 0
    lines = _json_lines(capsys)
    examples, summary = lines[:-1], lines[-1]
    assert len(examples) == 3
    assert all(EXAMPLE_KEYS | {"source"} <= set(e) for e in examples)
    assert summary["examples"] == 46 and summary["rows"] == 48  # 2 of 48 are held out for eval
    assert summary["dropped"] == {} and summary["boundary_fallbacks"] == 0
    config = load_config("smoke")
    tokenizer = tiny_llama_tokenizer()
    first = examples[0]
    from sparsealign.data.examples import PreferenceExample

    pair = tokenize_pair(
        PreferenceExample(first["prompt_text"], first["chosen_text"], first["rejected_text"]),
        tokenizer,
        config.data,
    )
    assert (first["prompt_tokens"], first["chosen_tokens"], first["rejected_tokens"]) == (
        len(pair.prompt_ids),
        len(pair.chosen_ids),
        len(pair.rejected_ids),
    )
    # the tiny Llama's tokenizer is byte-level with <s> in front and </s> after each response
    assert first["prompt_tokens"] == len(first["prompt_text"].encode()) + 1
    assert first["chosen_tokens"] == len(first["chosen_text"].encode()) + 1


def test_drops_are_counted_per_reason_with_their_first_lines(tmp_path: Path, capsys) -> None:
    rows = [
        json.dumps({"prompt": "a", "chosen": " good", "rejected": " bad"}),
        "{not json",
        json.dumps({"prompt": "b", "chosen": " ", "rejected": " bad"}),
        json.dumps({"prompt": "c", "chosen": " same", "rejected": " same"}),
        json.dumps({"prompt": "x" * 300, "chosen": " fine", "rejected": " bad"}),
        json.dumps({"prompt": "d", "chosen": " yes", "rejected": " no"}),
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    args = [f"data.path={data}", "data.eval_fraction=0", "data.max_length=64", "data.max_prompt_length=8"]
    assert main(["data", "smoke", *args, "--json", "--show", "0"]) == 0
    (summary,) = _json_lines(capsys)
    assert summary["rows"] == 6 and summary["examples"] == 3  # the long prompt is truncated, not dropped
    assert summary["dropped"] == {"malformed_json": 1, "empty_response": 1, "identical_responses": 1}
    assert summary["first_dropped"]["malformed_json"] == ["pairs.jsonl:2"]
    assert summary["first_dropped"]["empty_response"] == ["pairs.jsonl:3"]
    assert summary["lengths"]["prompt"]["max"] == 8


def test_text_report_marks_the_boundary(capsys) -> None:
    assert main(["data", "smoke", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "boundary fallbacks: 0" in out and "p50" in out
    assert out.count("⟦▶⟧") == 2  # one chosen and one rejected line
