"""The IMDB frontier experiment: the grid, skipping and resuming cells, aggregation, the plot and page, failed
and interrupted cells (with a fake train function), and one tiny end-to-end run of the command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparsealign.config import dump_config, to_dict
from sparsealign.errors import ConfigError
from sparsealign.eval import frontier
from sparsealign.eval.frontier import (
    CSV_FIELDS,
    DEFAULT_METHODS,
    QUICK_OVERRIDES,
    Experiment,
    Interrupted,
    cell_state,
    comparable,
    expand_grid,
    parse_betas,
    read_csv,
    run_experiment,
)
from sparsealign.eval.frontier_plot import curves, frontier_figure, plot_frontier
from sparsealign.recipes.load import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_summary(method: str, beta: float) -> dict:
    """A report whose numbers are a known function of the cell: reward 1 + beta + offset, KL 10 * beta."""
    offset = DEFAULT_METHODS.index(method) / 10 if method in DEFAULT_METHODS else 0.0
    return {
        "reference": {
            "reward_mean": 0.5,
            "reward_sem": 0.1,
            "kl_mean": 0.0,
            "kl_sem": 0.0,
            "num_samples": 128,
        },
        "policy": {
            "reward_mean": 1.0 + beta + offset,
            "reward_sem": 0.05,
            "kl_mean": 10.0 * beta,
            "kl_sem": 0.5,
            "num_samples": 128,
        },
    }


class FakeTrain:
    """Stands in for ``sparsealign.api.train``: writes what a run writes (config.yaml, metrics.jsonl,
    report/summary.json) and records the configs it was called with."""

    def __init__(self, fail: tuple[str, ...] = (), interrupt: tuple[str, ...] = ()):
        self.calls = []
        self.fail, self.interrupt = fail, interrupt

    def __call__(self, config):
        self.calls.append(config)
        run_dir = Path(config.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
        if config.method.name in self.fail:
            raise RuntimeError("boom:\nout of memory")
        if config.method.name in self.interrupt:
            return SimpleNamespace(steps=1, interrupted=True, report=None)
        summary = fake_summary(config.method.name, config.method.beta)
        (run_dir / "report").mkdir(exist_ok=True)
        (run_dir / "report" / "summary.json").write_text(json.dumps(summary))
        return SimpleNamespace(steps=3, interrupted=False, report=summary)


def run(cells, out, train, plot=True):
    return run_experiment(Experiment(cells, Path(out), {"quick": True}), train, plot=plot)


# ------------------------------------------------------------------------------------------------ the grid


def test_quick_grid_betas_are_multiples_of_each_recipes_beta(tmp_path):
    cells = expand_grid(["dpo", "simpo", "fpo"], tmp_path, quick=True)
    assert [c.name for c in cells] == [
        "dpo-beta0.05",
        "dpo-beta0.2",
        "simpo-beta1",
        "simpo-beta4",
        "fpo-beta1",
        "fpo-beta4",
    ]
    for cell in cells:
        assert cell.recipe == f"imdb/{cell.method}"
        assert cell.overrides[: len(QUICK_OVERRIDES)] == QUICK_OVERRIDES
        assert cell.overrides[-1] == f"output_dir={tmp_path / 'runs' / cell.name}"
        config = load_config(cell.recipe, list(cell.overrides))
        assert config.method.name == cell.method and config.method.beta == cell.beta
        assert config.train.max_steps == 10 and config.train.lr == 1e-3 and config.eval.generate is True
        assert config.train.keep_checkpoints == 1
        assert Path(config.output_dir) == tmp_path / "runs" / cell.name
    # FPO trains from a reference cache: one folder for both of its betas, inside the experiment's folder
    fpo_caches = {
        load_config(c.recipe, list(c.overrides)).reference.cache for c in cells if c.method == "fpo"
    }
    assert len(fpo_caches) == 1
    (cache,) = fpo_caches
    assert Path(cache).parent == tmp_path / "reference-cache" and Path(cache).name.startswith("fpo-")
    assert all(
        not any(o.startswith("reference.cache=") for o in c.overrides) for c in cells if c.method != "fpo"
    )


def test_full_grid_and_explicit_betas(tmp_path):
    cells = expand_grid(["dpo"], tmp_path)
    assert [c.beta for c in cells] == [0.025, 0.05, 0.1, 0.2, 0.4]
    assert not any(o.startswith("train.max_steps") for o in cells[0].overrides)
    betas = parse_betas(["0.3,0.1,0.1", "simpo=2.5"])
    assert betas == {None: [0.1, 0.3], "simpo": [2.5]}
    cells = expand_grid(
        ["dpo", "tdpo2", "simpo"], tmp_path, betas, overrides=["train.lr=1e-4", "method.beta=9"]
    )
    assert [c.name for c in cells] == [
        "dpo-beta0.1",
        "dpo-beta0.3",
        "tdpo2-beta0.1",
        "tdpo2-beta0.3",
        "simpo-beta2.5",
    ]
    config = load_config(cells[-1].recipe, list(cells[-1].overrides))
    assert config.train.lr == 1e-4  # the user's override reaches every cell
    assert config.method.beta == 2.5 and config.method.gamma == 0.5  # the cell's beta wins; simpo keeps gamma
    assert load_config(cells[2].recipe, list(cells[2].overrides)).method.alpha == 0.5


def test_every_cell_shares_the_pairs_model_reward_and_seed(tmp_path):
    """Cells differ only in the method, beta, output_dir and reference cache: the sampled pairs (keyed by
    model, pairs and reward) are made once and reused by every cell."""
    cells = expand_grid(list(DEFAULT_METHODS), tmp_path, quick=True)
    shared = set()
    for cell in cells:
        tree = to_dict(load_config(cell.recipe, list(cell.overrides)))
        shared.add(json.dumps({k: tree[k] for k in ("model", "data", "pairs", "reward", "train", "eval")}))
    assert len(shared) == 1


@pytest.mark.parametrize(
    ("methods", "betas", "message"),
    [
        (["orpo"], None, "no 'beta' option"),
        (["dpo", "dpo"], None, "twice"),
        (["dpo"], {"simpo": [1.0]}, "does not include"),
        (["nonsense"], None, "Unknown method"),
    ],
)
def test_bad_grids_are_one_line_errors(tmp_path, methods, betas, message):
    with pytest.raises((ConfigError, Exception), match=message):
        expand_grid(methods, tmp_path, betas)


@pytest.mark.parametrize("spec", ["0.1,x", "simpo=", "-1", "0"])
def test_bad_betas(spec):
    with pytest.raises(ConfigError, match="--betas"):
        parse_betas([spec])


# ------------------------------------------------------------------------------- running, skipping, resuming


def test_finished_cells_are_skipped_and_the_csv_holds_their_reports(tmp_path):
    cells = expand_grid(["dpo", "simpo"], tmp_path, quick=True)
    train = FakeTrain()
    rows = run(cells, tmp_path, train)
    assert len(train.calls) == 4
    assert all(c.train.resume is None and not c.train.overwrite for c in train.calls)
    assert [r["status"] for r in rows] == ["finished"] * 4

    again = FakeTrain()
    rows = run(cells, tmp_path, again)
    assert again.calls == []
    assert [r["status"] for r in rows] == ["skipped"] * 4
    table = read_csv(tmp_path / "frontier.csv")
    assert [r["method"] for r in table] == ["dpo", "dpo", "simpo", "simpo"]
    for row in table:
        expected = fake_summary(row["method"], row["beta"])
        assert row["reward_mean"] == pytest.approx(expected["policy"]["reward_mean"])
        assert row["kl_mean"] == pytest.approx(expected["policy"]["kl_mean"])
        assert row["reward_sem"] == 0.05 and row["kl_sem"] == 0.5
        assert row["reference_reward_mean"] == 0.5 and row["reference_reward_sem"] == 0.1
        assert row["steps"] == 3 and row["num_samples"] == 128
        assert row["run_dir"] == f"runs/{row['method']}-beta{frontier.format_beta(row['beta'])}"
    with (tmp_path / "frontier.csv").open() as handle:
        assert tuple(next(csv.reader(handle))) == CSV_FIELDS
    payload = json.loads((tmp_path / "frontier.json").read_text())
    assert payload["reference"] == {"reward_mean": 0.5, "reward_sem": 0.1}
    assert len(payload["cells"]) == 4


def test_a_cell_of_another_config_is_redone(tmp_path):
    cells = expand_grid(["dpo"], tmp_path, {None: [0.1, 0.2]}, overrides=["train.lr=1e-4"])
    run(cells, tmp_path, FakeTrain(), plot=False)
    changed = expand_grid(["dpo"], tmp_path, {None: [0.1, 0.2]})  # the default lr now
    config = load_config(changed[0].recipe, list(changed[0].overrides))
    assert cell_state(changed[0], config) == "stale"
    train = FakeTrain()
    rows = run(changed, tmp_path, train, plot=False)
    assert [(c.train.overwrite, c.train.resume, c.train.lr) for c in train.calls] == [(True, None, 5e-4)] * 2
    assert [r["status"] for r in rows] == ["finished", "finished"]
    # a run folder that no marker describes (another program's run) is moved aside too
    (tmp_path / "cells" / "dpo-beta0.1.json").unlink()
    assert cell_state(changed[0], config) == "stale"


def test_an_interrupted_cell_is_resumed_by_the_next_run(tmp_path):
    cells = expand_grid(["dpo", "tdpo1", "simpo"], tmp_path, {None: [0.1]})
    with pytest.raises(Interrupted):
        run(cells, tmp_path, FakeTrain(interrupt=("tdpo1",)))
    marker = json.loads((tmp_path / "cells" / "tdpo1-beta0.1.json").read_text())
    assert marker["status"] == "started" and marker["config"]["method.beta"] == 0.1
    train = FakeTrain()
    rows = run(cells, tmp_path, train)
    assert [(c.method.name, c.train.resume, c.train.overwrite) for c in train.calls] == [
        ("tdpo1", "auto", False),
        ("simpo", None, False),
    ]
    assert [r["status"] for r in rows] == ["skipped", "finished", "finished"]
    assert [r["steps"] for r in rows] == [3, 3, 3]


def test_config_comparison_ignores_run_control_keys_only(tmp_path):
    config = load_config("imdb/dpo", ["output_dir=a"])
    other = load_config("imdb/dpo", ["output_dir=b", "train.resume=auto", "train.progress=false"])
    assert comparable(to_dict(config)) == comparable(to_dict(other))
    assert comparable(to_dict(config)) != comparable(
        to_dict(load_config("imdb/dpo", ["eval.samples_per_prompt=3"]))
    )


def test_a_failed_cell_is_recorded_and_the_others_continue(tmp_path):
    cells = expand_grid(["dpo", "tdpo1", "simpo"], tmp_path, {None: [0.1]})
    rows = run(cells, tmp_path, FakeTrain(fail=("tdpo1",)))
    assert [r["status"] for r in rows] == ["finished", "failed", "finished"]
    failed = read_csv(tmp_path / "frontier.csv")[1]
    assert failed["method"] == "tdpo1" and failed["error"] == "RuntimeError: boom: out of memory"
    assert failed["reward_mean"] is None and failed["seconds"] is not None
    assert "boom: out of memory" in (tmp_path / "index.html").read_text()
    # the failed cell is tried again on the next run; the finished ones are not
    train = FakeTrain()
    rows = run(cells, tmp_path, train)
    assert [c.method.name for c in train.calls] == ["tdpo1"]
    assert [r["status"] for r in rows] == ["skipped", "finished", "skipped"]


def test_an_interrupted_cell_stops_the_experiment_after_writing_the_outputs(tmp_path):
    cells = expand_grid(["dpo", "tdpo1", "simpo"], tmp_path, {None: [0.1]})
    train = FakeTrain(interrupt=("tdpo1",))
    with pytest.raises(Interrupted, match="tdpo1-beta0.1 was interrupted at step 1"):
        run(cells, tmp_path, train)
    assert [c.method.name for c in train.calls] == ["dpo", "tdpo1"]
    assert [r["method"] for r in read_csv(tmp_path / "frontier.csv")] == ["dpo"]


def test_a_summary_without_policy_numbers_is_a_failed_row(tmp_path):
    cells = expand_grid(["dpo"], tmp_path, {None: [0.1]})
    run(cells, tmp_path, FakeTrain(), plot=False)
    (cells[0].run_dir / "report" / "summary.json").write_text("{}")
    (row,) = run(cells, tmp_path, FakeTrain(), plot=False)
    assert row["status"] == "failed" and "policy" in row["error"]


# -------------------------------------------------------------------------------------------- plot and page


def rows_for(methods=("dpo", "simpo"), betas=(0.2, 0.05, 0.1)):
    rows = []
    for method in methods:
        for beta in betas:
            s = fake_summary(method, beta)
            rows.append(
                {
                    "method": method,
                    "beta": beta,
                    "status": "finished",
                    **{k: s["policy"][k] for k in ("reward_mean", "reward_sem", "kl_mean", "kl_sem")},
                    "reference_reward_mean": 0.5,
                    "reference_reward_sem": 0.1,
                }
            )
    rows.append({"method": "tdpo1", "beta": 0.1, "status": "failed", "reward_mean": None, "kl_mean": None})
    return rows


def test_figure_has_one_curve_per_method_ordered_by_beta_and_the_reference():
    rows = rows_for()
    fig = frontier_figure(rows)
    (ax,) = fig.axes
    labels = [c.get_label() for c in ax.containers]
    assert labels == ["dpo", "simpo", "reference"]  # the failed method has no curve
    for container, method in zip(ax.containers[:2], ("dpo", "simpo"), strict=True):
        line = container.lines[0]
        assert list(line.get_xdata()) == pytest.approx([0.5, 1.0, 2.0])  # KL = 10 beta, by increasing beta
        offset = DEFAULT_METHODS.index(method) / 10
        assert list(line.get_ydata()) == pytest.approx([1.05 + offset, 1.1 + offset, 1.2 + offset])
        assert container.has_xerr and container.has_yerr
    reference = ax.containers[2].lines[0]
    assert list(reference.get_xdata()) == [0.0] and list(reference.get_ydata()) == [0.5]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["β=0.05", "β=0.1", "β=0.2"] * 2)


def test_plot_writes_a_png_and_returns_what_it_drew(tmp_path):
    drawn = plot_frontier(rows_for(), tmp_path / "frontier.png")
    data = (tmp_path / "frontier.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert list(drawn) == ["dpo", "simpo"]
    assert [beta for beta, _, _ in drawn["dpo"]] == [0.05, 0.1, 0.2]
    assert (
        curves([{"method": "x", "beta": 1, "status": "finished", "reward_mean": math.nan, "kl_mean": 1}])
        == {}
    )


def test_page_inlines_the_plot_and_links_existing_run_reports(tmp_path):
    cells = expand_grid(["dpo"], tmp_path, {None: [0.1, 0.2]})
    run(cells, tmp_path, FakeTrain(), plot=False)
    (cells[0].run_dir / "report" / "index.html").write_text("<html></html>")
    run(cells, tmp_path, FakeTrain())
    page = (tmp_path / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1
    assert 'href="runs/dpo-beta0.1/report/index.html"' in page
    assert "runs/dpo-beta0.2/report/index.html" not in page  # no report page there: no link
    assert page.count("<tr>") == 3


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and suffer least on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_reward(tmp_path):
    """A tiny random sequence classifier saved as a folder: ``reward.name=<folder>``."""
    from sparsealign.models.builtins import tiny_llama_tokenizer
    from tiny_models import save_tiny_classifier

    folder = tmp_path / "reward"
    save_tiny_classifier(folder, tiny_llama_tokenizer())
    return folder


TINY = [
    "model.name=tiny-random-llama",
    "pairs.num_prompts=8",
    "pairs.eval_prompts=3",
    "pairs.samples_per_prompt=2",
    "pairs.max_new_tokens=5",
    "pairs.batch_size=8",
    "data.max_length=64",
    "data.max_prompt_length=56",
    "train.max_steps=2",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.log_every=1",
    "eval.samples_per_prompt=2",
    "eval.max_new_tokens=5",
    "eval.batch_size=4",
]


def test_the_command_end_to_end_on_a_tiny_model(tmp_path, tiny_reward, monkeypatch, capsys, one_thread):
    """``sparsealign experiment imdb-frontier`` on the IMDB source with a tiny model and reward: every cell
    trains and reports, the pairs are sampled once, and a rerun trains nothing."""
    from sparsealign import api
    from sparsealign.cli import main

    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    calls = []

    def counting_train(config, callbacks=()):
        calls.append(config.output_dir)
        return real_train(config, callbacks)

    real_train = api.train
    monkeypatch.setattr(api, "train", counting_train)
    out = tmp_path / "frontier"
    argv = [
        "experiment",
        "imdb-frontier",
        "--methods",
        "dpo,simpo",
        "--betas",
        "0.5",
        "--betas",
        "simpo=2",
    ]
    argv += ["--quick", "--out", str(out), *TINY, f"reward.name={tiny_reward}"]
    assert main(argv) == 0
    assert len(calls) == 2
    rows = read_csv(out / "frontier.csv")
    assert [(r["method"], r["beta"], r["status"]) for r in rows] == [
        ("dpo", 0.5, "finished"),
        ("simpo", 2.0, "finished"),
    ]
    for row in rows:
        summary = json.loads((out / row["run_dir"] / "report" / "summary.json").read_text())
        assert row["reward_mean"] == pytest.approx(summary["policy"]["reward_mean"])
        assert row["kl_mean"] == pytest.approx(summary["policy"]["kl_mean"])
        assert row["num_samples"] == 6 and row["steps"] == 2
    # the same reference, prompts and seed in every cell: the same reference reward
    assert len({r["reference_reward_mean"] for r in rows}) == 1
    assert len(list((tmp_path / "cache" / "pairs").glob("imdb-*.jsonl"))) == 1  # pairs sampled once
    assert (out / "frontier.png").read_bytes().startswith(PNG_MAGIC)
    assert "simpo" in (out / "index.html").read_text()
    assert "reference reward" in capsys.readouterr().out

    assert main(argv) == 0
    assert len(calls) == 2  # every cell finished: nothing trained again
    assert [r["status"] for r in read_csv(out / "frontier.csv")] == ["skipped"] * 2


def test_unbuilt_builtin_saes_are_named_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    cells = expand_grid(["dpo", "fpo"], tmp_path / "out", quick=True)
    assert frontier.unbuilt_saes(cells) == {"smollm2-135m-instruct-imdb": ["fpo"]}
    assert frontier.unbuilt_saes([c for c in cells if c.method == "dpo"]) == {}
    folder = tmp_path / "cache" / "saes" / "smollm2-135m-instruct-imdb"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    (folder / "sae_weights.safetensors").write_bytes(b"")
    assert frontier.unbuilt_saes(cells) == {}


def test_quick_leaves_fpo_out_while_its_sae_is_not_built(tmp_path, monkeypatch, capsys):
    from sparsealign import api
    from sparsealign.cli import main

    monkeypatch.setenv("SPARSEALIGN_CACHE", str(tmp_path / "cache"))
    train = FakeTrain()
    monkeypatch.setattr(api, "train", train)
    assert (
        main(["experiment", "imdb-frontier", "--quick", "--out", str(tmp_path / "q"), "train.lr=2e-3"]) == 0
    )
    assert "--quick leaves out fpo" in capsys.readouterr().err
    rows = read_csv(tmp_path / "q" / "frontier.csv")
    assert [r["method"] for r in rows[::2]] == [m for m in DEFAULT_METHODS if m != "fpo"]
    assert all(c.train.lr == 2e-3 and c.train.max_steps == 10 for c in train.calls)  # overrides after --quick
    settings = json.loads((tmp_path / "q" / "frontier.json").read_text())["settings"]
    assert settings["methods"] == "dpo,tdpo1,tdpo2,simpo,sparsepo,mapo" and settings["cells"] == 12
    # asked for by name, fpo stays in the grid (its first cell would build the SAE)
    monkeypatch.setattr(api, "train", FakeTrain())
    assert (
        main(["experiment", "imdb-frontier", "--quick", "--methods", "fpo", "--out", str(tmp_path / "f")])
        == 0
    )
    assert "first cell that needs it trains it" in capsys.readouterr().err
    assert [r["beta"] for r in read_csv(tmp_path / "f" / "frontier.csv")] == [1.0, 4.0]
