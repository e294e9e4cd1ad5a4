"""Experiment trackers (``train.tracker``): refuse a tracker whose package is missing before any work starts.

accelerate only warns and logs nothing when a tracker's package is absent, so a run that the user believes
is being tracked would be lost. :func:`require_tracker` names the pip extra that installs it instead.
"""

from __future__ import annotations

import importlib.util

from sparsealign.errors import TrainingError

# tracker name -> (importable modules, any of which accelerate accepts; the sparsealign extra installing one)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def require_tracker(name: str) -> None:
    """Raise :class:`TrainingError` with the install line when tracker ``name``'s package is missing;
    ``"none"`` needs nothing."""
    if name == "none":
        return
    if name not in TRACKERS:
        raise TrainingError(f"Unknown train.tracker={name!r}; one of: none, {', '.join(TRACKERS)}.")
    modules, extra = TRACKERS[name]
    if not any(_installed(module) for module in modules):
        raise TrainingError(
            f"train.tracker={name} needs the {modules[0]} package: pip install 'sparsealign[{extra}]' "
            "(or set train.tracker=none)."
        )
