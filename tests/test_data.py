"""Reading preference data: file formats, column mapping, skip reasons, hold-out, datasets, sources."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from sparsealign.config import Config, DataConfig
from sparsealign.data import files, sources
from sparsealign.data.examples import PreferenceExample
from sparsealign.data.files import read_dataset, read_file
from sparsealign.data.formats import (
    DataError,
    Skip,
    SkipReport,
    extract_prompt,
    load_examples,
    parse_row,
    parse_rows,
    split_holdout,
)

ROWS = [
    {"prompt": f"question {i}", "chosen": f" good answer {i}", "rejected": f" bad answer {i}"}
    for i in range(10)
]


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    """Write rows (dicts are dumped; strings are written as raw lines)."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(text)
    return path


def load(path: Path, **kwargs) -> tuple[list[PreferenceExample], list[PreferenceExample], SkipReport]:
    return load_examples(DataConfig(path=str(path), eval_fraction=kwargs.pop("eval_fraction", 0.0), **kwargs))


# --------------------------------------------------------------------------------------------------
# File formats


def test_jsonl_rows_carry_line_numbers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], "", ROWS[1]])
    stream = read_file(path)
    assert stream.unit == "line"
    assert [origin for origin, _ in stream] == ["train.jsonl:1", "train.jsonl:3"]
    train, evaluation, report = load(path)
    assert [e.prompt for e in train] == ["question 0", "question 1"]
    assert train[1].origin == "train.jsonl:3"
    assert evaluation == [] and report.total == 2 and report.skipped == 0


def test_json_list_and_single_key_object(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ROWS[:3]))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS[:2]}))
    (tmp_path / "c.json").write_text(json.dumps({"version": 2, "pairs": ROWS[:4]}))
    assert [e.chosen for e in load(tmp_path / "a.json")[0]] == [
        " good answer 0",
        " good answer 1",
        " good answer 2",
    ]
    assert len(load(tmp_path / "b.json")[0]) == 2
    assert [e.origin for e in load(tmp_path / "c.json")[0]] == [
        "c.json:1",
        "c.json:2",
        "c.json:3",
        "c.json:4",
    ]


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", ROWS[:3])
    assert [e.prompt for e in load(path)[0]] == ["question 0", "question 1", "question 2"]


def test_json_without_a_list_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="single list of rows"):
        load(tmp_path / "bad.json")


def test_parquet_standard_and_conversational(tmp_path: Path) -> None:
    pd.DataFrame(ROWS[:4]).to_parquet(tmp_path / "std.parquet")
    train = load(tmp_path / "std.parquet")[0]
    assert [e.rejected for e in train] == [f" bad answer {i}" for i in range(4)]
    assert train[3].origin == "std.parquet:4"

    conv = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(3)
    ]
    pd.DataFrame(conv).to_parquet(tmp_path / "conv.parquet")
    train = load(tmp_path / "conv.parquet")[0]
    assert train[2].prompt == [{"role": "user", "content": "q2"}]
    assert train[0].chosen == [{"role": "assistant", "content": "yes"}]


def test_csv_and_tsv(tmp_path: Path) -> None:
    frame = pd.DataFrame(ROWS[:3])
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    for name in ("d.csv", "d.tsv"):
        train = load(tmp_path / name)[0]
        assert [e.prompt for e in train] == ["question 0", "question 1", "question 2"]
        assert train[0].chosen == " good answer 0"


