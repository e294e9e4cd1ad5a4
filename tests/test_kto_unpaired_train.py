"""KTO on binary feedback end to end: TRL's unpaired rows (prompt, completion, label), pairs flattened into such
items (``data.flatten_pairs``), labels in the batch, chosen rows only, the loss against a hand computation from
the model's own log-probs, the class-balance warning, other methods refused, and the reference cache."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from sparsealign.data.collate import collate_mismatched, collate_pairs, collate_sequences
from sparsealign.data.examples import PreferenceExample, TokenizedPair, feedback_label
from sparsealign.data.formats import parse_rows, unpair_examples, unpaired_example
from sparsealign.data.mismatched import with_mismatched_responses
from sparsealign.errors import DataError
from sparsealign.methods.kto import check_class_balance
from sparsealign.recipes.load import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PAIRS = ROOT / "configs" / "smoke_pairs.jsonl"

GOOD = [" was a delight.", " moved me to tears.", " is worth every minute.", " made me laugh."]
BAD = [" was a bore.", " wasted my evening.", " fell flat.", " dragged on forever."]
TOPICS = [
    "The plot",
    "The cast",
    "The score",
    "The ending",
    "The pacing",
    "The dialogue",
    "The sets",
    "The jokes",
]


def _items(labels: list[bool]) -> list[dict]:
    """One unpaired row per label, every prompt distinct (so each item's mismatched partner is the next item)."""
    rows, good, bad = [], iter(GOOD * 4), iter(BAD * 4)
    for i, label in enumerate(labels):
        rows.append(
            {"prompt": f"Review {i}: {TOPICS[i % len(TOPICS)]}", "completion": next(good if label else bad)}
        )
        rows[-1]["label"] = label
    return rows


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, data: Path, *overrides: str):
    return load_config(
        "smoke",
        [
            f"data.path={data}",
            "method.name=kto",
            "train.max_steps=2",
            "train.save_every=0",
            "train.eval_every=0",
            "train.progress=false",
            f"output_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# Parsing


def test_unpaired_rows_parse_into_labelled_items_and_bad_labels_are_counted() -> None:
    rows = [
        {"prompt": "Q: 2+2?", "completion": " 4", "label": True},
        {"prompt": "Q: 2+3?", "completion": " 6", "label": 0, "id": 7},
        {"prompt": "Q: sky?", "completion": " blue", "label": 1},
        {"prompt": "Q: a", "completion": " b", "label": "yes"},
        {"prompt": "Q: a", "completion": " b", "label": 2},
        {"prompt": "Q: a", "completion": " b", "label": 1.0},
        {"prompt": "Q: a", "completion": " b"},
        {"prompt": "Q: a", "completion": "  ", "label": True},
        {"prompt": ["not", "messages"], "completion": " b", "label": True},
    ]
    examples, report = parse_rows([(f"u.jsonl:{i + 1}", row) for i, row in enumerate(rows)])
    assert [(e.prompt, e.chosen, e.rejected, e.meta["label"]) for e in examples] == [
        ("Q: 2+2?", " 4", " 4", True),
        ("Q: 2+3?", " 6", " 6", False),
        ("Q: sky?", " blue", " blue", True),
    ]
    assert examples[1].meta == {"id": 7, "label": False} and examples[1].origin == "u.jsonl:2"
    assert [feedback_label(e) for e in examples] == [True, False, True]
    assert report.total == 9 and report.kept == 3
    assert dict(report.counts) == {"bad_label": 3, "missing_field": 1, "empty_response": 1, "not_a_string": 1}
    assert report.origins["bad_label"] == ["u.jsonl:4", "u.jsonl:5", "u.jsonl:6"]
    assert "bad_label=3 (lines 4, 5, 6)" in report.summary()


def test_conversational_unpaired_rows_and_column_mapping() -> None:
    user = {"role": "user", "content": "Hi"}
    reply = {"role": "assistant", "content": "Hello!"}
    example = unpaired_example({"prompt": [user], "completion": [reply], "label": False}, "c.jsonl:1")
    assert (example.prompt, example.chosen, example.rejected) == ([user], [reply], [reply])
    assert example.meta == {"label": False}
    assert unpaired_example({"prompt": "Hi", "completion": [reply], "label": True}).reason == "not_a_string"
    rows = [("m:1", {"question": "Q", "answer": " A", "thumbs_up": False})]
    columns = {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    (mapped,), _ = parse_rows(rows, columns)
    assert (mapped.prompt, mapped.chosen, mapped.meta["label"]) == ("Q", " A", False)


def test_a_pair_with_its_own_label_column_stays_a_pair() -> None:
    pair = PreferenceExample("P", " good", " bad", meta={"label": True})
    assert feedback_label(pair) is None


def test_flatten_pairs_gives_a_desirable_and_an_undesirable_item_per_pair() -> None:
    pairs = [
        PreferenceExample("P0", " a", " b", "f:1", {"id": 0}),
        PreferenceExample("P1", " c", " d", "f:2"),
    ]
    items = unpair_examples(pairs)
    assert [(e.prompt, e.chosen, e.rejected, e.origin, feedback_label(e)) for e in items] == [
        ("P0", " a", " a", "f:1", True),
        ("P0", " b", " b", "f:1", False),
        ("P1", " c", " c", "f:2", True),
        ("P1", " d", " d", "f:2", False),
    ]
    assert items[0].meta == {"id": 0, "label": True} and pairs[0].meta == {"id": 0}
    assert unpair_examples(items) == items  # already binary feedback: unchanged


# --------------------------------------------------------------------------------------------------
# Batches and mismatched rows


def _labelled(*specs: tuple[list[int], list[int], bool]) -> list[TokenizedPair]:
    return [TokenizedPair(p, c, list(c), f"u:{i}", label=label) for i, (p, c, label) in enumerate(specs)]


def test_labelled_items_collate_to_their_chosen_rows_and_labels() -> None:
    items = _labelled(([1, 5], [6, 7, 2], True), ([1], [9, 2], False))
    batch = collate_pairs(items, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]]
    assert batch.labels.tolist() == [True, False] and batch.labels.dtype == torch.bool
    assert batch.num_pairs == 2
    assert batch.to("cpu").labels.tolist() == [True, False]
    pairs = [TokenizedPair([1], [6, 2], [7, 2])]
    assert collate_pairs(pairs, 0).labels is None and collate_pairs(pairs, 0).input_ids.shape[0] == 2
    with pytest.raises(DataError, match="mixes binary feedback"):
        collate_pairs(items + pairs, pad_id=0)


def test_each_item_borrows_the_next_items_completion_with_another_prompt() -> None:
    items = _labelled(([1], [10], True), ([1], [11], False), ([2], [12], False), ([3, 3], [13, 14, 15], True))
    out = with_mismatched_responses(items, max_length=4)
    # item 0 skips item 1 (same prompt); the last item wraps to item 0, cut to fit max_length - 2 = 2 tokens
    assert [p.mismatched_ids for p in out] == [
        ([12], [12]),
        ([12], [12]),
        ([13, 14, 15], [13, 14, 15]),
        ([10], [10]),
    ]
    rows = collate_mismatched(out, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 12, 0, 0], [1, 12, 0, 0], [2, 13, 14, 15], [3, 3, 10, 0]]


# --------------------------------------------------------------------------------------------------
# Training


def test_the_kto_loss_on_a_batch_of_items_equals_the_hand_computation(tmp_path: Path) -> None:
    """From a built run: perturb the policy, then the step's loss must equal λ(1 − σ(β(r − z₀))) averaged over
    the items, with r and z₀ computed here from separate forwards of each (prompt, completion) row and each
    (prompt, next item's completion) row."""
    from sparsealign.api import Trainer
    from sparsealign.train.step import compute_loss, step_inputs

    labels = [True, False, False, True, False, True]
    data = _write(tmp_path / "u.jsonl", _items(labels))
    cfg = _config(tmp_path, data, "data.eval_fraction=0", "method.desirable_weight=1.2", "method.beta=0.5")
    s = Trainer(cfg).session
    items = s.data.train
    assert [p.label for p in items] == labels and all(p.chosen_ids == p.rejected_ids for p in items)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in s.unwrapped.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    pad = s.bundle.tokenizer.pad_token_id
    batch = collate_pairs(items, pad)
    assert batch.input_ids.shape[0] == len(items)  # one row per item, no duplicate rejected rows
    with torch.no_grad():
        out = compute_loss(s.policy, step_inputs(s.cfg, s.method, s.bundle, batch, items, s.cache))

    def summed(prompts, responses):
        rows = collate_sequences(prompts, responses, pad)
        with torch.no_grad(), s.bundle.reference_model() as ref:
            pi = s.unwrapped(rows).logps
            from sparsealign.models.logprobs import TokenModel

            ref_logps = TokenModel(ref, s.unwrapped.chunk)(rows).logps
        mask = rows.response_mask
        return ((pi - ref_logps) * mask).sum(-1).double()

    prompts = [p.prompt_ids for p in items]
    r = summed(prompts, [p.chosen_ids for p in items])
    assert r.abs().max() > 1e-3  # the policy has moved away from the reference
    nxt = [items[(k + 1) % len(items)].chosen_ids for k in range(len(items))]
    z0 = max(0.0, summed(prompts, nxt).mean().item())
    beta, lam_d, lam_u = 0.5, 1.2, 1.0
    expected = [
        (lam_d * (1 - 1 / (1 + math.exp(-beta * (ri - z0)))))
        if label
        else (lam_u * (1 - 1 / (1 + math.exp(-beta * (z0 - ri)))))
        for ri, label in zip(r.tolist(), labels, strict=True)
    ]
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert out.metrics["kl"].item() == pytest.approx(z0, abs=1e-5)
    assert out.metrics["count/desirable"].item() == 3


def test_kto_trains_two_steps_on_an_unpaired_file(tmp_path: Path, caplog) -> None:
    from sparsealign.api import Trainer

    labels = [True, False, True, True, False, False, True, False]
    data = _write(
        tmp_path / "u.jsonl", [*_items(labels), '{"prompt": "x", "completion": " y", "label": "no"}']
    )
    cfg = _config(
        tmp_path, data, "data.eval_fraction=0.25", "method.desirable_weight=1.25", "train.batch_size=6"
    )
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg)
    assert "bad_label=1 (line 9)" in caplog.text
    assert "recommends [1, 4/3]" not in caplog.text  # 1.25·3 / (1·3) is in range
    train_labels = [p.label for p in trainer.session.data.train]
    eval_labels = [p.label for p in trainer.session.data.eval]
    assert len(train_labels) == 6 and len(eval_labels) == 2
    result = trainer.train()
    assert result.steps == 2
    rows = _metrics(tmp_path / "run")
    steps = [row for row in rows if "loss" in row]
    n_d = sum(train_labels)
    # at step 1 the policy is the reference: r = z₀ = 0, so each item loses λ·(1 − σ(0)) = λ/2
    assert steps[0]["loss"] == pytest.approx(0.5 * (1.25 * n_d + (6 - n_d)) / 6, abs=1e-5)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(row["count/desirable"] == n_d for row in steps)  # the whole training set in each batch
    assert steps[1]["loss"] != steps[0]["loss"]
    final = rows[-1]
    assert final["eval/count/desirable"] == sum(eval_labels) and math.isfinite(final["eval/loss"])


