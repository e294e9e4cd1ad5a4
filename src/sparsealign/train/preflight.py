"""Checks before any expensive work: what would otherwise fail minutes (or a download) into a run.

:func:`preflight` runs in :func:`sparsealign.train.loop.build` before the accelerator, the models or the data
are loaded; :func:`check_resume` runs once the run's configuration is resolved, still before any model
loads. Each refusal is a :class:`~sparsealign.errors.UserError`: one line, exit status 2 on the command line.

* **Output folder**: ``output_dir`` (or, when it does not exist yet, its nearest existing parent) must be
  writable, and its file system must have room for what the run writes (:func:`estimate_bytes`).
* **Data**: a ``data.path`` read directly (no ``data.source``) must be an existing file.
* **Model**: a folder must exist and hold ``config.json``; a hub id must be reachable or cached, which an
  offline machine finds out within seconds (:func:`sparsealign.models.loading.locate_model`).
* **Resumption**: the checkpoint ``train.resume`` points at must come from the same run: the keys whose
  values differ are listed (:func:`sparsealign.train.checkpoint.check_same_run`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from sparsealign.config import Config
from sparsealign.errors import DataError, RunFolderError
from sparsealign.models.loading import locate_model
from sparsealign.train.checkpoint import check_same_run

BYTES_PER_TRAINABLE = 12
"""A checkpoint's bytes per trainable parameter: float32 weights (4) and AdamW's two float32 moments (8)."""

_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1}


def safetensors_parameters(folder: Path) -> tuple[int, int]:
    """``(parameters, bytes)`` of the ``*.safetensors`` files in ``folder``, read from their headers only
    (an 8-byte little-endian length, then a JSON map of tensor name to dtype and shape)."""
    count = size = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in entry["shape"]:
                n *= dim
            count += n
            size += n * _DTYPE_BYTES.get(entry["dtype"], 4)
    return count, size


def checkpoints_written(cfg: Config) -> int:
    """How many checkpoints exist at once at most: ``train.keep_checkpoints``, else one per ``save_every``
    steps plus the last (one when the number of steps is only known from the data)."""
    t = cfg.train
    saves = 1 + (t.max_steps // t.save_every if t.save_every and t.max_steps else 0)
    return min(saves, t.keep_checkpoints) if t.keep_checkpoints else saves


def estimate_bytes(cfg: Config, model_folder: Path | None) -> int:
    """Bytes the run writes, at least: kept checkpoints x trainable parameters x
    :data:`BYTES_PER_TRAINABLE`, plus ``final/`` (the weights as stored). Only a model with a local folder is
    counted (0 otherwise); with LoRA only ``final/``'s adapter is small, so only the kept checkpoints'
    optimizer state of the adapter would count: the estimate is 0 then too."""
    if model_folder is None or cfg.model.lora is not None:
        return 0
    params, stored = safetensors_parameters(model_folder)
    return checkpoints_written(cfg) * params * BYTES_PER_TRAINABLE + stored


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_output_folder(cfg: Config, needed: int) -> None:
    """``output_dir`` writable (or creatable) with ``needed`` bytes free on its file system."""
    output_dir = Path(cfg.output_dir)
    where = _existing_parent(output_dir)
    if not where.is_dir():
        return  # a file: check_output_dir refuses it with its own message
    if not os.access(where, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"Cannot write output_dir={output_dir}: {where} is not writable by this user. Choose another "
            "output_dir."
        )
    free = shutil.disk_usage(where).free
    if needed > free:
        raise RunFolderError(
            f"Not enough free space for output_dir={output_dir}: the run writes about {_gib(needed)} "
            f"({checkpoints_written(cfg)} checkpoint(s) of weights and optimizer state, and final/) but "
            f"{where} has {_gib(free)} free. Free some space, lower train.keep_checkpoints, or choose "
            "another output_dir."
        )


def check_data(cfg: Config) -> None:
    """A ``data.path`` read directly (no ``data.source``) must exist as a file."""
    path = cfg.data.path
    if cfg.data.source is None and path is not None and not Path(path).expanduser().is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise DataError(f"data.path={path} {what}. Give a .jsonl, .json, .parquet or .csv file.")


def preflight(cfg: Config) -> None:
    """The checks of this module that need no resolved configuration; see the module docstring."""
    check_data(cfg)
    folder = locate_model(cfg.model.name, cfg.model.revision)
    check_output_folder(cfg, estimate_bytes(cfg, folder))


def check_resume(resume_from: Path | None, config_tree: dict[str, Any]) -> None:
    """A checkpoint to resume from must come from this run (differing keys listed)."""
    if resume_from is not None:
        check_same_run(resume_from, config_tree)
