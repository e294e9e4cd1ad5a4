"""SFT on conversations (``messages`` rows) and the three NLL normalisations, by hand-derived values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsealign.data.files import read_file
from sparsealign.data.formats import Skip, parse_rows, sft_examples
from sparsealign.errors import DataError
from sparsealign.losses import sft_loss

ULTRACHAT = Path(__file__).parent / "fixtures" / "ultrachat_sft.jsonl"
"""Eight rows in HuggingFaceH4/ultrachat_200k's schema (prompt, prompt_id, messages[{content, role}])."""

USER = {"role": "user", "content": "Q1"}
A1 = {"role": "assistant", "content": "A1"}
U2 = {"role": "user", "content": "Q2"}
A2 = {"role": "assistant", "content": "A2"}


def test_every_assistant_turn_is_an_example_prompted_by_what_precedes_it() -> None:
    examples = sft_examples([USER, A1, U2, A2], origin="f:1")
    assert [(e.prompt, e.chosen) for e in examples] == [([USER], [A1]), ([USER, A1, U2], [A2])]
    assert all(e.meta["sft_only"] and e.rejected == e.chosen for e in examples)
    (last,) = sft_examples([USER, A1, U2, A2], turns="last")
    assert last.prompt == [USER, A1, U2] and last.chosen == [A2]


def test_bad_conversations_are_counted_skips() -> None:
    assert sft_examples([USER]).reason == "missing_field"  # no assistant turn
    assert sft_examples([A1, USER, A2]).reason == "missing_field"  # an assistant turn with no prompt
    assert sft_examples([USER, {"role": "assistant", "content": " "}]).reason == "empty_response"
    assert isinstance(sft_examples("hello"), Skip)


def test_ultrachat_rows_parse_per_turn() -> None:
    examples, report = parse_rows(read_file(ULTRACHAT))
    assert report.skipped == 0 and report.total == 8
    assert len(examples) == 4 * (2 + 1)  # two assistant turns in the first conversation, one in the second
    examples, _ = parse_rows(read_file(ULTRACHAT), sft_turns="last")
    assert len(examples) == 8


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    return logps, mask


def test_sft_normalisations_by_hand(batch) -> None:
    logps, mask = batch
    # token: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert sft_loss(logps, mask, "token").loss.item() == pytest.approx(2.5)
    # sequence: mean(6/3, 4/1) = mean(2, 4) = 3
    assert sft_loss(logps, mask, "sequence").loss.item() == pytest.approx(3.0)
    # sum: mean(6, 4) = 5
    assert sft_loss(logps, mask, "sum").loss.item() == pytest.approx(5.0)
    out = sft_loss(logps, mask, "token")
    assert out.per_example.mean().item() == pytest.approx(out.loss.item())
    with pytest.raises(ValueError, match="normalize"):
        sft_loss(logps, mask, "mean")


def test_token_normalisation_gradient_is_uniform_per_token(batch) -> None:
    logps, mask = batch
    logps = logps.clone().requires_grad_(True)
    sft_loss(logps, mask, "token").loss.backward()
    assert torch.allclose(logps.grad, -mask / 4)  # every response token weighs 1/4
    logps.grad = None
    sft_loss(logps, mask, "sequence").loss.backward()
    expected = -torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [1.0, 0.0, 0.0, 0.0]]) / 2
    assert torch.allclose(logps.grad, expected)


def test_messages_rows_train_sft(tmp_path: Path) -> None:
    from sparsealign.api import train
    from sparsealign.recipes.load import load_config

    config = load_config(
        "smoke",
        [
            f"data.path={ULTRACHAT}",
            "data.chat_template=halos",
            "method.name=sft",
            "method.sft_normalize=token",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.save_every=0",
            "train.eval_every=0",
            "train.progress=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(config)
    assert result.steps == 2
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row and "nll" in row]
    assert len(steps) == 2 and all(
        row["loss"] == pytest.approx(row["nll"]) and row["loss"] > 0 for row in steps
    )


def test_messages_rows_refused_for_a_preference_method(tmp_path: Path) -> None:
    from sparsealign.api import train
    from sparsealign.recipes.load import load_config

    config = load_config(
        "smoke",
        [
            f"data.path={ULTRACHAT}",
            "data.chat_template=halos",
            "train.max_steps=1",
            "train.progress=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(DataError, match="method.name=sft"):
        train(config)


def test_the_papers_sft_recipes_carry_their_normalisation() -> None:
    """SparsePO's HH SFT ran TRL's SFTTrainer (token mean); FPO's UltraChat SFT ran HALOs' (per-response sum)."""
    from sparsealign.recipes.load import load_config

    hh = load_config("hh/sft-pythia-1.4b")
    assert (hh.method.name, hh.method.sft_normalize, hh.data.source, hh.data.add_bos) == (
        "sft",
        "token",
        "hh",
        True,
    )
    assert (hh.train.lr, hh.train.batch_size * hh.train.grad_accum * 4) == (1e-5, 1024)
    for size in ("2b", "9b"):
        uc = load_config(f"ultrachat/sft-gemma-2-{size}")
        assert (uc.method.sft_normalize, uc.data.source, uc.data.chat_template) == (
            "sum",
            "ultrachat",
            "halos",
        )
        assert (uc.data.sft_turns, uc.train.lr, uc.train.warmup_steps) == ("all", 5e-6, 150)
