"""Paths from configs and data cannot make a command write outside its output folder (issue 14, item 6).

:func:`sparsealign.io.inside` joins a config- or data-provided name under a folder and refuses one that would
lead outside it; the commands that build file names from such values (the frontier experiment's cells, the
judge cache) use it, and the commands that only read data values (training, evaluation) never turn them into
paths. Each end-to-end case lists every file under ``tmp_path`` before and after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sparsealign.cli import main
from sparsealign.errors import ConfigError, JudgeError, UserError
from sparsealign.eval.frontier import Cell, Experiment, expand_grid, marker_path, run_experiment
from sparsealign.eval.judge_client import JudgmentCache
from sparsealign.io import inside


def snapshot(root: Path) -> set[str]:
    """Every file, folder and link below ``root`` (relative, POSIX), without following links."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# -------------------------------------------------------------------------------------------- the helper


def test_plain_names_and_nested_relative_paths_are_joined_under_the_root(tmp_path):
    assert inside(tmp_path, "dpo-beta0.1", "cell name") == tmp_path / "dpo-beta0.1"
    assert inside(tmp_path, "plug.py:mine-beta2", "cell name") == tmp_path / "plug.py:mine-beta2"
    assert inside(tmp_path, "ab/abcdef.json", "key", nested=True) == tmp_path / "ab" / "abcdef.json"
    assert inside(tmp_path, "a/./b", "key", nested=True) == tmp_path / "a" / "b"
    assert inside(str(tmp_path), Path("x.json"), "key") == tmp_path / "x.json"  # str and Path both work
    assert not any(tmp_path.iterdir())  # the helper only checks: it creates nothing


@pytest.mark.parametrize(
    ("relative", "nested", "reason"),
    [
        ("..", False, "has a '..' component"),
        ("../x", False, "contains a path separator ('/')"),
        ("../x", True, "has a '..' component"),
        ("a/../../x", True, "has a '..' component"),
        ("a/..", True, "has a '..' component"),
        ("/etc/passwd", False, "is an absolute path"),
        ("/etc/passwd", True, "is an absolute path"),
        ("a/b", False, "contains a path separator ('/')"),
        ("a\\..\\b", True, "contains a backslash"),
        ("x\0y", False, "contains a NUL character"),
        ("", False, "is empty"),
        (".", False, "names the folder itself"),
        ("./.", True, "names the folder itself"),
    ],
)
def test_names_that_lead_outside_are_one_line_errors(tmp_path, relative, nested, reason):
    with pytest.raises(UserError) as raised:
        inside(tmp_path / "out", relative, "cell name", nested=nested)
    message = str(raised.value)
    assert message.startswith(f"cell name {relative!r} {reason}")
    assert str(tmp_path / "out") in message and "\n" not in message
    assert ("a relative path of plain names" if nested else "a plain file name") in message


def test_the_error_class_is_the_callers(tmp_path):
    with pytest.raises(ConfigError, match=r"^method name '\.\./x' contains a path separator"):
        inside(tmp_path, "../x", "method name", error=ConfigError)


def test_symbolic_links_leading_outside_are_refused_and_those_inside_are_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "away").symlink_to(outside, target_is_directory=True)
    (root / "near").symlink_to(root / "real", target_is_directory=True)
    (root / "file.json").symlink_to(outside / "file.json")  # a dangling link to a file outside
    with pytest.raises(UserError, match=rf"'away/x.json' leads through a symbolic link to {outside}/x.json"):
        inside(root, "away/x.json", "cache key", nested=True)
    with pytest.raises(UserError, match="leads through a symbolic link"):
        inside(root, "away", "cell name")
    with pytest.raises(UserError, match="leads through a symbolic link"):
        inside(root, "file.json", "cell marker")
    assert inside(root, "near/x.json", "cache key", nested=True) == root / "near" / "x.json"


def test_a_root_reached_through_a_link_is_the_users_choice(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk", target_is_directory=True)
    assert inside(tmp_path / "out", "cells", "folder") == tmp_path / "out" / "cells"


def test_a_loop_of_symbolic_links_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=r"'a/x' (cannot be resolved|leads through a symbolic link)"):
        inside(tmp_path, "a/x", "key", nested=True)


# ------------------------------------------------------------------------------- the frontier experiment


def test_experiment_with_a_method_name_that_climbs_out_is_one_line_and_writes_nothing(tmp_path, capsys):
    """``--methods ../../plug.py:mine`` would make the cell folder ``runs/../../plug.py:mine-beta…`` and its
    marker ``cells/../../…``, both outside ``--out``: refused before anything is loaded or written."""
    before = snapshot(tmp_path)
    out = tmp_path / "a" / "b" / "exp"
    argv = ["experiment", "imdb-frontier", "--methods", "dpo,../../plug.py:mine", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: method name (--methods) '../../plug.py:mine' contains a path separator ('/'): give a plain "
        f"file name, for a place inside {out / 'runs'}."
    )
    assert snapshot(tmp_path) == before