def test_csv_empty_cell_is_an_empty_string(tmp_path: Path) -> None:
    pd.DataFrame([ROWS[0], {**ROWS[1], "chosen": ""}]).to_csv(tmp_path / "d.csv", index=False)
    train, _, report = load(tmp_path / "d.csv")
    assert len(train) == 1
    assert report.counts == {"empty_response": 1}
    assert report.summary() == "skipped 1 of 2 rows: empty_response=1 (row 2)"


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl' not found.*\.jsonl, .*\.parquet"):
        read_file(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.txt' has an unsupported extension '\.txt'.*\.csv"):
        read_file(tmp_path / "data.txt")
    with pytest.raises(DataError, match="data.dataset"):
        read_file(tmp_path)


# --------------------------------------------------------------------------------------------------
# Columns and formats


def test_column_mapping(tmp_path: Path) -> None:
    rows = [{"question": "q", "good": " yes", "bad": " no", "id": 7}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    train = load(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})[0]
    assert (train[0].prompt, train[0].chosen, train[0].rejected) == ("q", " yes", " no")
    assert train[0].meta == {"id": 7}


def test_column_mapping_errors() -> None:
    with pytest.raises(DataError, match=r"did you mean \{prompt: question\}"):
        parse_rows([("x:1", ROWS[0])], {"question": "prompt"})
    with pytest.raises(DataError, match="Did you mean 'chosen'"):
        parse_rows([("x:1", ROWS[0])], {"chosn": "good"})


def test_missing_mapped_column_names_the_mapping() -> None:
    skip = parse_row({"prompt": "p", "good": "a", "rejected": "b"}, {"chosen": "better"})
    assert skip.reason == "missing_field"
    assert "mapped from column 'better'" in skip.detail and "good" in skip.detail


def test_implicit_prompt_strings_use_the_common_prefix() -> None:
    # the space at the split point goes to the responses (TRL's rule)
    assert extract_prompt("The movie was great", "The movie was bad") == ("The movie was", " great", " bad")
    assert extract_prompt("abcdef", "abcxyz") == ("abc", "def", "xyz")
    example = parse_row({"chosen": "I liked it", "rejected": "I hated it"}, origin="f.jsonl:1")
    assert (example.prompt, example.chosen, example.rejected) == ("I", " liked it", " hated it")
    assert example.origin == "f.jsonl:1"


def test_implicit_prompt_conversations_use_common_messages() -> None:
    user = {"role": "user", "content": "hi"}
    chosen = [user, {"role": "assistant", "content": "hello!"}]
    rejected = [user, {"role": "assistant", "content": "go away"}]
    example = parse_row({"chosen": chosen, "rejected": rejected})
    assert example.prompt == [user]
    assert example.chosen == [{"role": "assistant", "content": "hello!"}]
    assert example.rejected == [{"role": "assistant", "content": "go away"}]


def test_ultrafeedback_full_conversations_with_a_text_prompt() -> None:
    """UltraFeedback binarized rows: prompt as text, chosen/rejected as whole conversations."""
    user = {"role": "user", "content": "Name a colour."}
    row = {
        "prompt": "Name a colour.",
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
        "score_chosen": 8.0,
    }
    example = parse_row(row)
    assert example.prompt == [user]
    assert example.chosen == [{"role": "assistant", "content": "Blue."}]
    assert example.rejected == [{"role": "assistant", "content": "No."}]
    assert example.meta == {"score_chosen": 8.0}
    unrelated = {
        **row,
        "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}],
    }
    skip = parse_row(unrelated)
    assert isinstance(skip, Skip) and "do not start with the same" in skip.detail


def test_conversational_prompt_with_system_message() -> None:
    prompt = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    example = parse_row(
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    )
    assert example.prompt == prompt and example.chosen[0]["content"] == "a"


# --------------------------------------------------------------------------------------------------
# Skip reasons, summary, strict mode


def test_every_skip_reason_with_its_line(tmp_path: Path) -> None:
    lines = [
        ROWS[0],  # 1 ok
        '{"prompt": "p", "chosen": ',  # 2 malformed_json
        {"prompt": "p", "chosen": "a"},  # 3 missing_field
        {"prompt": "p", "chosen": 5, "rejected": "b"},  # 4 not_a_string
        {"prompt": "p", "chosen": "  ", "rejected": "b"},  # 5 empty_response
        {"prompt": "p", "chosen": "same", "rejected": "same"},  # 6 identical_responses
        {
            "prompt": [{"role": "user"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [],
        },  # 7
        {"prompt": "p", "chosen": "a", "rejected": ""},  # 8 empty_response
        "[1, 2]",  # 9 malformed_json (not an object)
        ROWS[1],  # 10 ok
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    train, _, report = load(path)
    assert len(train) == 2
    assert report.total == 10 and report.kept == 2
    assert dict(report.counts) == {
        "malformed_json": 2,
        "missing_field": 1,
        "not_a_string": 2,
        "empty_response": 2,
        "identical_responses": 1,
    }
    assert report.origins["not_a_string"] == ["bad.jsonl:4", "bad.jsonl:7"]
    assert report.summary() == (
        "skipped 8 of 10 rows: empty_response=2 (lines 5, 8), malformed_json=2 (lines 2, 9), "
        "not_a_string=2 (lines 4, 7), identical_responses=1 (line 6), missing_field=1 (line 3)"
    )


def test_skip_summary_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [ROWS[0], "not json"])
    with caplog.at_level(logging.INFO, logger="sparsealign.data"):
        load(path)
    assert "skipped 1 of 2 rows: malformed_json=1 (line 2)" in caplog.text


def test_skip_report_keeps_five_origins_and_merges() -> None:
    report = SkipReport(unit="row")
    for i in range(7):
        report.add("empty_response", f"a.csv:{i + 1}")
    report.total = 9
    assert report.origins["empty_response"] == [f"a.csv:{i}" for i in range(1, 6)]
    assert report.summary() == "skipped 7 of 9 rows: empty_response=7 (rows 1, 2, 3, 4, 5, ...)"
    other = SkipReport(total=3, unit="row")
    other.add("missing_field", "b.csv:2")
    merged = SkipReport(total=1, unit="row")
    merged.add("missing_field", "a.csv:1")
    merged.merge(other)
    assert merged.total == 4 and merged.counts["missing_field"] == 2
    assert merged.summary() == "skipped 2 of 4 rows: missing_field=2 (a.csv:1, b.csv:2)"


def test_strict_mode_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], ROWS[1], {"prompt": "p", "chosen": "x"}])
    with pytest.raises(DataError, match=r"train\.jsonl:3 \(line 3\): missing_field"):
        load(path, strict=True)


