"""The public-dataset sources (sparsealign.data.public) on fixtures written in each dataset's published schema.

Where each fixture's schema comes from is listed in tests/fixtures/public/README.md (and in each source
module's docstring); the expected strings below are derived by hand from the fixture rows.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest

from sparsealign.config import ConfigError
from sparsealign.data.public import hh as hh_module
from sparsealign.data.public.mix import count_overlaps, weighted
from sparsealign.data.public.prompts import load_prompts
from sparsealign.data.public.shp import score_ratio
from sparsealign.data.sources import available_sources, load_source
from sparsealign.errors import DataError
from sparsealign.recipes.load import load_config

FIXTURES = Path(__file__).parent / "fixtures" / "public"

PATHS = {
    "hh": "hh",
    "hh-helpful": "hh",
    "hh-harmless": "hh",
    "shp": "shp",
    "oasst": "oasst/train.jsonl",
    "ultrafeedback": "ultrafeedback",
    "ultrachat": "ultrachat",
    "tldr": "tldr",
    "tldr-sft": "tldr_sft",
    "imdb-hub": "imdb_hub",
    "mbpp": "mbpp/train.jsonl",
}
U = "user"
A = "assistant"


def _config(name: str, path: Path | str, *more: str):
    return load_config("smoke", [f"data.source={name}", f"data.path={path}", *more])


def _load(name: str, *more: str):
    return load_source(_config(name, FIXTURES / PATHS[name], *more))


def _all(data) -> list:
    return sorted([*data.train, *data.eval], key=lambda ex: ex.origin)


def _by_origin(data, origin: str):
    (found,) = [ex for ex in (*data.train, *data.eval) if ex.origin == origin]
    return found


def test_every_public_source_is_registered():
    for name in (*PATHS, "alpacaeval", "arenahard", "mix"):
        assert name in available_sources()


# ------------------------------------------------------------------------------------------------------------
# Each fixture parses to hand-checked examples


def test_hh_splits_at_the_last_assistant_turn_and_drops_prompt_mismatches():
    data = _load("hh-helpful")
    assert len(data.train) == 3 and len(data.eval) == 1  # helpful-base train (4 rows, 1 mismatch) / test
    ex = _by_origin(data, "helpful-base/train.jsonl:2")
    assert ex.prompt == (
        "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\nHuman: For how long?"
        "\n\nAssistant:"
    )
    assert ex.chosen == " About nine minutes for a hard egg."
    assert ex.rejected == " Forever."
    assert ex.meta["source"] == "hh-helpful"
    # row 3: "Hi" vs "Hey" differ before the last assistant turn
    assert all(ex.origin != "helpful-base/train.jsonl:3" for ex in _all(data))
    both = _load("hh")
    assert len(both.train) == 5 and len(both.eval) == 2  # harmless-base + helpful-base
    harmless = _load("hh-harmless")
    assert {ex.origin.split("/")[0] for ex in _all(harmless)} == {"harmless-base"}


def test_hh_reads_the_published_gzipped_files(tmp_path):
    folder = tmp_path / "helpful-base"
    folder.mkdir()
    for split in ("train", "test"):
        raw = (FIXTURES / "hh" / "helpful-base" / f"{split}.jsonl").read_bytes()
        (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress(raw))
    data = load_source(_config("hh-helpful", tmp_path))
    assert [ex.chosen for ex in data.eval] == [" Four."]
    assert _by_origin(data, "helpful-base/train.jsonl.gz:1").prompt == (
        "\n\nHuman: What is a good name for a cat?\n\nAssistant:"
    )


def test_hh_split_puts_the_space_in_the_response():
    assert hh_module.split_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:  d") == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
        "  d",
    )
    assert hh_module.split_transcript("no turns") is None


def test_shp_filters_score_ratio_and_caps_pairs_per_post_on_train_only():
    assert score_ratio(3, 2) == 1.5 and score_ratio(5, 20) == 4.0 and math.isinf(score_ratio(0, 3))
    data = _load("shp")
    # train: 8 rows; line 7 has ratio 1.5 (< 2); post p1 has 6 remaining pairs, capped to 5 -> 5 + 1 (p2)
    assert len(data.train) == 6
    assert sum(ex.meta["post_id"] == "p1" for ex in data.train) == 5
    p2 = _by_origin(data, "askscience/train.json:8")
    assert p2.prompt == [{"role": U, "content": "How do magnets work?"}]
    assert p2.chosen == [{"role": A, "content": "Magic."}]  # labels = 0: B preferred
    assert p2.rejected == [{"role": A, "content": "Spins of electrons align."}]
    # test split: ratio 1.5 is kept (no filter outside train)
    assert [ex.chosen[0]["content"] for ex in data.eval] == ["Collapsed matter."]


def test_oasst_pairs_english_ranked_siblings():
    data = _load("oasst", "data.eval_fraction=0")
    examples = _all(data)
    assert len(examples) == 3  # (m2, m3), (m3, m4), (m6, m7); the German thread is dropped
    first = _by_origin(data, "train.jsonl:3")
    assert first.prompt == [{"role": U, "content": "Explain recursion briefly."}]
    assert first.chosen == [{"role": A, "content": "A function that calls itself on a smaller input."}]
    assert first.rejected == [{"role": A, "content": "Recursion is recursion."}]
    assert _by_origin(data, "train.jsonl:4").chosen == [{"role": A, "content": "Recursion is recursion."}]
    deep = _by_origin(data, "train.jsonl:7")
    assert deep.prompt == [
        {"role": U, "content": "Explain recursion briefly."},
        {"role": A, "content": "A function that calls itself on a smaller input."},
        {"role": U, "content": "Give an example."},
    ]
    assert deep.chosen == [{"role": A, "content": "Factorial: n! = n * (n-1)!."}]


def test_ultrafeedback_takes_the_last_turns():
    data = _load("ultrafeedback")
    assert len(data.train) == 3 and len(data.eval) == 1  # row 4 has identical replies
    ex = _by_origin(data, "data/train_prefs.jsonl:2")
    assert ex.prompt == [{"role": U, "content": "What is 7 times 6?"}]
    assert ex.chosen == [{"role": A, "content": "7 times 6 is 42."}]
    assert ex.rejected == [{"role": A, "content": "7 times 6 is 36."}]
    assert ex.meta["score_chosen"] == 10.0


def test_ultrachat_gives_sft_examples_per_assistant_turn():
    data = _load("ultrachat", "data.eval_fraction=0")
    assert len(data.train) == 4  # rows 1 (two assistant turns), 2 and 4; row 3 has no assistant turn
    first, second = [ex for ex in data.train if ex.origin == "train_sft.jsonl:1"]
    assert first.prompt == [{"role": U, "content": "Tell me about tea."}]
    assert first.chosen == [{"role": A, "content": "Tea is brewed from leaves."}]
    assert second.prompt == [
        {"role": U, "content": "Tell me about tea."},
        {"role": A, "content": "Tea is brewed from leaves."},
        {"role": U, "content": "And green tea?"},
    ]
    assert second.chosen == second.rejected == [{"role": A, "content": "Green tea is not oxidised."}]
    assert second.meta["sft_only"] is True
    last = _load("ultrachat", "data.eval_fraction=0", "data.sft_turns=last")
    assert len(last.train) == 3
    assert _by_origin(last, "train_sft.jsonl:1").chosen == second.chosen


def test_tldr_formats_reddit_posts_and_drops_news():
    data = _load("tldr", "data.eval_fraction=0")
    assert len(data.train) == 3  # line 3 is a CNN/DM comparison
    ex = _by_origin(data, "comparisons/batch3.json:1")
    assert ex.prompt == (
        "SUBREDDIT: r/relationships\nTITLE: Title 1\nPOST: My roommate never cleans the kitchen.\nTL;DR:"
    )
    assert ex.chosen == " Roommate leaves dishes, I am annoyed."  # choice = 1, stripped
    assert ex.rejected == " roommate is messy"
    sft = _load("tldr-sft", "data.eval_fraction=0")
    cat = _by_origin(sft, "train.jsonl:2")
    assert (
        cat.prompt
        == "SUBREDDIT: r/cats\nTITLE: Cat ignores me\nPOST: My cat only comes when food is out.\nTL;DR:"
    )
    assert cat.chosen == cat.rejected == " cat loves food, not me"


def test_imdb_hub_pairs_the_first_two_generations_by_reward():
    data = _load("imdb-hub")
    assert len(data.train) == 3 and len(data.eval) == 1  # one single generation, one tie dropped
    ex = _by_origin(data, "imdb-sft-train.jsonl:1")
    assert ex.prompt == "I found it real shocking"
    assert ex.chosen == " for the time that it was released."
    assert ex.rejected == ". Not in a good way."  # punctuation: no space inserted
    assert _by_origin(data, "imdb-sft-train.jsonl:4").chosen == " wonderful from start to end."
    assert data.eval[0].chosen == " was gripping."


def test_mbpp_pairs_every_passing_solution_with_a_failing_one():
    data = _load("mbpp", "data.eval_fraction=0")
    examples = _all(data)
    assert [ex.origin for ex in examples] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:4"]
    assert all(ex.rejected == "def min_of_two(a, b):\n    return a\n" for ex in examples[:2])
    assert examples[2].chosen == "def add(a, b):\n    return a + b\n"
    assert examples[2].rejected == "def add(a, b):\n    return a - b\n"
    assert examples[2].prompt.startswith('"""Write a function to add two numbers.')


