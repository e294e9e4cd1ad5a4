"""FPO: Feature-level constrained Preference Optimization (Yin et al. 2024, arXiv:2411.07618).

FPO is a length-normalised DPO whose logit carries a TDPO2-shaped constraint on the drift of sparse
autoencoder (SAE) features between the policy and the reference model:

    u = β (ā_w − ā_l) − α β (D_l − sg(D_w)),      loss = −log σ(u)  (mean over pairs),

where ā is the mean per-token log-ratio log π_θ − log π_ref over a response, ``sg`` is stop-gradient and
D is the feature discrepancy of a response: the mean squared difference between the token-pooled SAE
codes of the policy and of the reference over a set I of top-k feature indices.

Three pure pieces, so that a trainer can compute the SAE codes however it likes:

* :func:`pool_features` — masked mean of per-token codes over the response tokens, ``[B, T, F] -> [B, F]``;
* :func:`feature_distance` — D from pooled policy and reference codes, ``[B, F] x 2 -> [B]``;
* :func:`fpo_loss` — the loss from per-token log-probs and the two D vectors;
* :func:`active_features` — a logging helper: mean number of non-zero pooled features per row.

Differences from the released code (``feature_alignment/model/fpo.py``) and the paper's Eq. 10, on purpose:

* Pooling divides by the number of response tokens of each row; the release multiplies by the response
  mask and then averages over the full padded length (prompt and padding included), which makes D depend
  on the padding and the prompt length.
* The index set is selectable: the release takes the top-k of the **policy** row only
  (``index_set="policy"``); the paper prints the **union** of the policy and reference top-k
  (``index_set="union"``); the default here is the **reference** top-k (``"reference"``), a set that does
  not move with the policy being trained.
* D is divided by |I|, the size of the selected set; the paper divides by k even for the union, whose size
  lies between k and 2k (for ``"policy"``/``"reference"`` |I| = k, so the two agree there).
* k is an argument (the release hard-codes 50), clamped to the number of features.
* The release also computes a full-vocabulary TDPO KL that it only logs; it is not computed here.
* Logged rewards are β·ā per side (the release logs β·(ā + D)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsealign.losses.base import LossOutput, check_shapes, masked_mean, masked_sum, paired_metrics

__all__ = ["active_features", "feature_distance", "fpo_loss", "pool_features"]

INDEX_SETS = ("reference", "policy", "union")


def pool_features(codes: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of per-token SAE codes over the response tokens: ``[B, T, F] -> [B, F]``.

        c̄_b = Σ_t mask[b, t] · codes[b, t, :] / Σ_t mask[b, t]

    The division is by the number of response tokens of row b (not by the padded length T, unlike the
    released FPO code). A row with no response tokens gives zeros. ``mask`` is ``[B, T]``, bool or 0/1.
    """
    if codes.dim() != 3:
        raise ValueError(f"expected [B, T, F] codes, got shape {tuple(codes.shape)}")
    if mask.shape != codes.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match codes {tuple(codes.shape[:2])}")
    weights = mask.to(codes.dtype)
    lengths = weights.sum(dim=-1).clamp_min(1)
    return (codes * weights.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(-1)


def _topk_mask(values: Tensor, k: int) -> Tensor:
    """Bool ``[B, F]`` with True at the k largest entries of each row (ties broken by ``torch.topk``)."""
    indices = values.detach().topk(k, dim=-1).indices
    return torch.zeros(values.shape, dtype=torch.bool, device=values.device).scatter_(-1, indices, True)


def feature_distance(
    policy_pooled: Tensor, ref_pooled: Tensor, k: int = 50, index_set: str = "reference"
) -> Tensor:
    """FPO feature discrepancy D (paper Eq. 10, with 1/|I| instead of 1/k): ``[B, F] x 2 -> [B]``.

        D_b = (1/|I_b|) · Σ_{i ∈ I_b} (c̄_θ[b, i] − c̄_ref[b, i])²

    with I_b the indices of the k largest values (SAE codes are non-negative) of

    * ``"reference"`` — the reference row c̄_ref[b] (|I_b| = k);
    * ``"policy"`` — the policy row c̄_θ[b] (|I_b| = k; what the released code does);
    * ``"union"`` — both, I_b = topk(c̄_θ[b]) ∪ topk(c̄_ref[b]) (k ≤ |I_b| ≤ 2k; the paper's set).

    k larger than F is clamped to F. The selection is computed on detached values and is not
    differentiable: gradients reach the inputs only through the squared differences at the selected
    indices.
    """
    if index_set not in INDEX_SETS:
        raise ValueError(f"unknown index_set {index_set!r}; expected one of {', '.join(INDEX_SETS)}")
    if policy_pooled.dim() != 2:
        raise ValueError(f"expected [B, F] pooled codes, got shape {tuple(policy_pooled.shape)}")
    if ref_pooled.shape != policy_pooled.shape:
        raise ValueError(f"shape mismatch: {tuple(ref_pooled.shape)} vs {tuple(policy_pooled.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, policy_pooled.shape[-1])

    with torch.no_grad():
        if index_set == "reference":
            selected = _topk_mask(ref_pooled, k)
        elif index_set == "policy":
            selected = _topk_mask(policy_pooled, k)
        else:
            selected = _topk_mask(ref_pooled, k) | _topk_mask(policy_pooled, k)
    weights = selected.to(policy_pooled.dtype)
    squared = (policy_pooled - ref_pooled).pow(2)
    return (squared * weights).sum(dim=-1) / weights.sum(dim=-1)


def active_features(pooled: Tensor) -> Tensor:
    """Mean over rows of the number of non-zero features in each pooled row: ``[B, F] -> []`` (detached).

    The paper's "number of active features" diagnostic; a trainer can log it for the policy and the
    reference pooled codes of each side (e.g. ``fpo/active_features_chosen``).
    """
    if pooled.dim() != 2:
        raise ValueError(f"expected [B, F] pooled codes, got shape {tuple(pooled.shape)}")
    dtype = pooled.dtype if pooled.is_floating_point() else torch.get_default_dtype()
    return (pooled.detach() != 0).sum(dim=-1).to(dtype).mean()


def fpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    feature_dist_chosen: Tensor,
    feature_dist_rejected: Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    stop_grad_chosen: bool = True,
) -> LossOutput:
    """Feature-level constrained Preference Optimization (Yin et al. 2024, "Direct Preference
    Optimization Using Sparse Feature-Level Constraints", arXiv:2411.07618, Eq. 11).

    Per-token log-probs are ``[B, T]`` with masks; ``feature_dist_*`` are ``[B]`` feature discrepancies D
    (see :func:`feature_distance`). With ā = masked mean over the response of (log π_θ − log π_ref):

        u = β (ā_w − ā_l) − α β (D_l − sg(D_w)),      loss = −log σ(u),  mean over pairs.

    ``sg`` (detach) applies with ``stop_grad_chosen=True`` (the paper); with ``False`` D_w also receives
    gradient. The value of u is the same either way. α = 0 gives a length-normalised DPO.

    Metrics: the paired metrics with rewards β·ā of each side (log-probs summed over the response, as in
    the other losses), ``fpo/feature_dist_chosen`` and ``fpo/feature_dist_rejected`` (batch means of D),
    ``logits/reward_part`` = β(ā_w − ā_l) and ``logits/feature_part`` = −αβ(D_l − D_w) (batch means),
    whose sum is u.
    """
    check_shapes(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        mask_chosen,
        mask_rejected,
    )
    batch_size = policy_chosen_logps.shape[0]
    for name, dist in (
        ("feature_dist_chosen", feature_dist_chosen),
        ("feature_dist_rejected", feature_dist_rejected),
    ):
        if dist.shape != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(dist.shape)}")
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")

    chosen_logratio = masked_mean(policy_chosen_logps - ref_chosen_logps, mask_chosen)
    rejected_logratio = masked_mean(policy_rejected_logps - ref_rejected_logps, mask_rejected)
    dist_w = feature_dist_chosen.detach() if stop_grad_chosen else feature_dist_chosen

    reward_part = beta * (chosen_logratio - rejected_logratio)
    feature_part = -alpha * beta * (feature_dist_rejected - dist_w)
    logits = reward_part + feature_part
    per_example = -F.logsigmoid(logits)

    metrics = paired_metrics(
        beta * chosen_logratio,
        beta * rejected_logratio,
        masked_sum(policy_chosen_logps, mask_chosen),
        masked_sum(policy_rejected_logps, mask_rejected),
    )
    metrics.update(
        {
            "fpo/feature_dist_chosen": feature_dist_chosen.mean().detach(),
            "fpo/feature_dist_rejected": feature_dist_rejected.mean().detach(),
            "logits/reward_part": reward_part.mean().detach(),
            "logits/feature_part": feature_part.mean().detach(),
        }
    )
    return LossOutput(loss=per_example.mean(), per_example=per_example, metrics=metrics)
