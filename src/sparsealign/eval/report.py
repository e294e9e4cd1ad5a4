"""The final generation report: KL to the reference, lengths and (with a reward) reward of samples on
held-out prompts.

For the reference and for the trained policy, ``samples_per_prompt`` continuations of every held-out
prompt are sampled, and scored by the reward when there is one (``reward.name``). The policy's sequence KL to the reference is the Monte-Carlo
estimate of KL(policy || reference): the mean over its samples of ``sum_t log pi(y_t) - log pi_ref(y_t)``
over the sampled tokens, with log-probs from the shared :class:`~sparsealign.models.logprobs.TokenModel`
path. The reference's KL to itself is 0 by definition.

Writes ``<output_dir>/report/summary.json`` and ``report/samples.jsonl`` and prints a table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsealign.data.collate import collate_sequences
from sparsealign.io import atomic_write
from sparsealign.models.generate import decode_continuation, model_device, pad_id_for, sample_continuations
from sparsealign.models.logprobs import TokenModel
from sparsealign.rewards.base import RewardModel


def sequence_logps(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """``sum_t log p(response_t | prompt, response_<t)`` for each row (0 for an empty response)."""
    device = model_device(model)
    scorer = TokenModel(model)
    flags = {module: module.training for module in model.modules()}
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = collate_sequences(
                    prompts[start : start + batch_size], responses[start : start + batch_size], pad_id
                ).to(device)
                logps = scorer(batch).logps.float()
                out.extend(logps.sum(dim=1).cpu().tolist())
    finally:
        for module, flag in flags.items():
            module.training = flag
    return out


def sequence_kl(
    policy: nn.Module,
    reference: nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Per sample ``log pi(y|x) - log pi_ref(y|x)``; its mean over samples from ``policy`` estimates
    KL(policy || reference). ``reference`` may be a module or a zero-argument context-manager factory (e.g.
    ``bundle.reference_model``) entered only while the reference is scored."""
    policy_logps = sequence_logps(policy, prompts, responses, pad_id, batch_size)
    if isinstance(reference, nn.Module):
        ref_logps = sequence_logps(reference, prompts, responses, pad_id, batch_size)
    else:
        with reference() as ref:
            ref_logps = sequence_logps(ref, prompts, responses, pad_id, batch_size)
    return [p - r for p, r in zip(policy_logps, ref_logps, strict=True)]


def _stats(
    rewards: list[float] | None, kls: list[float], lengths: list[int], num_prompts: int
) -> dict[str, Any]:
    """Means (with sample standard deviation and standard error ``std / sqrt(n)``) of KL and length, and of
    the reward when there is one (``rewards`` None: no reward keys)."""
    n = len(kls)
    kl_mean = sum(kls) / n if n else float("nan")
    kl_var = sum((k - kl_mean) ** 2 for k in kls) / (n - 1) if n > 1 else 0.0
    stats: dict[str, Any] = {}
    if rewards is not None:
        mean = sum(rewards) / n if n else float("nan")
        var = sum((r - mean) ** 2 for r in rewards) / (n - 1) if n > 1 else 0.0
        std = math.sqrt(var)
        stats = {
            "reward_mean": mean,
            "reward_std": std,
            "reward_sem": std / math.sqrt(n) if n else float("nan"),
        }
    stats |= {
        "kl_mean": kl_mean,
        "kl_sem": math.sqrt(kl_var / n) if n else float("nan"),
        "length_mean": sum(lengths) / n if n else float("nan"),
    }
    if rewards is not None:
        stats["positive_fraction"] = sum(r > 0 for r in rewards) / n if n else float("nan")
    return stats | {"num_samples": n, "num_prompts": num_prompts}


