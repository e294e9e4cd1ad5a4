"""FPO (feature-level preference optimisation, arXiv:2507.08134 as specified in shared/specs/fpo.md): SimPO's
length-normalised margin plus a constraint on the pooled sparse-autoencoder features of one layer, with the
reference side servable from the offline cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparsealign.config import Config, ConfigError
from sparsealign.losses import LossOutput, active_features, feature_distance, fpo_loss
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register


@dataclass
class FPOOptions(MethodOptions):
    beta: float = option("Inverse temperature β of the log-ratio margin.", 0.1)
    alpha: float = option("Weight α of the feature-distance term.", 0.5)
    k: int = option("Size of the top-k feature index set.", 50)
    index_set: Literal["reference", "policy", "union"] = option(
        "Whose top-k features are constrained: the reference's, the policy's, or their union.", "reference"
    )
    stop_grad_chosen: bool = option("Stop the gradient through the chosen response's feature distance.", True)
    pool_positions: Literal["response", "predicting"] = option(
        "Where SAE codes are averaged: the response tokens' own positions (the paper's formula), or the "
        "positions that predict them (the released FPO code: the last prompt token included, EOS excluded).",
        "response",
    )


def fpo(out: StepOutputs, options: FPOOptions) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    d_w = feature_distance(pc.features, rc.features, options.k, options.index_set)
    d_l = feature_distance(pr.features, rr.features, options.k, options.index_set)
    result = fpo_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, d_w, d_l,
        beta=options.beta, alpha=options.alpha, stop_grad_chosen=options.stop_grad_chosen,
    )  # fmt: skip
    result.metrics["fpo/active_features"] = active_features(out.policy.features)
    return result


def _check(config: Config) -> None:
    m, top_k = config.method, config.reference.feature_top_k
    if top_k is not None and (m.index_set != "reference" or m.k > top_k):
        raise ConfigError(
            f"'reference.feature_top_k={top_k}' keeps only the reference's top {top_k} codes, which is exact "
            f"only for method.index_set=reference with method.k <= {top_k} (got index_set={m.index_set}, "
            f"k={m.k}). Use reference.feature_top_k=null to keep every non-zero code."
        )


register(
    Method(
        "fpo",
        fpo,
        FPOOptions,
        {Need.REFERENCE_LOGPS, Need.SAE_FEATURES},
        "FPO, sparse-autoencoder feature constraint",
        check=_check,
        sae_pooling=lambda options: options.pool_positions,
        citation=(
            "Yin et al. 2024, Direct Preference Optimization Using Sparse Feature-Level Constraints, "
            "arXiv:2411.07618"
        ),
    )
)