def test_strict_mode_malformed_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ["{oops", ROWS[0]])
    with pytest.raises(DataError, match=r"train\.jsonl:1 \(line 1\): malformed_json"):
        load(path, strict=True)


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "w.jsonl", [{"q": "a", "good": "b", "bad": "c"}] * 3)
    with pytest.raises(
        DataError, match=r"None of the 3 rows in w\.jsonl were usable.*missing_field=3 \(lines 1, 2, 3\)"
    ):
        load(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load(tmp_path / "empty.jsonl")


# --------------------------------------------------------------------------------------------------
# Hold-out and caps


def test_holdout_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(40)]
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    train1, eval1, _ = load(path, eval_fraction=0.25)
    train2, eval2, _ = load(path, eval_fraction=0.25)
    assert [e.prompt for e in eval1] == [e.prompt for e in eval2]
    assert [e.prompt for e in train1] == [e.prompt for e in train2]
    assert len(eval1) == 10 and len(train1) == 30
    assert not {e.prompt for e in eval1} & {e.prompt for e in train1}
    assert {e.prompt for e in eval1} | {e.prompt for e in train1} == {f"p{i}" for i in range(40)}
    assert [e.prompt for e in eval1] != [f"p{i}" for i in range(10)]  # shuffled, not the first rows


def test_holdout_small_and_zero() -> None:
    examples = [PreferenceExample(f"p{i}", "a", "b") for i in range(3)]
    train, evaluation = split_holdout(examples, 0.05)
    assert len(evaluation) == 1 and len(train) == 2
    assert split_holdout(examples[:1], 0.5) == (examples[:1], [])
    assert split_holdout(examples, 0.0) == (examples, [])
    with pytest.raises(DataError, match="eval_fraction"):
        split_holdout(examples, 1.0)


def test_max_examples_caps_training(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", ROWS)
    train, evaluation, _ = load(path, eval_fraction=0.2, max_examples=3)
    assert len(train) == 3 and len(evaluation) == 2


def test_load_examples_without_data() -> None:
    with pytest.raises(DataError, match="data.path, data.dataset or data.source"):
        load_examples(DataConfig())
    with pytest.raises(DataError, match="get_source"):
        load_examples(DataConfig(source="imdb"))


# --------------------------------------------------------------------------------------------------
# datasets


def test_saved_dataset_folder(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS[:6]).save_to_disk(str(tmp_path / "single"))
    train, evaluation, report = load_examples(DataConfig(dataset=str(tmp_path / "single"), eval_fraction=0.2))
    assert len(train) == 5 and len(evaluation) == 1 and report.total == 6
    assert train[0].origin.startswith("single/train:")
    with pytest.raises(DataError, match="single split"):
        load_examples(DataConfig(dataset=str(tmp_path / "single"), eval_split="test"))


def test_saved_dataset_dict_with_eval_split(tmp_path: Path) -> None:
    import datasets

    conv = [
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        }
    ]
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(conv * 2)}
    ).save_to_disk(str(folder))
    train, evaluation, report = load_examples(DataConfig(dataset=str(folder), eval_split="test"))
    assert [e.prompt for e in train] == ["question 0", "question 1", "question 2", "question 3"]
    assert evaluation[0].prompt == [{"role": "user", "content": "q"}]
    assert evaluation[1].origin == "dd/test:2"
    assert report.total == 6
    with pytest.raises(DataError, match="no split 'validation'.*train, test"):
        read_dataset(str(folder), "validation")


def test_unreachable_hub_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(dataset="org/prefs"))
    message = str(info.value)
    assert "could not be loaded" in message
    assert "appears unreachable" in message
    assert "data.dataset=PATH" in message and "save_to_disk" in message


def test_dataset_error_from_hub_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def bad_split(*args, **kwargs):
        raise ValueError("Unknown split \"dev\". Should be one of ['train'].")

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(DataError, match=r"'org/prefs' \(split 'dev'\) could not be loaded.*Unknown split"):
        files.read_dataset("org/prefs", "dev")


# --------------------------------------------------------------------------------------------------
# Sources


def test_source_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_REGISTRY", {})

    @sources.register_source("toy-pairs")
    def toy(request: sources.SourceRequest) -> sources.SourceData:
        n = request.context["n"]
        return sources.SourceData(
            train=[PreferenceExample(f"p{i}", "a", "b") for i in range(n)], eval=[], eval_prompts=["held"]
        )

    assert sources.get_source("toy-pairs") is toy
    config = Config(data=DataConfig(source="toy-pairs"))
    data = sources.load_source(config, {"n": 3})
    assert len(data.train) == 3 and data.eval_prompts == ["held"]
    with pytest.raises(
        DataError, match=r"Unknown data source 'toy-pair'\. Did you mean 'toy-pairs'\?.*toy-pairs"
    ):
        sources.get_source("toy-pair")
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("toy-pairs")(lambda request: None)
    assert "toy-pairs" in sources.available_sources()


def test_source_must_return_source_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_REGISTRY", {})
    sources.register_source("broken")(lambda request: [1, 2])
    with pytest.raises(DataError, match="expected SourceData"):
        sources.load_source(Config(data=DataConfig(source="broken")))