def format_table(summary: dict[str, Any]) -> str:
    """The reference/policy table printed after training (reward columns only with a reward)."""
    with_reward = "reward_mean" in summary["reference"]
    head = f"{'reward (mean ± sem)':>20}" if with_reward else ""
    lines = [f"{'':14}{head}{'KL to ref':>12}{'length':>9}" + (f"{'positive':>10}" if with_reward else "")]
    for name in ("reference", "policy"):
        s = summary[name]
        reward = f"{s['reward_mean']:.2f} ± {s['reward_sem']:.2f}" if with_reward else ""
        tail = f"{s['positive_fraction']:>10.0%}" if with_reward else ""
        lines.append(f"{name:14}{reward:>{len(head)}}{s['kl_mean']:>12.2f}{s['length_mean']:>9.1f}{tail}")
    return "\n".join(lines)


def evaluate_generations(
    bundle: Any,
    reward: RewardModel | None,
    prompts: Sequence[str | Sequence[int]],
    cfg: Any,
    seed: int,
    output_dir: str | Path,
    batch_size: int = 32,
    top_p: float = 1.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample from the reference and the policy on held-out ``prompts``; report KL, lengths and the reward
    (``reward`` None: no reward columns).

    A prompt is a text (tokenised with the tokenizer's special tokens, as a source's prompts are) or a list
    of token ids used as they are (a data file's held-out pairs, exactly as trained; decoded without
    special tokens for the page and the reward). ``bundle`` has ``.policy``, ``.tokenizer`` and a ``reference_model()`` context manager; ``cfg`` is an
    :class:`~sparsealign.config.EvalConfig` (``samples_per_prompt``, ``max_new_tokens``, ``temperature``).
    Both models are sampled with the same seed. Returns the summary written to ``report/summary.json``.
    """
    if not prompts:
        raise ValueError("evaluate_generations needs at least one held-out prompt")
    tokenizer = bundle.tokenizer
    pad = pad_id_for(tokenizer)
    k = cfg.samples_per_prompt
    prompt_ids = [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]
    prompt_texts_once = [
        p if isinstance(p, str) else tokenizer.decode(list(p), skip_special_tokens=True) for p in prompts
    ]

    def sample(model: nn.Module, label: str) -> list[list[list[int]]]:
        return sample_continuations(
            model,
            tokenizer,
            prompt_ids,
            num_samples=k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            progress=f"report ({label})" if progress else False,
        )

    with bundle.reference_model() as reference:
        ref_samples = sample(reference, "reference")
    policy_samples = sample(bundle.policy, "policy")

    rows_prompt = [ids for ids in prompt_ids for _ in range(k)]
    summary: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for name, samples in (("reference", ref_samples), ("policy", policy_samples)):
        flat = [s for per in samples for s in per]
        texts = [decode_continuation(tokenizer, p, s) for p, s in zip(rows_prompt, flat, strict=True)]
        prompt_texts = [p for p in prompt_texts_once for _ in range(k)]
        rewards = (
            [float(x) for x in reward.score([p + t for p, t in zip(prompt_texts, texts, strict=True)])]
            if reward is not None
            else None
        )
        if name == "reference":
            kls = [0.0] * len(flat)
        else:
            kls = sequence_kl(bundle.policy, bundle.reference_model, rows_prompt, flat, pad, batch_size)
        summary[name] = _stats(rewards, kls, [len(s) for s in flat], len(prompts))
        for index, (p, t, kl, s) in enumerate(zip(prompt_texts, texts, kls, flat, strict=True)):
            record = {"prompt": p, "model": name, "text": t}
            if rewards is not None:
                record["reward"] = rewards[index]
            records.append(record | {"kl": kl, "length": len(s)})
    if reward is not None:
        summary["reward_delta"] = summary["policy"]["reward_mean"] - summary["reference"]["reward_mean"]
    summary["config"] = {
        "reward": reward.name if reward is not None else None,
        "num_prompts": len(prompts),
        "samples_per_prompt": k,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": top_p,
        "seed": seed,
    }

    report = Path(output_dir) / "report"
    with atomic_write(report / "summary.json") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    with atomic_write(report / "samples.jsonl") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(format_table(summary))
    return summary
