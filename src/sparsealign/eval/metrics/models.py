"""A run's reference model for the teacher-forced metrics, and the sample rows as token ids for them.

``MODEL_OR_RUN`` itself is loaded by :func:`sparsealign.eval.run_model.load_eval_model`. A run's reference
is the one it trained against: ``reference.model`` when set, else its initial model (the base of a LoRA adapter;
random built-ins drawn from ``train.seed`` as in training).

Rows are encoded token-exactly as training encodes text pairs (:func:`sparsealign.data.tokenize.tokenize_pair`:
the prompt with the tokenizer's BOS, the output cut from the tokenisation of prompt + output), except that
no EOS is appended: a sample that stopped at EOS lost it when decoded, and one cut at ``max_new_tokens``
never had one, so the scored tokens are the output's own.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

NO_LIMIT = 1 << 30


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_run_reference(cfg: Any, device: str | None = None) -> Any:
    """The reference a run trained against (see the module docstring), frozen, in eval mode."""
    from sparsealign.eval.run_model import base_model_config
    from sparsealign.models.loading import load_model, reference_model_config

    if cfg.reference.model is not None:
        model_cfg = reference_model_config(cfg.model, cfg.reference)
    else:
        model_cfg = base_model_config(cfg)
    model, _ = load_model(model_cfg, cfg.train.seed, device or default_device())
    return model.requires_grad_(False)


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each row's prompt and output: the exact ``prompt_ids``/``output_ids`` when the row has
    them (``sparsealign sample`` writes them), else its text ``prompt`` + ``output`` encoded as training
    encodes a text pair (see the module docstring); an empty output gives ``[]``."""
    from sparsealign.config import DataConfig
    from sparsealign.data.examples import PreferenceExample
    from sparsealign.data.tokenize import tokenize_pair

    cfg = DataConfig(max_length=NO_LIMIT, max_prompt_length=NO_LIMIT - 1)
    prompt_ids: list[list[int]] = []
    output_ids: list[list[int]] = []
    for row in rows:
        if isinstance(row.get("prompt_ids"), list) and isinstance(row.get("output_ids"), list):
            prompt_ids.append([int(t) for t in row["prompt_ids"]])
            output_ids.append([int(t) for t in row["output_ids"]])
            continue
        prompt, output = row["prompt"], row["output"]
        events: Counter[str] = Counter()
        pair = tokenize_pair(PreferenceExample(prompt, output, output), tokenizer, cfg, stats=events)
        if isinstance(pair, str):  # empty output (or prompt): nothing to score
            prompt_ids.append(list(tokenizer(prompt)["input_ids"]) or [int(tokenizer.eos_token_id)])
            output_ids.append([])
            continue
        ids = pair.chosen_ids[:-1] if events["eos_appended"] else pair.chosen_ids
        prompt_ids.append(pair.prompt_ids)
        output_ids.append(ids)
    return prompt_ids, output_ids