def test_prompt_sources_read_prompts_only():
    assert load_prompts("alpacaeval", str(FIXTURES / "alpacaeval")) == [
        "What are the names of some famous actors that started their careers on Broadway?",
        "How did US states get their names?",
    ]
    arena = load_prompts("arenahard", str(FIXTURES / "arenahard" / "question.jsonl"))
    assert arena == [
        "Use ABC notation to write a melody in the style of a folk tune.",
        "Solve this problem in C++: swap two cards.",
    ]
    from sparsealign.data.sources import SourceRequest, get_source

    data = get_source("arenahard")(SourceRequest(_config("arenahard", FIXTURES / "arenahard")))
    assert data.train == [] and data.eval_prompts == arena


# ------------------------------------------------------------------------------------------------------------
# Bad columns name the source, the column and the row


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("name", "fixture", "line", "column"),
    [
        ("hh", "hh/helpful-base/train.jsonl", 2, "rejected"),
        ("ultrafeedback", "ultrafeedback/data/train_prefs.jsonl", 3, "chosen"),
        ("tldr", "tldr/comparisons/batch3.json", 2, "info.post"),
        ("shp", "shp/askscience/train.json", 4, "labels"),
        ("imdb-hub", "imdb_hub/imdb-sft-train.jsonl", 5, "reward"),
    ],
)
def test_a_missing_column_names_source_column_and_row(tmp_path, name, fixture, line, column):
    rows = [json.loads(x) for x in (FIXTURES / fixture).read_text().splitlines() if x.strip()]
    target = rows[line - 1]
    *parents, leaf = column.split(".")
    for part in parents:
        target = target[part]
    del target[leaf]
    path = _write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_source(_config(name, path))
    message = str(caught.value)
    assert message.startswith(f"{name}: row rows.jsonl:{line} (line {line}): column '{column}' is missing")


