"""What ``MODEL_OR_RUN`` names, loaded for evaluation: a run folder's trained model, or any ``model.name``.

A **run folder** (it holds ``config.yaml``) is loaded from its ``final/``: a full model (``config.json`` +
safetensors) or a LoRA adapter (``adapter_config.json``), which goes on top of the run's own base model
(``model.name`` of its config, built or loaded exactly as training did). The run's ``data`` section comes
with it, so prompts are formatted as the run's training prompts were (chat template, truncation), and
its config, so ``--control`` finds a conditional-SFT run's control texts.

Anything else is handed to :func:`sparsealign.models.loading.load_model` as ``model.name`` (a built-in, a
folder written by ``save_pretrained``, a hub id), with default data settings except that prompts are not
truncated.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsealign.config import Config, DataConfig, ModelConfig
from sparsealign.errors import ModelError

__all__ = ["EvalModel", "is_run_folder", "load_eval_model", "load_run_config", "run_final"]

logger = logging.getLogger(__name__)

UNTRUNCATED = 1 << 30
"""``max_prompt_length`` for a plain model: no prompt is cut."""


@dataclass
class EvalModel:
    """A model ready to sample: ``model`` (eval mode; a ``PeftModel`` for a LoRA run), its ``tokenizer``,
    the ``label`` written in sample files, the run's ``config`` (None for a plain model), the ``data``
    settings that format prompts, and the run folder (None for a plain model)."""

    model: Any
    tokenizer: Any
    label: str
    data: DataConfig
    config: Config | None = None
    run: Path | None = None
    is_lora: bool = False


def is_run_folder(spec: str | Path) -> bool:
    """True when ``spec`` is a folder with a ``config.yaml`` (a run folder)."""
    path = Path(spec).expanduser()
    return path.is_dir() and (path / "config.yaml").is_file()


def load_run_config(run: str | Path) -> Config:
    """The resolved configuration a run trained with (its ``config.yaml``)."""
    from sparsealign.recipes.load import load_config

    return load_config(Path(run).expanduser() / "config.yaml")


def run_final(run: str | Path) -> Path:
    """``run/final``, or a :class:`ModelError` saying that the run has no trained model yet."""
    final = Path(run).expanduser() / "final"
    if not final.is_dir():
        raise ModelError(
            f"Run folder '{run}' has no final/ (the run did not finish); finish it with "
            f"`sparsealign train {Path(run) / 'config.yaml'} train.resume=auto`, or pass a checkpoint-free "
            "model folder instead."
        )
    if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
        raise ModelError(
            f"'{final}' holds neither a model (config.json) nor a LoRA adapter (adapter_config.json)."
        )
    return final


def base_model_config(config: Config) -> ModelConfig:
    """The run's base model as evaluation loads it: no adapter, no quantisation."""
    return dataclasses.replace(config.model, lora=None, load_in_4bit=False, load_in_8bit=False)


def _load_run(run: Path, device: Any) -> EvalModel:
    from transformers import AutoTokenizer

    from sparsealign.models.loading import load_model

    config = load_run_config(run)
    final = run_final(run)
    label = run.resolve().name
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_model(base_model_config(config), config.train.seed, device)
        try:
            model = PeftModel.from_pretrained(base, str(final))
        except Exception as error:  # a mismatched adapter: say which one and against what
            raise ModelError(
                f"Could not load the LoRA adapter in '{final}' onto the run's base model "
                f"'{config.model.name}': {error}"
            ) from error
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(final))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return EvalModel(model, tokenizer, label, config.data, config, run, is_lora=True)
    plain = dataclasses.replace(
        base_model_config(config), name=str(final.resolve()), tokenizer=None, revision=None
    )
    model, tokenizer = load_model(plain, config.train.seed, device)
    return EvalModel(model, tokenizer, label, config.data, config, run)


def load_eval_model(spec: str, device: Any = None) -> EvalModel:
    """Load what ``spec`` names (see the module docstring) on ``device`` (CPU when None)."""
    if is_run_folder(spec):
        return _load_run(Path(spec).expanduser(), device)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "final").is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"'{spec}' has a final/ folder but no config.yaml, so it is not a run folder.")
    from sparsealign.models.loading import load_model

    model, tokenizer = load_model(ModelConfig(name=spec), 0, device)
    data = DataConfig(max_prompt_length=UNTRUNCATED, max_length=UNTRUNCATED + 1)
    return EvalModel(model, tokenizer, spec, data)
