"""The method record: everything the library knows about a training method, in one place.

A method is one module of this package (or a user's file) that builds a :class:`Method` and registers it::

    @dataclass
    class ORPOOptions(MethodOptions):
        lam: float = option("Weight of the odds-ratio term.", 0.1)

    def orpo(out: StepOutputs, options: ORPOOptions) -> LossOutput:
        (chosen, rejected) = out.policy_pair()
        return orpo_loss(chosen.logps, rejected.logps, chosen.mask, rejected.mask, options.lam)

    register(Method("orpo", orpo, ORPOOptions, summary="ORPO (Hong et al. 2024)"))

The record holds the method's name, its options (a dataclass with defaults and help), what it needs from the
forward pass (:class:`Need`), its extra trainable module if any, the rows it trains on, and its checks.
Config validation, ``sparsealign config --keys``, whether a reference cache can serve the method (derived from
``needs``) and the trainer's work are all derived from it; nothing else lists methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from sparsealign.config import MethodOptions

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sparsealign.config import Config
    from sparsealign.losses import LossOutput
    from sparsealign.models.logprobs import TokenOutputs

__all__ = ["Method", "MethodOptions", "Need", "StepOutputs", "option"]


class Need(str, Enum):
    """What a method can ask of the forward pass. Each need has one provider in ``sparsealign.train.step``.

    ``REFERENCE_LOGPS``: the reference's per-token log-probs of the same rows. ``TOKEN_KL``: KL(reference ‖
    policy) over the vocabulary at each response token (implies the reference). ``REFERENCE_LAYERS``: the
    reference's hidden states of the layers the method's module declares (``module.layers()``).
    ``ACTIVATION_MASK``: a ``[N, T]`` token mask from the reference's activations (MaPO; the method's
    ``activation_types(options)`` says which). ``SAE_FEATURES``: pooled SAE codes of policy and reference
    (``sae.*``). ``MISMATCHED``: policy and reference log-probs, without gradients, of each prompt continued by
    another prompt's response (KTO's reference point).
    """

    REFERENCE_LOGPS = "reference_logps"
    TOKEN_KL = "token_kl"
    REFERENCE_LAYERS = "reference_layers"
    ACTIVATION_MASK = "activation_mask"
    SAE_FEATURES = "sae_features"
    MISMATCHED = "mismatched"


REFERENCE_NEEDS = frozenset(
    {Need.REFERENCE_LOGPS, Need.TOKEN_KL, Need.REFERENCE_LAYERS, Need.ACTIVATION_MASK, Need.MISMATCHED}
)
"""Needs that run the reference model (or read its cache)."""


def option(help: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A method option: a dataclass field with its help string (shown by ``sparsealign config --keys``)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": help}, **kwargs)


@dataclass
class StepOutputs:
    """Per-token outputs of one batch of ``num_pairs`` preference pairs (chosen rows first), as filled by the
    providers of the method's needs. ``labels``: for binary feedback, the items' labels (bool ``[B]``,
    desirable or not; the rows are the chosen rows alone), else None."""

    policy: TokenOutputs
    reference: TokenOutputs | None
    num_pairs: int
    activation_mask: torch.Tensor | None = None
    mismatched_policy: TokenOutputs | None = None
    mismatched_reference: TokenOutputs | None = None
    labels: torch.Tensor | None = None

    def policy_pair(self) -> tuple[TokenOutputs, TokenOutputs]:
        return self.policy.chosen(self.num_pairs), self.policy.rejected(self.num_pairs)

    def reference_pair(self) -> tuple[TokenOutputs, TokenOutputs]:
        if self.reference is None:
            raise ValueError("this method needs reference log-probs: declare Need.REFERENCE_LOGPS")
        return self.reference.chosen(self.num_pairs), self.reference.rejected(self.num_pairs)


Loss = Callable[[StepOutputs, Any], "LossOutput"]
ModuleBuilder = Callable[[Any, Any, int], "nn.Module"]


@dataclass(frozen=True)
class Method:
    """One training method.

    ``name``: what ``method.name`` selects. ``loss(outputs, options)``: the method's loss from the step's
    per-token outputs (a small function that feeds a pure loss of ``sparsealign.losses``). ``options``: the
    dataclass of its ``method.*`` options (a subclass of :class:`MethodOptions`). ``needs``: what the forward
    pass must provide. ``rows``: ``"pairs"`` (chosen and rejected rows) or ``"chosen"`` (the chosen rows only,
    as SFT). ``module(options, model_config, seed)``: an extra trainable module that runs inside the policy's
    forward as ``module(policy_outputs, reference_outputs)`` (SparsePO's mask networks, PPO's value head);
    its parameters get ``module_weight_decay(options)`` on weight matrices (none on biases and norms).
    ``activation_types(options)``: reference activations to capture for ``Need.ACTIVATION_MASK``.
    ``sae_pooling(options)``: where ``Need.SAE_FEATURES`` averages the SAE codes (``"response"`` when unset).
    ``prepare_pairs(pairs, options, tokenizer, max_length)``: rewrites the token-exact pairs after
    tokenisation, train and eval alike, and returns those to use (conditional SFT's control prefixes; it may
    drop pairs that no longer fit ``max_length``, with a counted, logged reason). ``check(config)``:
    method-specific validation, raising ``ConfigError``. ``aliases``: other programs' option names,
    ``{alias: (option, convert)}``, accepted with a note (an empty ``option``: ``convert`` only checks the
    value, which is then dropped); ``name_aliases``: other names of the method. ``summary``: one line (paper and year) for help and docs.
    ``citation``: the method's paper, as a BibTeX entry or one "Author et al. YEAR, Title, arXiv:ID" line (the
    model card of every run cites it; empty when there is no paper to cite).
    ``binary_feedback(labels, options)``: set when the method also trains on binary feedback (unpaired,
    labelled items: ``StepOutputs.labels``); called once with the training items' labels before training
    (KTO warns about the class balance). Other methods refuse such data.
    """

    name: str
    loss: Loss
    options: type[MethodOptions]
    needs: frozenset[Need] = frozenset()
    summary: str = ""
    citation: str = ""
    rows: Literal["pairs", "chosen"] = "pairs"
    module: ModuleBuilder | None = None
    module_weight_decay: Callable[[Any], float] | None = None
    activation_types: Callable[[Any], Any] | None = None
    sae_pooling: Callable[[Any], str] | None = None
    prepare_pairs: Callable[[list, Any, Any, int], list] | None = None
    check: Callable[[Config], None] | None = None
    aliases: dict[str, tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    name_aliases: tuple[str, ...] = ()
    trl_loss_type: str | None = None
    binary_feedback: Callable[[list[bool], Any], None] | None = None

    def __post_init__(self) -> None:
        if not (dataclasses.is_dataclass(self.options) and issubclass(self.options, MethodOptions)):
            raise TypeError(f"method '{self.name}': options must be a dataclass subclassing MethodOptions")
        object.__setattr__(self, "needs", frozenset(Need(n) for n in self.needs))
        if Need.ACTIVATION_MASK in self.needs and self.activation_types is None:
            raise TypeError(f"method '{self.name}' needs an activation mask: give activation_types")

    @property
    def needs_reference(self) -> bool:
        """Whether the reference side (model or cache) is used at all."""
        return bool(self.needs & REFERENCE_NEEDS)

    def cache_can_serve(self, provided: frozenset[str]) -> bool:
        """A reference cache that provides ``provided`` can replace the reference model for this method."""
        return self.needs_reference and {n.value for n in self.needs} <= set(provided)

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options) if f.name != "name"]
