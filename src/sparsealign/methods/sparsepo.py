"""SparsePO (Christopoulou et al. 2024, arXiv:2410.05102): TDPO's token-level reward and KL terms weighted by
learned sparse token masks, computed by small networks on the reference's hidden states (one shared network,
"sparse-common", or two independent ones, "sparse-indp")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sparsealign.losses import LossOutput, sparsepo_loss
from sparsealign.masks import build_mask_model
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register
from sparsealign.models.logprobs import TokenOutputs


@dataclass
class SparsePOOptions(MethodOptions):
    beta: float = option("Inverse temperature β of the masked token rewards and KL.", 0.1)
    shared_mask: bool = option(
        "One mask network for reward and KL ('sparse-common'); false: two ('sparse-indp').", True
    )
    mask_model: Literal["simple_all", "simple_last", "mlp_all", "mlp_last", "random"] = option(
        "Mask network on the reference's hidden states.", "simple_all"
    )
    l1_reward: float = option("L1 weight on the reward mask values.", 0.0)
    l1_kl: float = option("L1 weight on the KL mask values.", 0.0)
    mask_weight_decay: float = option("AdamW weight decay of the mask networks' weights.", 0.01)


def masked_token_loss(
    out: StepOutputs, options: Any, masks: tuple[torch.Tensor, torch.Tensor], shared: bool
) -> LossOutput:
    """``sparsepo_loss`` with ``[2B, T]`` reward and KL masks (chosen rows first); MaPO uses it too."""
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    b = out.num_pairs
    reward_mask, kl_mask = masks
    return sparsepo_loss(
        pc.logps, pr.logps, rc.logps, rr.logps, pc.kl, pr.kl, pc.mask, pr.mask,
        reward_mask[:b], reward_mask[b:], kl_mask[:b], kl_mask[b:],
        beta=options.beta, l1_reward=getattr(options, "l1_reward", 0.0), l1_kl=getattr(options, "l1_kl", 0.0),
        shared_mask=shared,
    )  # fmt: skip


def sparsepo(out: StepOutputs, options: SparsePOOptions) -> LossOutput:
    return masked_token_loss(out, options, out.policy.extra, options.shared_mask)


class ReferenceMasks(nn.Module):
    """The mask networks as the method's module: ``(reward_mask, kl_mask)`` from the reference's hidden states
    of the layers :meth:`layers` names, at the policy's response tokens."""

    def __init__(self, masks: nn.Module) -> None:
        super().__init__()
        self.masks = masks

    def layers(self) -> list[int]:
        return self.masks.layers()

    def forward(
        self, policy: TokenOutputs, reference: TokenOutputs | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            raise ValueError(
                "SparsePO's masks run on the reference's hidden states; pass the reference outputs"
            )
        return self.masks(reference.layers, policy.mask)


def mask_networks(options: SparsePOOptions, model_config: Any, seed: int) -> nn.Module:
    masks = build_mask_model(
        options.mask_model,
        model_config.num_hidden_layers,
        model_config.hidden_size,
        options.shared_mask,
        seed,
    )
    return ReferenceMasks(masks)


register(
    Method(
        "sparsepo",
        sparsepo,
        SparsePOOptions,
        {Need.REFERENCE_LOGPS, Need.TOKEN_KL, Need.REFERENCE_LAYERS},
        "SparsePO, learned token masks (Christopoulou et al. 2024)",
        module=mask_networks,
        citation=(
            "Christopoulou et al. 2024, "
            "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks, arXiv:2410.05102"
        ),
        module_weight_decay=lambda options: options.mask_weight_decay,
        aliases={
            "rw_kl_independent": ("shared_mask", lambda independent: not independent),
            "l1_norm_param_u": ("l1_reward", lambda v: v),
            "l1_norm_param_d": ("l1_kl", lambda v: v),
        },
        name_aliases=("sparse",),
    )
)