def test_a_cell_whose_folder_is_a_link_to_elsewhere_is_refused_before_training(tmp_path):
    out, elsewhere = tmp_path / "exp", tmp_path / "elsewhere"
    (out / "runs").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "runs" / "dpo-beta0.1").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"^cell name 'dpo-beta0\.1' leads through a symbolic link to "):
        expand_grid(["dpo"], out, {None: [0.1]})
    assert snapshot(tmp_path) == before


def test_a_hand_made_cell_named_out_of_the_folder_fails_alone_and_nothing_leaves_the_folder(tmp_path):
    """Through the Python API a :class:`Cell` can carry any method string: its marker path is refused, the
    cell is recorded as failed with the one-line reason, training never runs, and the experiment's own
    outputs stay in its folder."""
    out = tmp_path / "exp"
    cell = Cell("../../escape", 0.1, "smoke", (), out / "runs" / "x")
    with pytest.raises(ConfigError, match=r"^cell marker '\.\./\.\./escape-beta0\.1\.json' contains a path"):
        marker_path(cell)
    before = snapshot(tmp_path)
    calls = []
    rows = run_experiment(Experiment([cell], out, {}), lambda config: calls.append(config), plot=False)
    assert calls == []
    assert [r["status"] for r in rows] == ["failed"]
    assert rows[0]["error"].startswith("ConfigError: cell marker '../../escape-beta0.1.json' contains")
    added = snapshot(tmp_path) - before
    assert added == {"exp", "exp/frontier.csv", "exp/frontier.json", "exp/index.html"}


# --------------------------------------------------------------------------------------- the judge cache


def test_judge_cache_keys_stay_in_the_cache_folder(tmp_path):
    cache = JudgmentCache(tmp_path / "judge")
    key = JudgmentCache.key("gpt-x", [{"role": "user", "content": "../../etc/passwd"}], 10)
    cache.put(key, "gpt-x", "A")
    assert cache.get(key) == "A"
    assert snapshot(tmp_path) == {"judge", f"judge/{key[:2]}", f"judge/{key[:2]}/{key}.json"}
    before = snapshot(tmp_path)
    for bad in ("../../evil", "/tmp/evil", "ab/../../../evil"):
        with pytest.raises(JudgeError, match="judge cache key"):
            cache.put(bad, "gpt-x", "B")
        with pytest.raises(JudgeError, match="judge cache key"):
            cache.get(bad)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------- data values are never paths (evaluate, train)

EVIL = {"id": "../../evil", "model": "../../evil-model", "name": "/tmp/evil", "prompt_id": "..\\..\\evil"}


def test_evaluate_writes_only_its_summary_beside_the_samples_whatever_the_rows_say(tmp_path, capsys):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    rows = [{**EVIL, "prompt": f"p{i}", "output": f"the movie was good {i}"} for i in range(3)]
    rows[1]["model"] = "/etc/other-model"  # two groups, both named by path-like data
    samples = work / "s.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(tmp_path)
    assert main(["evaluate", str(samples), "--metrics", "distinct"]) == 0
    assert snapshot(tmp_path) - before == {"a/b/s.evaluate.json"}
    summary = json.loads((work / "s.evaluate.json").read_text())
    assert [g["group"].get("model") for g in summary["groups"][1:]] == [
        "../../evil-model",
        "/etc/other-model",
    ]


def test_a_training_run_writes_only_inside_its_output_dir_whatever_the_rows_say(
    tmp_path, monkeypatch, capsys
):
    """A tiny run whose rows carry path-like ids and names, run from a working folder with the cache
    elsewhere: every file it writes is inside ``output_dir`` (the cache stays empty for a built-in model)."""
    work, cache = tmp_path / "a" / "b", tmp_path / "cache"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [
        {**EVIL, "prompt": f"Review {i}: ../../x", "chosen": " good.", "rejected": " bad."} for i in range(8)
    ]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(tmp_path)
    overrides = ["output_dir=run", "data.path=pairs.jsonl", "train.max_steps=2", "train.save_every=1"]
    assert main(["train", "smoke", *overrides, "train.eval_every=0", "train.progress=false"]) == 0
    added = snapshot(tmp_path) - before
    assert "a/b/run/final/model.safetensors" in added and "a/b/run/checkpoints/step-2/state.json" in added
    assert sorted(p for p in added if not (p == "a/b/run" or p.startswith("a/b/run/"))) == []
    assert not os.path.exists(tmp_path / "evil")
