"""Atomic checkpoints under ``output_dir/checkpoints/step-N/`` and finding the one to resume from.

A checkpoint holds the trainable parameters (the whole model, or only the LoRA adapter and other trainable
modules) as safetensors, the optimizer and scheduler state, every process's RNG states, and ``state.json``
(step, data position, and the run's configuration). It is written to a hidden temporary folder and renamed
into place, so a checkpoint folder is either complete or absent; ``state.json`` is written last.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsealign.errors import CheckpointError
from sparsealign.io import atomic_folder

STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_DIR = re.compile(r"^\.step-\d+\.tmp-")  # what a kill during an atomic_folder write leaves

logger = logging.getLogger("sparsealign.train")

# Keys that may change between a run and its resumption without changing the trajectory.
RESUMABLE_DIFFERENCES = {
    "output_dir",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.log_every",
    "train.eval_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.overwrite",
    "train.progress",
    "train.tracker",
    "eval.generate",
    "eval.max_batches",
    "eval.batch_size",
    "eval.max_new_tokens",
    "eval.samples_per_prompt",
    "eval.temperature",
    "model.merge_final",
}


@dataclass
class TrainState:
    """Where training stands: optimizer steps done (the data position follows from it) and the run's
    wall-clock seconds so far, which ``metrics.jsonl``'s ``elapsed_s`` continues from on resumption."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, over the whole run


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tuples, ints, floats and tensors only, so that the
    ``rng-<rank>.pt`` files load with ``torch.load(weights_only=True)`` (no pickled numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "columns":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ in a way that would change the training trajectory."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUMABLE_DIFFERENCES and a.get(k) != b.get(k)]


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    config: dict[str, Any],
    rng_states: list[dict[str, Any]],
) -> Path:
    """Write ``folder`` atomically (:func:`sparsealign.io.atomic_folder`). Called on the main process."""
    with atomic_folder(folder) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng-{rank}.pt")
        payload = {
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "elapsed_s": round(state.elapsed_s, 3),
            "bad_steps": state.bad_steps,
            "config": config,
        }
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    return folder


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with ``state.json``), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """What a run killed while writing a checkpoint leaves in ``checkpoints/``: the hidden temporary folder of
    :func:`sparsealign.io.atomic_folder`, or a ``step-N`` folder without ``state.json``."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if PARTIAL_DIR.match(p.name) or (STEP_DIR.match(p.name) and not (p / "state.json").is_file())
    )


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``auto``: newest complete checkpoint or None; a path: that checkpoint (must be complete). Incomplete
    checkpoints (a kill during a write) are ignored with a note and deleted."""
    if resume is None:
        return None
    if resume == "auto":
        for partial in incomplete_checkpoints(output_dir):
            logger.warning(
                "ignoring and deleting the incomplete checkpoint %s (a write was cut short)", partial
            )
            shutil.rmtree(partial, ignore_errors=True)
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(
            f"'{resume}' is not a complete checkpoint (no state.json). Use train.resume=auto or a step-N folder."
        )
    return path


def _load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, never pickled code."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - a file that holds other objects is refused, not unpickled
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} cannot be read safely (torch.load with weights_only=True: {detail}); it may come from an "
            "older sparsealign. Start afresh with train.resume=null in another output_dir."
        ) from error


def check_same_run(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``state.json``; :class:`CheckpointError` listing the differing keys (up to five, with
    both values) when it was written by a run whose trajectory ``config`` would not continue."""
    payload = json.loads((folder / "state.json").read_text())
    differences = config_differences(payload["config"], config)
    if differences:
        shown = ", ".join(
            f"{k} (checkpoint: {flatten(payload['config']).get(k)!r}, now: {flatten(config).get(k)!r})"
            for k in differences[:5]
        )
        raise CheckpointError(
            f"Checkpoint {folder} belongs to a different run: {shown}. "
            "Use another output_dir, or train.resume=null to start afresh."
        )
    return payload


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    rank: int,
) -> TrainState:
    """Restore model, optimizer, scheduler and this process's RNG; refuse a checkpoint of another run."""
    payload = check_same_run(folder, config)
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    unexpected = [name for name in weights if name not in params]
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {folder} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(_load_tensors(folder / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(folder / "scheduler.pt"))
    rng_file = folder / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(_load_tensors(rng_file))
    return TrainState(
        payload["step"],
        payload["epoch"],
        payload["batch_in_epoch"],
        payload.get("elapsed_s", 0.0),
        payload.get("bad_steps", 0),
    )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines logged after ``step`` (they belong to the part of the run being redone)."""
    if not path.is_file():
        return
    kept: Iterable[str] = (
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    )
    path.write_text("".join(f"{line}\n" for line in kept))
