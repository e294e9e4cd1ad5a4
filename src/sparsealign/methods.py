"""Training methods: a loss function plus a declaration of what the forward pass must provide.

The trainer reads the declaration and computes only what is needed: no reference forward for SimPO and
SFT, no token KL or hidden states unless a method asks. Adding a method is a loss in
``sparsealign.losses``, a small ``compute`` function here that feeds it, and a recipe.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from sparsealign.config import MethodConfig
from sparsealign.losses import LossOutput, dpo_loss, ipo_loss, sft_loss, simpo_loss
from sparsealign.models.logprobs import TokenOutputs


@dataclass
class StepOutputs:
    """Per-token outputs of one batch of ``num_pairs`` preference pairs (chosen rows first)."""

    policy: TokenOutputs
    reference: TokenOutputs | None
    num_pairs: int

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
    chosen responses only, as SFT).
    """

    name: str
    compute: Callable[[StepOutputs, MethodConfig], LossOutput]
    needs_reference: bool
    needs_token_kl: bool = False
    paired: bool = True


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


METHODS: dict[str, Method] = {
    "dpo": Method("dpo", _dpo, needs_reference=True),
    "cdpo": Method("cdpo", _dpo, needs_reference=True),
    "ipo": Method("ipo", _ipo, needs_reference=True),
    "simpo": Method("simpo", _simpo, needs_reference=False),
    "sft": Method("sft", _sft, needs_reference=False, paired=False),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown method '{name}'. Known: {', '.join(METHODS)}.{hint}")
    return METHODS[name]
