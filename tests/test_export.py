"""``sparsealign export`` (eval/export.py): a plain Hugging Face folder that loads with from_pretrained and
generates what the run's own final model generates; LoRA runs merged (equal logits) or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsealign.api import load_config
from sparsealign.cli import main
from sparsealign.errors import ModelError
from sparsealign.eval.export import _prepare_tokenizer, export_run
from sparsealign.eval.run_model import EvalModel, load_eval_model
from tiny_models import train_smoke

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_smoke(tmp_path_factory.mktemp("full-run"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_smoke(tmp_path_factory.mktemp("lora-run"), "model.lora.r=4", "train.lr=0.05")


def _greedy(model: torch.nn.Module, ids: list[int], eos: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[0, len(ids) :].tolist()


def test_export_loads_plainly_and_generates_as_the_run(full_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    assert main(["export", str(full_run), "--out", str(out)]) == 0
    assert "exported a full model" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
    } <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    own = AutoModelForCausalLM.from_pretrained(full_run / "final").eval()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] is not None
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(full_run / "final").chat_template
    ids = tokenizer("Review 3: The plot")["input_ids"]
    tokens = _greedy(exported, ids, tokenizer.eos_token_id)
    assert len(tokens) > 0 and tokens == _greedy(own, ids, tokenizer.eos_token_id)
    for name, tensor in own.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name


def test_destination_rules(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty; pass --force"):
        export_run(full_run, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(full_run, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(ModelError, match="run folder or one of its parents"):
        export_run(full_run, full_run.parent, force=True)
    with pytest.raises(ModelError, match="not a run folder"):
        export_run(tmp_path, tmp_path / "x")


def test_lora_run_merged_logits_equal_the_adapters(lora_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="--merge-lora"):
        export_run(lora_run, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    result = export_run(lora_run, tmp_path / "merged", merge_lora=True)
    assert result.kind == "merged" and not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter = load_eval_model(str(lora_run)).model.eval()
    ids = torch.tensor(
        [AutoTokenizer.from_pretrained(tmp_path / "merged")("Review 9: The acting was")["input_ids"]]
    )
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits
        with adapter.disable_adapter():
            base = adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-4  # the adapter changed the model, so equality means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_runs_chat_template_goes_into_the_tokenizer(full_run: Path) -> None:
    loaded = load_eval_model(str(full_run))
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    data = load_config("smoke", [f"data.chat_template={template}"]).data
    tokenizer = _prepare_tokenizer(EvalModel(loaded.model, loaded.tokenizer, "x", data, loaded.config))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<<hi>>"
