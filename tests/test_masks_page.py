"""`sparsealign masks RUN`: the token-mask page of SparsePO and MaPO runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsealign.errors import UserError
from sparsealign.eval.masks_page import compute_masks, write_masks_page
from sparsealign.recipes.load import load_config
from sparsealign.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, method: str) -> Path:
    cfg = load_config(
        ROOT / "configs/smoke.yaml",
        [
            f"output_dir={tmp_path}",
            f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
            f"method.name={method}",
            "train.max_steps=2",
            "train.save_every=0",
            "train.eval_every=0",
            "train.progress=false",
        ],
    )
    train(cfg)
    return tmp_path


@pytest.mark.parametrize("method", ["sparsepo", "mapo"])
def test_page_colours_every_response_token(tmp_path, method):
    run = _run(tmp_path, method)
    rows = compute_masks(load_config(run / "config.yaml"), run, n=2)
    assert len(rows) == 2
    for row in rows:
        for side in ("chosen", "rejected"):
            data = row[side]
            assert len(data["tokens"]) == len(data["reward"]) == len(data["kl"]) > 0
            assert all(v >= 0 for v in data["reward"] + data["kl"])
            if method == "mapo":
                assert data["reward"] == data["kl"] and all(v <= 1 for v in data["reward"])
    page = write_masks_page(run, n=2)
    assert page == run / "report/masks.html"
    text = page.read_text()
    tokens = sum(len(r[s]["tokens"]) for r in rows for s in ("chosen", "rejected"))
    assert len(re.findall(r'<span class="t"', text)) == 2 * tokens  # a reward line and a KL line per response
    assert text.count("chosen, reward") == 2 and text.count("rejected, KL") == 2


def test_runs_without_masks_are_refused(tmp_path):
    run = _run(tmp_path, "dpo")
    with pytest.raises(UserError, match="has no token masks"):
        write_masks_page(run)
    with pytest.raises(UserError, match="not a run folder"):
        write_masks_page(tmp_path / "nowhere")