def test_flatten_pairs_trains_kto_on_paired_data(tmp_path: Path) -> None:
    from sparsealign.api import Trainer

    cfg = _config(tmp_path, SMOKE_PAIRS, "data.flatten_pairs=true", "data.max_examples=4")
    data = Trainer(cfg).session.data
    assert data.unpaired and [p.label for p in data.train] == [True, False] * 4
    assert all(p.mismatched_ids[0] == p.mismatched_ids[1] for p in data.train)
    assert [p.label for p in data.eval] == [True, False] * (len(data.eval) // 2)


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_binary_feedback_is_refused_for_other_methods(tmp_path: Path, method: str) -> None:
    from sparsealign.api import train

    data = _write(tmp_path / "u.jsonl", _items([True, False, True, False]))
    with pytest.raises(DataError, match=r"binary feedback trains only with method.name=kto \(or kto-zero\)"):
        train(_config(tmp_path, data, f"method.name={method}"))
    with pytest.raises(DataError, match="trains only with method.name=kto"):
        train(_config(tmp_path, SMOKE_PAIRS, f"method.name={method}", "data.flatten_pairs=true"))


def test_mixing_items_and_pairs_is_refused(tmp_path: Path) -> None:
    from sparsealign.api import train

    pair = {"prompt": "P", "chosen": " good", "rejected": " bad"}
    data = _write(tmp_path / "mixed.jsonl", [*_items([True, False, True]), pair])
    with pytest.raises(DataError, match="mixes binary feedback.*flatten_pairs=true"):
        train(_config(tmp_path, data))


def test_class_imbalance_warns_once_naming_the_weights_that_fix_it(tmp_path: Path, caplog) -> None:
    from sparsealign.api import Trainer

    options = load_config("smoke", ["method.name=kto"]).method
    with caplog.at_level(logging.WARNING, logger="sparsealign.methods"):
        check_class_balance([True] * 2 + [False] * 6, options)  # 1·2 / (1·6) = 1/3
    assert "= 0.333" in caplog.text
    # λ_D in [1·6/2, (4/3)·6/2] = [3, 4]; λ_U in [1·2/((4/3)·6), 1·2/6] = [0.25, 0.333]
    assert "method.desirable_weight in [3, 4]" in caplog.text
    assert "method.undesirable_weight in [0.25, 0.333]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsealign.methods"):
        check_class_balance(
            [True] * 2 + [False] * 6,
            load_config("smoke", ["method.name=kto", "method.desirable_weight=3.5"]).method,
        )
        check_class_balance([True, False], options)
    assert not [r for r in caplog.records if r.name == "sparsealign.methods"]

    data = _write(tmp_path / "u.jsonl", _items([True] * 6 + [False] * 2))
    with caplog.at_level(logging.WARNING, logger="sparsealign.methods"):
        Trainer(_config(tmp_path, data, "data.eval_fraction=0"))
    warnings = [r for r in caplog.records if "λ_D·n_D" in r.getMessage()]
    assert len(warnings) == 1 and "6 desirable and 2 undesirable" in warnings[0].getMessage()


