"""Training methods: a loss function plus a declaration of what the forward pass must provide.

The trainer reads the declaration and computes only what is needed: no reference forward for SimPO and
SFT, no token KL or hidden states unless a method asks. Adding a method is a loss in
``sparsealign.losses``, a small ``compute`` function here that feeds it, and a recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsealign.config import MethodConfig
from sparsealign.losses import (
    LossOutput,
    active_features,
    dpo_loss,
    feature_distance,
    fpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    sft_loss,
    simpo_loss,
    sparsepo_loss,
    tdpo_loss,
)
from sparsealign.models.logprobs import TokenOutputs


@dataclass
class StepOutputs:
    """Per-token outputs of one batch of ``num_pairs`` preference pairs (chosen rows first)."""

    policy: TokenOutputs
    reference: TokenOutputs | None
    num_pairs: int
    activation_mask: torch.Tensor | None = None
    mismatched_policy: TokenOutputs | None = None
    mismatched_reference: TokenOutputs | None = None

    def policy_pair(self) -> tuple[TokenOutputs, TokenOutputs]:
        return self.policy.chosen(self.num_pairs), self.policy.rejected(self.num_pairs)

    def reference_pair(self) -> tuple[TokenOutputs, TokenOutputs]:
        if self.reference is None:
            raise ValueError("this method needs reference log-probs")
        return self.reference.chosen(self.num_pairs), self.reference.rejected(self.num_pairs)


@dataclass(frozen=True)
class Method:
    """What a method needs and how its loss is fed.

    ``needs_reference``: reference per-token log-probs; ``needs_token_kl``: KL(reference || policy) over
    the vocabulary at each response token; ``paired``: trains on chosen/rejected pairs (``False``: the
    chosen responses only, as SFT); ``build_module(method_cfg, model_config, seed)``: an extra trainable
    module that runs on the reference's hidden states (SparsePO's mask networks; it declares the layers
    it needs with ``.layers()``); ``activation_types(method_cfg)``: reference activations to capture for a
    mask (MaPO); ``needs_features``: pooled SAE codes of policy and reference (FPO; the SAE is ``sae.*``);
    ``needs_mismatched``: policy and reference log-probs, without gradients, of each prompt continued by
    another prompt's response (KTO's reference point).
    """

    name: str
    compute: Callable[[StepOutputs, MethodConfig], LossOutput]
    needs_reference: bool
    needs_token_kl: bool = False
    paired: bool = True
    build_module: Callable[[MethodConfig, Any, int], nn.Module] | None = None
    activation_types: Callable[[MethodConfig], list[str]] | None = None
    needs_features: bool = False
    needs_mismatched: bool = False


def _dpo(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    return dpo_loss(pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, cfg.beta, cfg.label_smoothing)


def _ipo(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    return ipo_loss(pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, tau=cfg.beta)


def _simpo(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    pc, pr = out.policy_pair()
    return simpo_loss(pc.logps, pr.logps, pc.mask, pr.mask, beta=cfg.beta, gamma=cfg.gamma)


def _sft(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    chosen = out.policy.chosen(out.num_pairs)
    return sft_loss(chosen.logps, chosen.mask)


def _tdpo(alpha_from_config: bool) -> Callable[[StepOutputs, MethodConfig], LossOutput]:
    def compute(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
        (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
        alpha = cfg.alpha if alpha_from_config else None
        return tdpo_loss(
            pc.logps, pr.logps, rc.logps, rr.logps, pc.kl, pr.kl, pc.mask, pr.mask, cfg.beta, alpha
        )

    return compute


def _sparse(
    out: StepOutputs, cfg: MethodConfig, masks: tuple[torch.Tensor, torch.Tensor], shared: bool
) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    b = out.num_pairs
    reward_mask, kl_mask = masks
    return sparsepo_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.kl, pr.kl, pc.mask, pr.mask,
        reward_mask[:b], reward_mask[b:], kl_mask[:b], kl_mask[b:],
        beta=cfg.beta, l1_reward=cfg.l1_reward, l1_kl=cfg.l1_kl, shared_mask=shared,
    )  # fmt: skip


def _sparsepo(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    return _sparse(out, cfg, out.policy.extra, cfg.shared_mask)


def _mapo(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    mask = out.activation_mask
    if mask is None:
        raise ValueError("MaPO needs the activation mask of the reference forward")
    return _sparse(out, cfg, (mask, mask), shared=True)


def _fpo(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    d_w = feature_distance(pc.features, rc.features, cfg.k, cfg.index_set)
    d_l = feature_distance(pr.features, rr.features, cfg.k, cfg.index_set)
    result = fpo_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, d_w, d_l,
        beta=cfg.beta, alpha=cfg.alpha, stop_grad_chosen=cfg.stop_grad_chosen,
    )  # fmt: skip
    result.metrics["fpo/active_features"] = active_features(out.policy.features)
    return result


def _kto(out: StepOutputs, cfg: MethodConfig) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    mp, mr = out.mismatched_policy, out.mismatched_reference
    if mp is None or mr is None:
        raise ValueError("KTO needs the log-probs of the mismatched responses")
    z0 = kto_reference_point(mp.logps, mr.logps, mp.mask, average=_mean_over_processes)
    return kto_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.mask, pr.mask, z0,
        beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
    )  # fmt: skip


def _mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process's rows (``values.mean()`` in a single process), so that
    all processes use the same KTO reference point, as TRL and HALOs do."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.mean()
    totals = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp_min(1)).to(values.dtype)


def _mask_model(cfg: MethodConfig, model_config: Any, seed: int) -> nn.Module:
    from sparsealign.masks import build_mask_model

    return build_mask_model(
        cfg.mask_model, model_config.num_hidden_layers, model_config.hidden_size, cfg.shared_mask, seed
    )


def _activation_types(cfg: MethodConfig) -> list[str]:
    from sparsealign.models.activations import resolve_activation_types

    return resolve_activation_types(cfg.activations)


METHODS: dict[str, Method] = {
    "dpo": Method("dpo", _dpo, needs_reference=True),
    "cdpo": Method("cdpo", _dpo, needs_reference=True),
    "ipo": Method("ipo", _ipo, needs_reference=True),
    "simpo": Method("simpo", _simpo, needs_reference=False),
    "sft": Method("sft", _sft, needs_reference=False, paired=False),
    "tdpo1": Method("tdpo1", _tdpo(False), needs_reference=True, needs_token_kl=True),
    "tdpo2": Method("tdpo2", _tdpo(True), needs_reference=True, needs_token_kl=True),
    "sparsepo": Method(
        "sparsepo", _sparsepo, needs_reference=True, needs_token_kl=True, build_module=_mask_model
    ),
    "mapo": Method(
        "mapo", _mapo, needs_reference=True, needs_token_kl=True, activation_types=_activation_types
    ),
    "fpo": Method("fpo", _fpo, needs_reference=True, needs_features=True),
    "kto": Method("kto", _kto, needs_reference=True, needs_mismatched=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown method '{name}'. Known: {', '.join(METHODS)}.{hint}")
    return METHODS[name]


MODULE_WEIGHTS = "method_module.safetensors"
MODULE_CONFIG = "method_module.json"


def save_method_module(module: nn.Module, method_cfg: MethodConfig, folder: Path) -> None:
    """Write a method's trained module (SparsePO's mask networks) next to the final model or adapter."""
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
        str(folder / MODULE_WEIGHTS),
    )
    (folder / MODULE_CONFIG).write_text(json.dumps(dataclasses.asdict(method_cfg), indent=1))


def load_method_module(folder: Path, model_config: Any) -> tuple[nn.Module, MethodConfig]:
    """Rebuild and load the module written by :func:`save_method_module`."""
    from safetensors.torch import load_file

    cfg = MethodConfig(**json.loads((folder / MODULE_CONFIG).read_text()))
    method = get_method(cfg.name)
    if method.build_module is None:
        raise ValueError(f"method '{cfg.name}' has no trainable module")
    module = method.build_module(cfg, model_config, 0)
    module.load_state_dict(load_file(str(folder / MODULE_WEIGHTS)))
    return module, cfg