def test_a_wrong_type_names_source_column_and_row(tmp_path):
    rows = [json.loads(x) for x in (FIXTURES / "mbpp" / "train.jsonl").read_text().splitlines()]
    rows[2]["passed"] = "yes"
    with pytest.raises(
        DataError, match=r"^mbpp: row rows.jsonl:3 \(line 3\): column 'passed' is str, expected bool"
    ):
        load_source(_config("mbpp", _write(tmp_path / "rows.jsonl", rows)))
    rows = [
        json.loads(x) for x in (FIXTURES / "ultrafeedback/data/train_prefs.jsonl").read_text().splitlines()
    ]
    rows[0]["chosen"] = "not messages"
    with pytest.raises(
        DataError, match=r"^ultrafeedback: row rows.jsonl:1 \(line 1\): column 'chosen' is str"
    ):
        load_source(_config("ultrafeedback", _write(tmp_path / "rows.jsonl", rows)))


def test_a_malformed_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text((FIXTURES / "hh/helpful-base/train.jsonl").read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"^hh: row rows.jsonl:5 \(line 5\) could not be read"):
        load_source(_config("hh", path))


def test_offline_without_a_local_copy_names_data_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("smoke", ["data.source=shp", "data.path=null"])
    with pytest.raises(DataError, match=r"stanfordnlp/SHP.*data.path="):
        load_source(cfg)
    cfg = load_config("smoke", ["data.source=imdb-hub", "data.path=null"])
    with pytest.raises(DataError, match="not on the Hugging Face Hub.*data.path="):
        load_source(cfg)


def test_a_folder_without_the_eval_split_holds_out_eval_fraction(tmp_path):
    shutil.copy(FIXTURES / "hh/helpful-base/train.jsonl", tmp_path / "train.jsonl")
    data = load_source(_config("hh", tmp_path, "data.eval_fraction=0.3"))
    assert len(data.train) == 2 and len(data.eval) == 1  # 3 usable rows, round(0.9) = 1 held out