def test_the_reference_cache_serves_binary_feedback(tmp_path: Path, monkeypatch) -> None:
    from sparsealign.api import train
    from sparsealign.models import loading
    from sparsealign.refcache.store import read_header, split_file
    from sparsealign.train import step
    from sparsealign.train.reference_cache import cache_run

    data = _write(tmp_path / "u.jsonl", _items([True, False, True, False, False, True, True, False]))
    overrides = ("data.eval_fraction=0.25", "train.batch_size=3", "train.max_steps=3")
    train(_config(tmp_path / "live", data, *overrides))
    cache = tmp_path / "cache"
    folder, built = cache_run(_config(tmp_path / "c", data, *overrides, f"reference.cache={cache}"))
    assert built and read_header(split_file(cache, "train"))["pairs"] == 6
    assert read_header(split_file(cache, "train"))["mismatched_responses"]

    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was constructed or run")

    monkeypatch.setattr(loading, "frozen_copy", refuse)
    monkeypatch.setattr(step, "reference_forward", refuse)
    monkeypatch.setattr(loading.ModelBundle, "reference_model", refuse)
    cached_cfg = _config(
        tmp_path / "cached", data, *overrides, f"reference.cache={cache}", "reference.build_missing=false"
    )
    train(cached_cfg)
    live, cached = _metrics(tmp_path / "live" / "run"), _metrics(tmp_path / "cached" / "run")
    assert len(live) == len(cached) == 4  # 3 steps and the final evaluation
    for a, b in zip(live, cached, strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "eval/loss", "eval/kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_kto_zero_reads_the_labels_with_the_reference_point_at_zero() -> None:
    """Two items, r = [1, −2] (β = 1, λ = 1): desirable 1 − σ(1), undesirable 1 − σ(2)."""
    from sparsealign.methods import StepOutputs, get_method
    from sparsealign.models.logprobs import TokenOutputs

    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    policy = TokenOutputs(torch.tensor([[-1.0, 0.5], [-3.0, 0.0]]), mask, torch.zeros(0, 1))
    reference = TokenOutputs(torch.tensor([[-0.5, -1.0], [-1.0, 0.0]]), mask, torch.zeros(0, 1))
    labels = torch.tensor([True, False])
    out = StepOutputs(policy, reference, num_pairs=2, labels=labels)
    options = load_config("smoke", ["method.name=kto-zero", "method.beta=1.0"]).method
    loss = get_method("kto-zero").loss(out, options)
    expected = ((1 - torch.sigmoid(torch.tensor(1.0))) + (1 - torch.sigmoid(torch.tensor(2.0)))) / 2
    assert loss.loss.item() == pytest.approx(expected.item())
    assert loss.metrics["kl"].item() == 0.0 and loss.metrics["rewards/rejected"].item() == pytest.approx(-2.0)
