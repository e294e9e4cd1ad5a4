"""``train.group_by_length``: each optimizer step sees the same examples, dealt into micro-batches of similar
length, and the run's losses equal the ungrouped run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsealign.data.collate import collate_pairs
from sparsealign.recipes.load import load_config
from sparsealign.train.batches import BatchPlan
from sparsealign.train.loop import train
from tiny_models import random_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_grouping_keeps_each_step_s_examples_and_sorts_them_by_length():
    lengths = (5, 30, 7, 22, 9, 40, 3, 18, 11, 26, 14, 35)
    plain = BatchPlan(12, batch_size=2, grad_accum=3, num_processes=2, seed=7)
    grouped = BatchPlan(12, batch_size=2, grad_accum=3, num_processes=2, seed=7, lengths=lengths)
    for step in range(plain.steps_per_epoch):
        mine = {r: grouped.micro_batches(step, r) for r in range(2)}
        theirs = {r: plain.micro_batches(step, r) for r in range(2)}
        assert sorted(i for r in mine for m in mine[r] for i in m) == sorted(
            i for r in theirs for m in theirs[r] for i in m
        )
        assert all(len(m) == 2 for r in mine for m in mine[r])
        # dealt longest first: micro-batch i of rank r holds places (i * 2 + r) * 2 and the next
        dealt = [i for k in range(3) for r in range(2) for i in mine[r][k]]
        assert [lengths[i] for i in dealt] == sorted((lengths[i] for i in dealt), reverse=True)


def test_grouping_pads_less():
    pairs = random_pairs(32, seed=4)
    lengths = tuple(len(p) for p in pairs)
    padded = {}
    for name, plan in (
        ("plain", BatchPlan(32, 4, 8, 1, seed=0)),
        ("grouped", BatchPlan(32, 4, 8, 1, seed=0, lengths=lengths)),
    ):
        padded[name] = sum(
            collate_pairs([pairs[i] for i in micro], pad_id=2).input_ids.numel()
            for micro in plan.micro_batches(0, 0)
        )
    # a micro-batch pads its 2 x 4 rows to its longest pair; grouped, the micro-batches are runs of the
    # sorted lengths: the longest of each run of 4 is every 4th length, longest first
    ranked = sorted(lengths, reverse=True)
    assert padded["grouped"] == sum(2 * 4 * ranked[k] for k in range(0, 32, 4))
    assert padded["grouped"] < padded["plain"]


def _losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_grouped_run_has_the_ungrouped_losses(tmp_path):
    common = [
        f"data.path={ROOT / 'configs/smoke_pairs.jsonl'}",
        "train.progress=false",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.grad_accum=3",
        "train.save_every=0",
        "train.eval_every=0",
        "train.max_grad_norm=null",
    ]
    for name, grouped in (("plain", "false"), ("grouped", "true")):
        train(
            load_config(
                "smoke", [f"output_dir={tmp_path / name}", f"train.group_by_length={grouped}", *common]
            )
        )
    plain, grouped = _losses(tmp_path / "plain"), _losses(tmp_path / "grouped")
    assert sorted(plain) == [1, 2, 3]
    for step in plain:
        assert grouped[step] == pytest.approx(plain[step], abs=1e-6)
