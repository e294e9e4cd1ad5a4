"""Training a TopK sparse autoencoder on a model's activations, streamed (``sparsealign sae train``).

Model and objective: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093).
Encoder and decoder (§2.3; the :class:`~sparsealign.sae.model.SparseAutoencoder` with ``activation="topk"``
and ``apply_b_dec_to_input=True``)::

    z = TopK(ReLU((x - b_dec) @ W_enc + b_enc))         W_enc [d_in, d_sae], b_enc [d_sae]
    x̂ = z @ W_dec + b_dec                              W_dec [d_sae, d_in] (unit-norm rows), b_dec [d_in]

One module per concern, each importing only the ones listed before it:

``config``
    :class:`SAETrainConfig`, its checks and derived defaults (lr, k_aux, dead window, dtype).
``documents``
    The training text: IMDB reviews or a local file.
``stream``
    :class:`ActivationStream`: tokenised documents → activations at the hook site → shuffled batches.
``kernels``
    :func:`topk_encode`: the TopK forward with a sparse backward.
``loss``
    :func:`normalized_mse` and :func:`auxk_loss` (the objective, §2.1 and §A.2).
``trainer``
    :class:`TopKSAETrainer`: initialisation, Adam steps, dead latents, the final un-scaling.
``metrics``
    :func:`evaluate_sae`: held-out FVU, L0, dead fraction.
``run``
    :func:`train_sae`: all of the above end to end, written atomically with ``metrics.json``.
"""

from __future__ import annotations

from sparsealign.sae.training.config import SAETrainConfig, default_lr
from sparsealign.sae.training.documents import load_documents
from sparsealign.sae.training.kernels import sparse_decode, topk_encode
from sparsealign.sae.training.loss import auxk_loss, normalized_mse
from sparsealign.sae.training.metrics import evaluate_sae
from sparsealign.sae.training.run import METRICS_FILE, SAETrainResult, train_sae
from sparsealign.sae.training.stream import (
    ActivationStream,
    drop_outliers,
    kept_positions,
    pad_right,
    resolve_prefix,
    run_to_site,
    site_activations,
    tokenize_documents,
)
from sparsealign.sae.training.trainer import StepStats, TopKSAETrainer, geometric_median, init_topk_sae

__all__ = [
    "METRICS_FILE",
    "ActivationStream",
    "SAETrainConfig",
    "SAETrainResult",
    "StepStats",
    "TopKSAETrainer",
    "auxk_loss",
    "default_lr",
    "drop_outliers",
    "evaluate_sae",
    "geometric_median",
    "init_topk_sae",
    "kept_positions",
    "load_documents",
    "normalized_mse",
    "pad_right",
    "resolve_prefix",
    "run_to_site",
    "site_activations",
    "sparse_decode",
    "tokenize_documents",
    "topk_encode",
    "train_sae",
]
