"""``sparsealign export RUN --out DIR``: a run's trained model as a plain Hugging Face model folder.

The folder holds ``config.json``, the weights as safetensors, the tokenizer with the chat template the run
formatted conversations with (``data.chat_template`` when the run set one, else the tokenizer's own),
``generation_config.json`` with the EOS and pad ids sampling stops and pads with, and a ``README.md`` that
says where it came from. ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer`` load it, so
lm-evaluation-harness, the bigcode harness, HumanRankEval, AlpacaEval and Arena-Hard (through vLLM or
transformers) consume it as any hub model.

LoRA runs: ``merge_lora`` merges the adapter into the base weights (``W + (alpha/r) B A``, PEFT's
``merge_and_unload``) and writes a full model. Without it the adapter itself is written
(``adapter_config.json`` + ``adapter_model.safetensors``; ``from_pretrained`` loads it through PEFT by
fetching the base it names), but only when that base is a hub id: a base that is a folder on this machine
(a built-in, a local model) would not load anywhere else, so that export is refused with the reason.

Weights keep the dtype they were stored in (``final/config.json``; for a LoRA run, its base's when the
base is a local folder). The folder is written atomically; a non-empty ``DIR`` is replaced only with
``force``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsealign.errors import ModelError
from sparsealign.eval.run_model import EvalModel, is_run_folder, load_eval_model, run_final
from sparsealign.io import atomic_folder

__all__ = ["ExportResult", "export_run"]

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """Where the folder went, and whether it holds a full model (``merged`` for a merged LoRA run) or an
    adapter over ``base``."""

    folder: Path
    kind: str
    base: str | None = None


def _check_destination(run: Path, out: Path, force: bool) -> None:
    target, source = out.resolve(), run.resolve()
    if target == source or target in source.parents:
        raise ModelError(f"--out '{out}' is the run folder or one of its parents; export to another folder.")
    if out.exists() and not out.is_dir():
        raise ModelError(f"--out '{out}' is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelError(f"--out '{out}' is not empty; pass --force to replace it, or choose another folder.")


def _stored_dtype(folder: Path) -> str | None:
    """The dtype a model folder's ``config.json`` records (``dtype`` or the older ``torch_dtype``)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in ("float32", "float16", "bfloat16") else None


def _adapter_base(final: Path) -> str:
    config = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path") or "")


def _is_hub_id(name: str) -> bool:
    return bool(name) and not Path(name).expanduser().exists() and not name.startswith(("/", ".", "~"))


def _prepare_tokenizer(loaded: EvalModel) -> Any:
    """The tokenizer with the run's chat template (``data.chat_template`` replaces the tokenizer's own)."""
    from sparsealign.data.tokenize import resolve_chat_template

    tokenizer = loaded.tokenizer
    if loaded.data.chat_template:
        tokenizer.chat_template = resolve_chat_template(tokenizer, loaded.data.chat_template)
    return tokenizer


def _readme(run: Path, loaded: EvalModel, kind: str, base: str | None) -> str:
    config = loaded.config
    assert config is not None
    method = config.method.name
    lines = [
        f"# {run.resolve().name} (exported by sparsealign)",
        "",
        f"- run: `{run.resolve()}`",
        f"- method: `{method}`; base model: `{config.model.name}`",
    ]
    if kind == "adapter":
        lines += [
            f"- this folder is a LoRA adapter over `{base}`: `AutoModelForCausalLM.from_pretrained(DIR)` loads",
            "  it through PEFT (peft must be installed) and downloads that base; export with `--merge-lora` for",
            "  a plain full model.",
        ]
    elif kind == "merged":
        lines.append("- the run's LoRA adapter is merged into the base weights: a plain full model.")
    if config.data.chat_template:
        lines.append("- the tokenizer carries the chat template the run trained with (data.chat_template).")
    good = getattr(config.method, "good_token", None)  # conditional SFT: sampling needs the control text
    if good is not None:
        lines.append(
            f"- conditional SFT: append the control text {good!r} to each prompt before generating "
            "(`sparsealign sample RUN --control good` does)."
        )
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    lines += [
        'model = AutoModelForCausalLM.from_pretrained("DIR")',
        'tokenizer = AutoTokenizer.from_pretrained("DIR")',
    ]
    lines += ["```", ""]
    return "\n".join(lines)


def export_run(
    run: str | Path, out: str | Path, merge_lora: bool = False, force: bool = False
) -> ExportResult:
    """Write run ``run``'s ``final/`` model to ``out`` as a plain Hugging Face folder (module docstring)."""
    import torch

    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not is_run_folder(run):
        raise ModelError(
            f"'{run}' is not a run folder (no config.yaml); export takes a folder written by training."
        )
    final = run_final(run)
    _check_destination(run, out, force)
    lora = (final / "adapter_config.json").is_file()
    base = _adapter_base(final) if lora else None
    if lora and not merge_lora and not _is_hub_id(base or ""):
        raise ModelError(
            f"'{run}' is a LoRA run whose base is '{base}', a folder on this machine, so an adapter-only export "
            "would not load elsewhere; pass --merge-lora to write a plain full model."
        )
    if merge_lora and not lora:
        logger.info("--merge-lora: '%s' trained all weights (no adapter); exporting the full model", run)
    loaded = load_eval_model(str(run))
    model = loaded.model
    kind = "full"
    dtype = _stored_dtype(final)
    if lora and merge_lora:
        with warnings.catch_warnings():  # PEFT 0.21 trips a transformers 5 deprecation; not actionable here
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = model.merge_and_unload()
        kind = "merged"
        dtype = _stored_dtype(Path(base)) if base and Path(base).is_dir() else None
    elif lora:
        kind = "adapter"
    if dtype is not None and kind != "adapter":
        model = model.to(getattr(torch, dtype))
    tokenizer = _prepare_tokenizer(loaded)
    if kind != "adapter":
        generation = model.generation_config
        from sparsealign.models.generate import eos_ids

        eos = eos_ids(model, tokenizer)
        generation.eos_token_id = eos[0] if len(eos) == 1 else eos
        generation.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    try:
        with atomic_folder(out) as work:
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
            (work / "README.md").write_text(_readme(run, loaded, kind, base), encoding="utf-8")
    except OSError as error:
        raise ModelError(f"Could not write the export to '{out}': {error}") from error
    return ExportResult(out, kind, base if kind == "adapter" else None)
