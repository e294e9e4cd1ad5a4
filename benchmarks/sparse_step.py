"""Step time of the token-level methods (TDPO1, SparsePO, MaPO) relative to DPO on the same data.

All methods run through the library's training step (`train.step.compute_loss`, backward, AdamW) on one
model and one batch, alternating in one process; the ratio of median step times to DPO's is printed.

    python benchmarks/sparse_step.py --model tiny-random-llama
    python benchmarks/sparse_step.py --model smollm2-135m-instruct --lora --pairs 8 --length 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from train_step import make_batch

from sparsealign.methods import get_method
from sparsealign.models.loading import load_bundle
from sparsealign.models.logprobs import TokenModel, unwrap_causal_lm
from sparsealign.recipes.load import load_config
from sparsealign.train.step import compute_loss, step_inputs

METHODS = ("dpo", "tdpo1", "sparsepo", "mapo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    lora = ["model.lora.r=16"] if args.lora else []
    bundle = None
    steps = {}
    for name in METHODS:
        cfg = load_config(None, [f"model.name={args.model}", f"method.name={name}", *lora])
        if bundle is None:
            bundle = load_bundle(cfg.model, seed=0, device=torch.device("cpu"), need_reference=True)
            batch = make_batch(bundle.tokenizer, args.pairs, args.length)
        method = get_method(name)
        extra = None
        if method.module is not None:
            extra = method.module(cfg.method, unwrap_causal_lm(bundle.policy).config, 0)
        policy = TokenModel(bundle.policy, cfg.train.logprob_chunk, extra)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)

        def step(
            cfg=cfg, method=method, policy=policy, optimizer=optimizer, bundle=bundle, batch=batch
        ) -> None:
            out = compute_loss(policy, step_inputs(cfg, method, bundle, batch))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": args.model,
        "lora": args.lora,
        "pairs": args.pairs,
        "length": args.length,
        "tokens_per_step": batch.num_tokens,
        "median_step_s": med,
        "ratio_to_dpo": {name: med[name] / med["dpo"] for name in METHODS},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