# ------------------------------------------------------------------------------------------------------------
# Mixing


def test_weighted_keeps_round_weight_times_n():
    items = list(range(10))
    assert weighted(items, 1.0, 0) == items
    half = weighted(items, 0.5, 0)
    assert len(half) == 5 and half == sorted(half) and set(half) <= set(items)
    twice = weighted(items, 2.5, 0)
    assert len(twice) == 25 and twice[:20] == items + items
    assert weighted(items, 0.0, 0) == []


def test_mix_keeps_every_source_and_counts_overlaps(tmp_path, caplog):
    # a second copy of hh-helpful under another name: same prompts, same pairs
    copy_dir = tmp_path / "copy"
    shutil.copytree(FIXTURES / "hh", copy_dir)
    mix = (
        f"data.mix=[{{source: hh-helpful, path: {FIXTURES / 'hh'}}}, "
        f"{{source: hh-harmless, path: {FIXTURES / 'hh'}, weight: 2}}, "
        f"{{source: hh-helpful, path: {copy_dir}, weight: 0.5}}, "
        f"{{source: imdb-hub, path: {FIXTURES / 'imdb_hub'}}}]"
    )
    cfg = load_config("smoke", ["data.source=mix", "data.path=null", mix])
    with caplog.at_level("INFO", logger="sparsealign.data"):
        data = load_source(cfg)
    sources = [ex.meta["source"] for ex in data.train]
    # hh-helpful 3, hh-harmless 2 x 2, the copy round(0.5 * 3) = 2 (of 3), imdb-hub 3
    assert sources.count("hh-helpful") == 3 and sources.count("hh-harmless") == 4
    assert sources.count("hh-helpful#2") == 2 and sources.count("imdb-hub") == 3
    assert len(data.eval) == 1 + 1 + 1 + 1
    # nothing overwritten: the copy's pairs are kept beside the originals, with their own origins
    assert all(ex.origin.startswith(ex.meta["source"] + ":") for ex in data.train)
    assert "2 prompts appear in more than one source and 2 pairs are exact duplicates" in caplog.text


def test_count_overlaps_counts_shared_prompts_and_duplicate_pairs():
    from sparsealign.data.examples import PreferenceExample as P

    parts = {
        "a": [P("x", "1", "2"), P("y", "1", "2")],
        "b": [P("x", "1", "2"), P("x", "3", "4")],
        "c": [P([{"role": "user", "content": "x"}], "1", "2")],
    }
    assert count_overlaps(parts) == {"shared_prompts": 1, "duplicate_pairs": 1}


def test_mix_config_errors():
    with pytest.raises(ConfigError, match="data.mix"):
        load_config("smoke", ["data.path=null", "data.mix=[{source: hh}]"])
    cfg = load_config("smoke", ["data.source=mix", "data.path=null", "data.mix=[{source: hh, wieght: 2}]"])
    with pytest.raises(DataError, match=r"data.mix\[0\].*unknown: wieght"):
        load_source(cfg)


# ------------------------------------------------------------------------------------------------------------
# Every preference source trains 2 steps on the smoke model


TRAINED = ["hh", "shp", "oasst", "ultrafeedback", "tldr", "imdb-hub", "mbpp"]


@pytest.mark.parametrize("name", TRAINED)
def test_each_source_trains_two_steps(tmp_path, name):
    from sparsealign.api import train

    cfg = _config(
        name,
        FIXTURES / PATHS[name],
        "train.max_steps=2",
        "train.batch_size=2",
        "train.save_every=0",
        "train.eval_every=0",
        "train.warmup_steps=0",
        "train.progress=false",
        f"output_dir={tmp_path / 'run'}",
    )
    result = train(cfg)
    assert result.steps == 2
    assert math.isfinite(result.final_metrics["loss"])


@pytest.mark.parametrize("name", ["ultrachat", "tldr-sft"])
def test_sft_sources_train_two_steps_with_sft(tmp_path, name):
    from sparsealign.api import train

    cfg = _config(
        name,
        FIXTURES / PATHS[name],
        "method.name=sft",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.save_every=0",
        "train.eval_every=0",
        "train.warmup_steps=0",
        "train.progress=false",
        f"output_dir={tmp_path / 'run'}",
    )
    assert train(cfg).steps == 2
