"""Conditional SFT (Korbak et al. 2023, arXiv:2302.08582; HALOs' ``csft``): SFT on both responses of each
pair, each preceded by a control prefix saying whether it is desirable; sampling conditions on the good one.

Training. Every pair gives two SFT rows: ``prompt + good + chosen`` and ``prompt + bad + rejected``, where
``good`` and ``bad`` are the ids of ``method.good_token`` and ``method.bad_token`` (``<|good|>``/``<|bad|>``,
HALOs' strings) tokenised as plain text by the model's own tokenizer (``sparsealign.data.control``). The
prefix ids are the first response ids, so the loss also scores them (as HALOs' current code does). With
π_i,t the policy's log-prob of response token t of row i (control ids included) and |y_i| its length::

    loss = mean_{i ∈ chosen ∪ rejected} ( −(1/|y_i|) Σ_t π_i,t )

(``sparsealign.losses.sft_loss``: a per-row mean, then a mean over the 2B rows, so every row weighs the same
whatever its length). HALOs' ``SFTTrainer`` divides the summed log-probs of the micro-batch by its number
of tokens instead, a token-level mean in which longer responses weigh more; the two agree when all
responses have the same length. No reference model is used.

Difference from HALOs. HALOs adds the two control strings to the tokenizer as new special tokens (one id
each) and resizes the embeddings. Here they are ordinary text (several ids each for most tokenizers), so
nothing is added to the vocabulary: LoRA and the built-in models need no new embedding rows, the run saves
the base tokenizer, and training and sampling see the same ids.

Sampling (the equivalent of ``sparsealign sample ... --control good``). A run folder records what is needed:
``config.yaml`` holds ``method.good_token`` and ``method.bad_token``, ``final/`` the model and tokenizer.
Append the good prefix to each prompt's ids with :func:`sampling_prompt` and sample as usual::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sparsealign.api import load_config
    from sparsealign.methods.csft import sampling_prompt
    from sparsealign.models.generate import sample_continuations

    options = load_config("runs/imdb-csft/config.yaml").method
    tokenizer = AutoTokenizer.from_pretrained("runs/imdb-csft/final")
    model = AutoModelForCausalLM.from_pretrained("runs/imdb-csft/final")  # LoRA: AutoPeftModelForCausalLM
    prompt = sampling_prompt(tokenizer("This movie was").input_ids, options, tokenizer)
    (samples,) = sample_continuations(model, tokenizer, [prompt], num_samples=4, max_new_tokens=24)

``control="bad"`` conditions on the bad prefix instead (to see what the model learned to avoid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sparsealign.config import Config, ConfigError
from sparsealign.data.control import (
    BAD_TOKEN,
    GOOD_TOKEN,
    conditioned_prompt,
    control_ids,
    with_control_tokens,
)
from sparsealign.data.examples import TokenizedPair
from sparsealign.losses import LossOutput, masked_sum, sft_loss
from sparsealign.methods.base import Method, MethodOptions, StepOutputs, option
from sparsealign.methods.registry import register

__all__ = ["CSFTOptions", "csft", "prepare_pairs", "sampling_prompt"]


@dataclass
class CSFTOptions(MethodOptions):
    good_token: str = option(
        "Control text before each chosen response, tokenised as plain text by the model's tokenizer (no new "
        "vocabulary); sampling appends it to the prompt.",
        GOOD_TOKEN,
    )
    bad_token: str = option(
        "Control text before each rejected response (plain text, as good_token).", BAD_TOKEN
    )


def csft(out: StepOutputs, options: CSFTOptions) -> LossOutput:
    """SFT over all 2B rows (chosen and rejected, each with its control prefix)."""
    result = sft_loss(out.policy.logps, out.policy.mask)
    chosen, rejected = out.policy_pair()
    result.metrics["logps/chosen"] = masked_sum(chosen.logps, chosen.mask).mean().detach()
    result.metrics["logps/rejected"] = masked_sum(rejected.logps, rejected.mask).mean().detach()
    return result


def prepare_pairs(
    pairs: list[TokenizedPair], options: CSFTOptions, tokenizer: Any, max_length: int
) -> list[TokenizedPair]:
    """The pairs with the good prefix before each chosen response and the bad one before each rejected one."""
    good, bad = control_ids(tokenizer, options.good_token), control_ids(tokenizer, options.bad_token)
    return with_control_tokens(pairs, good, bad, max_length)


def sampling_prompt(
    prompt_ids: Sequence[int], options: CSFTOptions, tokenizer: Any, control: Literal["good", "bad"] = "good"
) -> list[int]:
    """``prompt_ids`` followed by the ids of the run's good control text (``control="bad"``: the bad one),
    the same ids that preceded the chosen (rejected) responses in training."""
    if control not in ("good", "bad"):
        raise ValueError(f"control must be 'good' or 'bad', got {control!r}")
    text = options.good_token if control == "good" else options.bad_token
    return conditioned_prompt(prompt_ids, control_ids(tokenizer, text))


def _check(config: Config) -> None:
    m = config.method
    if not m.good_token or not m.bad_token:
        raise ConfigError("'method.good_token' and 'method.bad_token' must be non-empty strings.")
    if m.good_token == m.bad_token:
        raise ConfigError(
            f"'method.good_token' and 'method.bad_token' must differ (both are {m.good_token!r})."
        )


register(
    Method(
        "csft",
        csft,
        CSFTOptions,
        summary="Conditional SFT on both responses with control prefixes (Korbak et al. 2023; HALOs' CSFT)",
        citation="Korbak et al. 2023, Pretraining Language Models with Human Preferences, arXiv:2302.08582",
        prepare_pairs=prepare_pairs,
        check=_check,
    )
)
