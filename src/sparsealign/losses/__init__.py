"""Pure loss functions on per-token log-probs (``[B, T]`` tensors plus masks); no model inside.

Each returns a :class:`LossOutput` with ``loss`` (scalar), ``per_example`` (``[B]``) and ``metrics``.
"""

from __future__ import annotations

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum, paired_metrics
from sparsealign.losses.dpo import dpo_loss, ipo_loss
from sparsealign.losses.fpo import active_features, feature_distance, fpo_loss, pool_features
from sparsealign.losses.kto import kto_loss, kto_reference_point
from sparsealign.losses.sft import sft_loss
from sparsealign.losses.simpo import simpo_loss
from sparsealign.losses.sparsepo import sparsepo_loss
from sparsealign.losses.tdpo import tdpo_loss

__all__ = [
    "LossOutput",
    "active_features",
    "check_shapes",
    "dpo_loss",
    "feature_distance",
    "fpo_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "masked_mean",
    "masked_sum",
    "paired_metrics",
    "pool_features",
    "sft_loss",
    "simpo_loss",
    "sparsepo_loss",
    "tdpo_loss",
]
