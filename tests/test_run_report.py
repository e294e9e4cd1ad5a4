"""``sparsealign report``: the run's one-file HTML page, and the generation report on a user's data file.

One smoke run (tiny random Llama, 6 steps, ``eval.generate=true``) is trained once per module; the page it
writes is checked for its sections, its inline PNGs, the absence of any external request, and, where a
Chromium is installed, by rendering it headless and counting the images that loaded.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from sparsealign import load_config, train
from sparsealign.cli import main
from sparsealign.data.examples import TokenizedPair
from sparsealign.data.prepare import held_out_prompts
from sparsealign.eval import plots
from sparsealign.eval.run_report import SECTIONS, build_page, write_run_report
from sparsealign.train.summary import format_run_summary

ROOT = Path(__file__).resolve().parents[1]
SMOKE_STEPS = 6
SAMPLES_PER_PROMPT = 2
HELD_OUT = 2  # 48 rows, eval_fraction 0.05 -> 2 held-out pairs with distinct prompts
METRIC_FIGURES = [
    "Loss",
    "Implicit rewards",
    "Reward accuracy",
    "Log-probabilities",
    "Learning rate",
    "Throughput",
    "Gradient norm",
]  # what DPO logs: loss, rewards/*, logps/*, lr, tokens_per_s, grad_norm
IMAGES = len(METRIC_FIGURES) + 1  # + the sample distributions of the generation report
IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]*)"')


def smoke_config(out: Path, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        f"train.max_steps={SMOKE_STEPS}",
        "train.eval_every=3",
        "train.save_every=100",
        "eval.generate=true",
        f"eval.samples_per_prompt={SAMPLES_PER_PROMPT}",
        "eval.max_new_tokens=8",
    ]
    return load_config(ROOT / "configs/smoke.yaml", base + list(overrides))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    result = train(smoke_config(out))
    return out, result


def _page(run: Path) -> str:
    return (run / "report" / "index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The main job writes the report


def test_training_writes_the_page_and_the_summary_names_it(smoke_run):
    run, result = smoke_run
    page = run / "report" / "index.html"
    assert result.written["report"] == page and page.is_file()
    assert f"report:      {page}" in format_run_summary(result)


def test_generation_report_on_a_data_file_has_kl_and_lengths_but_no_reward(smoke_run):
    run, result = smoke_run
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert result.report == summary
    n = HELD_OUT * SAMPLES_PER_PROMPT
    for model in ("reference", "policy"):
        stats = summary[model]
        assert stats["num_prompts"] == HELD_OUT and stats["num_samples"] == n
        assert 1 <= stats["length_mean"] <= 8  # eval.max_new_tokens=8
        assert not any(key.startswith("reward") for key in stats) and "positive_fraction" not in stats
    assert summary["reference"]["kl_mean"] == 0.0  # KL of the reference to itself
    assert "reward_delta" not in summary and summary["config"]["reward"] is None
    rows = [json.loads(line) for line in (run / "report" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * n and {r["model"] for r in rows} == {"reference", "policy"}
    assert all("reward" not in r for r in rows)
    policy_kls = [r["kl"] for r in rows if r["model"] == "policy"]
    assert summary["policy"]["kl_mean"] == pytest.approx(sum(policy_kls) / n)


def test_held_out_prompts_are_the_distinct_prompts_in_order():
    pairs = [
        TokenizedPair([1, 5], [2], [3]),
        TokenizedPair([1, 6], [2], [3]),
        TokenizedPair([1, 5], [4], [2]),
    ]
    assert held_out_prompts(pairs) == [[1, 5], [1, 6]]


def test_no_held_out_prompts_warns_and_still_writes_the_page(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sparsealign.api"):
        result = train(smoke_config(out, "data.eval_fraction=0", "train.max_steps=1", "train.eval_every=0"))
    warning = [r.getMessage() for r in caplog.records if "no held-out prompts" in r.getMessage()]
    assert len(warning) == 1 and "data.eval_fraction" in warning[0]
    assert result.report is None and not (out / "report" / "summary.json").exists()
    assert "No generation report" in _page(out)


# --------------------------------------------------------------------------------------------------
# The page


def test_page_has_every_section_and_its_images_are_inline_pngs(smoke_run):
    run, _ = smoke_run
    html = _page(run)
    for key, heading in SECTIONS:
        assert f'<section id="{key}"><h2>{heading}</h2>' in html
    for title in METRIC_FIGURES:
        assert f'alt="{title}"' in html
    sources = IMG_SRC.findall(html)
    assert len(sources) == IMAGES
    prefix = "data:image/png;base64,"
    for src in sources:
        assert src.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
        assert image.format == "PNG"
        image.verify()
    first = Image.open(io.BytesIO(base64.b64decode(sources[0][len(prefix) :])))
    assert first.size == (640, 360)  # plots.SIZE at plots.DPI
    # self-contained: no request leaves the file, and no script
    links = re.findall(r'\s(?:src|href)="([^"]*)"', html)
    assert links and not [u for u in links if re.match(r"(?i)(https?:)?//", u)]
    assert "<script" not in html and "<link" not in html and "@import" not in html
    # the config, the generation table and a sample are on the page
    assert "tiny-random-llama" in html and "KL to reference" in html and "Sample generations" in html
    assert "Method <code>dpo</code> has no token masks" in html


def test_texts_from_the_run_are_escaped(tmp_path):
    (tmp_path / "report").mkdir()
    hostile = '<script>alert("x")</script><img src="http://example.com/a.png">'
    rows = [{"prompt": hostile, "model": "policy", "text": hostile, "kl": 0.5, "length": 3}]
    (tmp_path / "report" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text(f"method:\n  name: dpo\nnote: '{hostile}'\n")
    html = build_page(tmp_path)
    assert "<script" not in html and "http://example.com" not in re.findall(r'src="([^"]*)"', html)
    assert html.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 3  # config, prompt, text


def test_missing_inputs_are_stated_not_raised(tmp_path):
    path = write_run_report(tmp_path)
    html = path.read_text()
    assert path == tmp_path / "report" / "index.html"
    for missing in ("config.yaml is missing", "metrics.jsonl is missing", "report/summary.json is missing"):
        assert missing in html
    assert "No sample generations" in html and "<img" not in html
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\nnot json\n{"no_step": 1}\n')
    html = build_page(tmp_path)
    assert "2 line(s) skipped as unreadable (first: line 2)" in html
    assert len(IMG_SRC.findall(html)) == 1  # the loss
    (tmp_path / "report" / "summary.json").write_text("{broken")
    assert "summary.json: not readable as JSON" in build_page(tmp_path)


def test_other_summaries_and_the_mask_page_link(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "config.yaml").write_text("method:\n  name: sparsepo\n")
    (tmp_path / "report" / "samples.rouge.json").write_text(json.dumps({"rouge1": {"f": 0.25}, "n": 7}))
    html = build_page(tmp_path)
    assert "<h3>samples.rouge.json</h3>" in html
    assert '<td>rouge1.f</td><td class="num">0.25</td>' in html and '<td class="num">7</td>' in html
    assert f"Create it with: sparsealign masks {tmp_path}" in html
    (tmp_path / "report" / "masks.html").write_text("<html></html>")
    assert '<a href="masks.html">' in build_page(tmp_path)


def test_cli_report(smoke_run, tmp_path, capsys):
    run, _ = smoke_run
    assert main(["report", str(run), "--samples", "1"]) == 0
    assert str(run / "report" / "index.html") in capsys.readouterr().out
    assert _page(run).count('<tr class="prompt">') == 1
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The figures


def test_metric_keys_are_grouped_and_none_is_left_out():
    keys = [
        "loss", "eval/loss", "nll_loss", "kl/chosen", "kl", "masked_kl/rejected", "mask/sparsity_reward",
        "mask/mean_kl", "fpo/feature_dist_chosen", "fpo/active_features", "ppo/val/mean", "lr", "step", "epoch",
    ]  # fmt: skip
    specs = plots.figure_specs({k: [(1.0, 1.0)] for k in keys})
    assert [(s.title, s.keys) for s in specs] == [
        ("Loss", ["loss", "nll_loss"]),
        ("KL to the reference", ["kl", "kl/chosen", "masked_kl/rejected"]),
        ("Mask sparsity", ["mask/sparsity_reward"]),
        ("Mask values", ["mask/mean_kl"]),
        ("Feature distances", ["fpo/feature_dist_chosen"]),
        ("Learning rate", ["lr"]),
        ("fpo", ["fpo/active_features"]),
        ("ppo/val", ["ppo/val/mean"]),
    ]


def test_ema_by_hand():
    # s0 = 0; s1 = 0.9*0 + 0.1*10 = 1; s2 = 0.9*1 + 0.1*10 = 1.9; a NaN carries the average
    assert plots.ema([0.0, 10.0, 10.0, float("nan")]) == pytest.approx([0.0, 1.0, 1.9, 1.9])


# --------------------------------------------------------------------------------------------------
# As a person sees it: headless Chromium

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER = next((found for name in BROWSERS if (found := shutil.which(name))), None)
COUNTER = (
    "<script>window.addEventListener('load', function () {"
    "var all = document.images, ok = 0;"
    "for (var i = 0; i < all.length; i++) { if (all[i].complete && all[i].naturalWidth > 0) ok++; }"
    "document.body.setAttribute('data-images', ok + '/' + all.length); });</script>"
)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(BROWSER is None, reason="no chromium, chromium-browser or google-chrome installed")
def test_every_image_loads_in_headless_chromium(smoke_run, tmp_path):
    run, _ = smoke_run
    page = run / "report" / "index.html"
    # a copy with a counter that writes, once every image has loaded or failed, how many loaded
    probe = run / "report" / "probe.html"
    probe.write_text(page.read_text().replace("</body>", COUNTER + "</body>"))
    try:
        dom = _chromium(tmp_path / "profile", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    found = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert found, f"no image count in the rendered page: {dom.stderr[-2000:]}"
    assert (int(found.group(1)), int(found.group(2))) == (IMAGES, IMAGES)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    image = Image.open(shot)
    assert image.size == (1280, 2400)
    colours = image.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # dark text and figures on a light page, not a blank render
