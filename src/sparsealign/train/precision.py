"""Training precision (``train.precision``): the dtype of the trained weights, the dtype of the forward's
compute, and how the two meet.

========================  ==============================  ====================  ===========================
``train.precision``       trained weights, grads, Adam    forward compute       log-probs, KL, losses
========================  ==============================  ====================  ===========================
``fp32``                  float32                         float32               float32
``bf16-mixed``            float32 (the master copy)       bfloat16 (autocast)   float32
``fp16-mixed``            float32 (the master copy)       float16 (autocast),   float32
                                                          dynamic loss scaling
``bf16-pure``             bfloat16                        bfloat16              float32
``auto``                  ``bf16-mixed`` on a CUDA GPU with bfloat16 support (Ampere and newer), else ``fp32``
========================  ==============================  ====================  ===========================

Why master weights: AdamW's update is about ``lr`` per element whatever the gradient's size, while bfloat16
keeps 8 significant bits, so a weight ``w`` moves only if ``lr >= |w| * 2**-9`` (half its spacing). At the
paper learning rates (5e-7 to 1e-6) and weights of size 0.02 the update is a hundred times too small: it
rounds away and only the weights near zero ever change (about 1 % per step). The mixed modes keep the
weights in float32 and cast only the forward's matrix products to half precision (``torch.autocast``, Micikevicius
et al., 2018, "Mixed Precision Training"); ``bf16-pure`` is the dangerous mode, only on request, with a warning.

``auto`` never picks ``fp16-mixed``: models pretrained in bfloat16 can overflow float16's range (65504) in
their activations, which loss scaling does not prevent, so on a GPU without bfloat16 (V100, T4) ``auto`` is
``fp32`` and ``fp16-mixed`` is an explicit choice.

``model.dtype`` with a precision: ``auto`` loads float32 weights (bfloat16 in ``bf16-pure``); in the mixed
modes on CUDA the frozen reference copy is then stored in the compute dtype (its matrix products are in
that dtype anyway, and autocast would recast float32 weights on every forward). An explicit half
``model.dtype`` is the storage dtype of everything frozen (the reference, a LoRA base); the trained weights
are upcast to float32 in the mixed modes. LoRA adapters are float32 in every mode (PEFT's default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sparsealign.config import Config, ModelConfig, TrainConfig
from sparsealign.errors import ConfigError, TrainingError
from sparsealign.train.tensors import map_tensors

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "Precision",
    "accelerator_mixed_precision",
    "apply_precision",
    "build_accelerator",
    "describe",
    "precision_of",
    "resolve_precision",
    "training_model_config",
    "upcast",
]

PRECISIONS: tuple[str, ...] = typing.get_args(typing.get_type_hints(TrainConfig)["precision"])
"""The values of ``train.precision`` (from :class:`~sparsealign.config.TrainConfig`)."""

_COMPUTE = {
    "fp32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "fp16-mixed": torch.float16,
    "bf16-pure": torch.bfloat16,
}
_HALF_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

BF16_PURE_WARNING = (
    "train.precision=bf16-pure: weights, gradients and optimizer state are bfloat16, which keeps 8 "
    "significant bits, so an update smaller than about |w| / 512 is lost: at lr {lr:g} most weights will "
    "not change at all (the mean update is a few percent of the intended one). Use bf16-mixed (float32 "
    "master weights, bfloat16 compute) unless memory rules it out."
)


@dataclass(frozen=True)
class Precision:
    """A resolved ``train.precision`` (never ``auto``) on a device type (``cpu``, ``cuda``, ...)."""

    name: str
    device_type: str

    @property
    def mixed(self) -> bool:
        """Float32 master weights with a half-precision autocast forward."""
        return self.name.endswith("-mixed")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the forward's matrix products."""
        return _COMPUTE[self.name]

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype of the trained weights, their gradients and the optimizer state."""
        return torch.bfloat16 if self.name == "bf16-pure" else torch.float32

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """``torch.autocast`` to :attr:`compute_dtype` in the mixed modes, nothing otherwise."""
        if not self.mixed:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.compute_dtype):
            yield


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def _auto(device_type: str, model_dtype: str) -> str:
    """``auto``: an explicit half ``model.dtype`` asks for half-precision compute, so it gets the mixed mode
    of that dtype (float32 master weights); otherwise bf16-mixed on a CUDA GPU that supports bfloat16 and
    fp32 everywhere else (see the module docstring for why never fp16-mixed)."""
    if model_dtype == "bfloat16":
        return "bf16-mixed"
    if model_dtype == "float16":
        return "fp16-mixed"
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def resolve_precision(
    name: str, device: str | torch.device | None, model_dtype: str = "auto", lr: float | None = None
) -> Precision:
    """``train.precision`` on ``device`` with ``model.dtype``, checked: ``fp16-mixed`` needs CUDA, ``fp32``
    cannot train half-precision weights, ``bf16-pure`` bfloat16 ones. ``bf16-pure`` logs a warning naming
    the learning rate ``lr`` when given."""
    if name not in PRECISIONS:
        raise ConfigError(f"Unknown train.precision '{name}'; use one of {', '.join(PRECISIONS)}.")
    device_type = _device_type(device)
    resolved = _auto(device_type, model_dtype) if name == "auto" else name
    if resolved == "fp16-mixed" and device_type != "cuda":
        raise ConfigError(
            f"train.precision=fp16-mixed needs a CUDA GPU (this run is on {device_type}); use bf16-mixed or fp32."
        )
    if resolved == "fp32" and model_dtype in _HALF_NAMES:
        raise ConfigError(
            f"model.dtype={model_dtype} with train.precision=fp32 would train half-precision weights with no "
            "float32 master copy. Use train.precision=bf16-mixed (float32 trained weights, half-precision "
            "compute), or model.dtype=auto for full float32."
        )
    if resolved == "bf16-pure" and model_dtype not in ("auto", "bfloat16"):
        raise ConfigError(
            f"train.precision=bf16-pure trains bfloat16 weights; model.dtype={model_dtype} contradicts it "
            "(use model.dtype=auto)."
        )
    if resolved == "bf16-pure" and lr is not None:
        logger.warning(BF16_PURE_WARNING.format(lr=lr))
    return Precision(resolved, device_type)


def training_model_config(model: ModelConfig, precision: Precision) -> ModelConfig:
    """The :class:`ModelConfig` a training run loads with: ``model.dtype=auto`` made explicit for the
    precision (float32, or bfloat16 in ``bf16-pure``); an explicit ``model.dtype`` is kept."""
    if model.dtype != "auto":
        return model
    return dataclasses.replace(model, dtype="bfloat16" if precision.name == "bf16-pure" else "float32")


def apply_precision(bundle: Any, precision: Precision, model_dtype: str = "auto") -> None:
    """Put a freshly loaded :class:`~sparsealign.models.loading.ModelBundle` in the precision's dtypes.

    Mixed modes: every trained parameter (``requires_grad``) of the policy becomes float32, the master copy
    (a no-op when loaded in float32; LoRA adapters already are); with ``model.dtype=auto`` on CUDA the frozen
    reference copy is stored in the compute dtype. Quantised (non-float) weights are never touched."""
    if not precision.mixed:
        return
    with torch.no_grad():
        for param in bundle.policy.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
    if model_dtype == "auto" and precision.device_type == "cuda" and bundle.reference is not None:
        bundle.reference.to(precision.compute_dtype)


def accelerator_mixed_precision(precision: Precision) -> str:
    """accelerate's ``mixed_precision`` for the precision: ``bf16``/``fp16`` in the mixed modes (autocast of
    the prepared model, FSDP's and DeepSpeed's mixed-precision settings, fp16's loss scaler), else ``no``."""
    return {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(precision.name, "no")


def build_accelerator(precision: Precision, **kwargs: Any) -> Any:
    """``accelerate.Accelerator(mixed_precision=..., **kwargs)`` for the precision; the trainer's value
    overrides the ``mixed_precision`` of an ``accelerate launch`` config.

    accelerate keeps one ``AcceleratorState`` per process and refuses a second Accelerator with another
    ``mixed_precision``; a single process that trains again in another precision (the Python API, tests)
    gets a fresh state. Several processes cannot: that is a :class:`TrainingError`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    wanted = accelerator_mixed_precision(precision)
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != wanted:
        if PartialState().num_processes > 1:
            raise TrainingError(
                f"This process already trained with accelerate mixed_precision={held!r}; with several "
                f"processes a run in another precision ({precision.name}) needs new processes."
            )
        AcceleratorState._reset_state()  # accelerate's own way to drop its per-process state
    return Accelerator(mixed_precision=wanted, **kwargs)


def upcast(value: Any) -> Any:
    """``value`` with every bfloat16/float16 tensor in it (nested in dataclasses, tuples, lists and dicts)
    turned to float32, so that what a loss reads is float32 whatever the forward's compute dtype; other
    values are returned as they are (the same objects when nothing changes)."""
    return map_tensors(value, lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t)


def describe(precision: Precision) -> str:
    """One line for the log: the precision and what it means."""
    master = str(precision.master_dtype).removeprefix("torch.")
    compute = str(precision.compute_dtype).removeprefix("torch.")
    return f"precision {precision.name}: {master} trained weights, {compute} compute, float32 losses"


def precision_of(cfg: Config, device: str | torch.device | None) -> Precision:
    """:func:`resolve_precision` of a config's ``train.precision`` and ``model.dtype`` (no warning)."""
    return resolve_precision(cfg.train.precision, device, cfg.model.dtype)
