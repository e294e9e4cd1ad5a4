"""The DPO training step of sparsealign against the same step written as a plain PyTorch loop.

Both steps see the same model, the same batch of preference pairs and the same optimizer. Time: the two
are run alternately in one process and the ratio of medians is printed (timing noise between identical
runs on this CPU is 20-40 %, so only same-process ratios mean anything). Memory: each step runs in a fresh
subprocess and the growth of peak RSS (``VmHWM``, reset after loading) over the loaded baseline is reported.

    python benchmarks/train_step.py --model tiny-random-llama
    python benchmarks/train_step.py --model smollm2-135m-instruct --pairs 8 --length 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from sparsealign.data.collate import Batch, collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.methods import get_method
from sparsealign.models.loading import load_bundle
from sparsealign.models.logprobs import TokenModel
from sparsealign.recipes.load import load_config
from sparsealign.train.step import compute_loss, step_inputs


def plain_dpo_step(policy, reference_model, optimizer, batch: Batch, beta: float = 0.1) -> float:
    """The ~30-line loop users write: full logits, full log_softmax, gather, sum, sigmoid loss."""
    labels = batch.input_ids[:, 1:]
    label_mask = torch.zeros_like(labels, dtype=torch.bool)
    rows = torch.arange(labels.shape[0]).unsqueeze(1)
    label_mask[rows, batch.response_index] = batch.response_mask  # response tokens only

    def sequence_logps(model):
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (logps * label_mask).sum(-1)

    with torch.no_grad(), reference_model() as reference:  # frozen copy, or the base with LoRA disabled
        ref = sequence_logps(reference)
    pol = sequence_logps(policy)
    b = batch.num_pairs
    h = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
    loss = -F.logsigmoid(beta * h).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_batch(tokenizer, pairs: int, length: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompt_len = length // 4
    items = []
    for _ in range(pairs):
        ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
        items.append(TokenizedPair(ids(prompt_len), ids(length - prompt_len), ids(length - prompt_len - 8)))
    return collate_pairs(items, tokenizer.pad_token_id)


def setup(model_name: str, lora: bool):
    overrides = [f"model.name={model_name}", "method.name=dpo"] + (["model.lora.r=16"] if lora else [])
    cfg = load_config(None, overrides)
    bundle = load_bundle(cfg.model, seed=0, device=torch.device("cpu"), need_reference=True)
    return cfg, bundle


def library_step(cfg, bundle, policy, optimizer, batch) -> float:
    out = compute_loss(policy, step_inputs(cfg, get_method("dpo"), bundle, batch))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_mb("VmRSS")


def run_one(args, impl: str) -> dict:
    """Run one implementation's step a few times in this (fresh) process; report peak RSS growth."""
    cfg, bundle = setup(args.model, args.lora)
    batch = make_batch(bundle.tokenizer, args.pairs, args.length)
    policy = TokenModel(bundle.policy, cfg.train.logprob_chunk)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    baseline = reset_peak_rss()
    for _ in range(2):
        if impl == "library":
            library_step(cfg, bundle, policy, optimizer, batch)
        else:
            plain_dpo_step(bundle.policy, bundle.reference_model, optimizer, batch)
    peak = _status_mb("VmHWM")
    return {"impl": impl, "baseline_mb": baseline, "peak_mb": peak, "growth_mb": peak - baseline}


def timing(args) -> dict:
    cfg, bundle = setup(args.model, args.lora)
    batch = make_batch(bundle.tokenizer, args.pairs, args.length)
    policy = TokenModel(bundle.policy, cfg.train.logprob_chunk)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    times: dict[str, list[float]] = {"library": [], "plain": []}

    def plain() -> float:
        return plain_dpo_step(bundle.policy, bundle.reference_model, optimizer, batch)

    steps = {"library": lambda: library_step(cfg, bundle, policy, optimizer, batch), "plain": plain}
    for name in steps:  # warm-up
        steps[name]()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = batch.num_tokens
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "tokens_per_step": tokens,
        "library_s": med["library"],
        "plain_s": med["plain"],
        "library_tok_s": tokens / med["library"],
        "plain_tok_s": tokens / med["plain"],
        "time_ratio_library_over_plain": med["library"] / med["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--memory-only", choices=["library", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_only:
        print(json.dumps(run_one(args, args.memory_only)))
        return
    result = {
        "model": args.model,
        "pairs": args.pairs,
        "length": args.length,
        "lora": args.lora,
        **timing(args),
    }
    for impl in ("library", "plain"):
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--pairs",
            str(args.pairs),
            "--length",
            str(args.length),
            "--memory-only",
            impl,
        ] + (["--lora"] if args.lora else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result[f"{impl}_peak_growth_mb"] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]
    result["memory_ratio_library_over_plain"] = (
        result["library_peak_growth_mb"] / result["plain_peak_growth_mb"]
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
