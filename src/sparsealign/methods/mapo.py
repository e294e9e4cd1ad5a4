"""MaPO (Christopoulou et al. 2024, arXiv:2410.05102): SparsePO's masked token terms with one parameter-free
mask from the reference model's own activations (min-max normalised per response)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsealign.config import Config, ConfigError
from sparsealign.losses import LossOutput
from sparsealign.methods.base import Method, MethodOptions, Need, StepOutputs, option
from sparsealign.methods.registry import register
from sparsealign.methods.sparsepo import masked_token_loss
from sparsealign.models.activations import resolve_activation_types


@dataclass
class MaPOOptions(MethodOptions):
    beta: float = option("Inverse temperature β of the masked token rewards and KL.", 0.1)
    activations: str = option(
        "Activation types for the mask: comma-separated from mlp, attn, resid, logits, or all (this library's "
        "compact hook set); original (the SparsePO code's exact hook points per architecture, to reproduce the "
        "paper's masks) or original:TYPES; or uniform (an all-ones mask: TDPO1).",
        "all",
    )


def mapo(out: StepOutputs, options: MaPOOptions) -> LossOutput:
    mask = out.activation_mask
    if mask is None:
        raise ValueError("MaPO needs the activation mask of the reference forward")
    return masked_token_loss(out, options, (mask, mask), shared=True)


def _check(config: Config) -> None:
    try:
        resolve_activation_types(config.method.activations)
    except ValueError as error:
        raise ConfigError(f"'method.activations': {error}") from None


def _fixed_mapping(value: str) -> None:
    """The SparsePO code's ``activation_mapping``: only its ``zn_rescale`` is what MaPO does."""
    if value != "zn_rescale":
        raise ConfigError(
            f"'method.activation_mapping' supports only 'zn_rescale' (the paper's mapping), got {value!r}."
        )


register(
    Method(
        "mapo",
        mapo,
        MaPOOptions,
        {Need.REFERENCE_LOGPS, Need.TOKEN_KL, Need.ACTIVATION_MASK},
        "MaPO, activation token masks (Christopoulou et al. 2024)",
        activation_types=lambda options: resolve_activation_types(options.activations),
        citation=(
            "Christopoulou et al. 2024, "
            "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks, arXiv:2410.05102"
        ),
        check=_check,
        aliases={
            "activation_hook": ("activations", lambda v: v),
            "activation_mapping": ("", _fixed_mapping),
        },
    )
)
