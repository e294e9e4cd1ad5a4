"""Padding-free vs padded training steps on the IMDB default's batches (and on long-tailed lengths).

Builds the run of ``--recipe`` (default ``imdb/sparsepo``, the main job: SmolLM2-135M-Instruct with LoRA;
its pairs come from the cache, sampled first if missing) and times one training micro-step (reference
forward, policy forward, the method's loss, backward) on its first ``--batches`` micro-batches, padded and
packed in turn (order alternated per repeat, median of ``--repeats``). Two sets of batches:

* ``imdb``: the recipe's batches as they are (prompts of 8 words, continuations of up to 24 tokens);
* ``long-tail``: the same pairs with each response repeated 1, 1, 2 or 4 times (seeded), a spread of lengths
  like HH's or UltraFeedback's, where padding is a large share of a padded batch.

Before timing, each batch's loss and gradients are compared between the two layouts. Prints one JSON object:
real tokens per second of each layout, the positions each computes, ``train.packing=auto``'s choice and the
ratios packed / padded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

import torch

from sparsealign.data.collate import apply_packing, collate_pairs
from sparsealign.recipes.load import load_config
from sparsealign.train.loop import build
from sparsealign.train.step import compute_loss, step_inputs


def long_tail(pairs, seed: int = 0):
    rnd = random.Random(seed)
    return [
        dataclasses.replace(
            p,
            chosen_ids=p.chosen_ids * rnd.choice([1, 1, 2, 4]),
            rejected_ids=p.rejected_ids * rnd.choice([1, 1, 2, 4]),
        )
        for p in pairs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="imdb/sparsepo")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default="/tmp/sparsealign-packing-bench")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = load_config(
        args.recipe, [f"output_dir={args.output_dir}", "train.overwrite=true", "train.progress=false"]
    )
    session = build(cfg)
    policy, method, bundle = session.policy, session.method, session.bundle
    pad = bundle.tokenizer.pad_token_id
    size = cfg.train.batch_size
    policy.train()

    def step(batch, items) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
        policy.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = compute_loss(policy, step_inputs(cfg, method, bundle, batch, items))
        out.loss.backward()
        seconds = time.perf_counter() - start
        grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
        return seconds, out.loss.detach(), grads

    report: dict[str, dict] = {}
    train = list(session.data.train)
    for name, pairs in (("imdb", train), ("long-tail", long_tail(train))):
        totals = {"padded": 0.0, "packed": 0.0}  # seconds: the sum over batches of each batch's median
        positions = {"padded": 0, "packed": 0, "auto": 0}
        tokens = 0
        worst_loss = worst_grad = 0.0
        for b in range(args.batches):
            items = pairs[b * size : (b + 1) * size]
            padded = collate_pairs(items, pad, cfg.data.padding_side, method.rows == "chosen")
            packed = padded.packed()
            auto = apply_packing(padded, "auto")
            tokens += padded.num_tokens
            positions["padded"] += padded.input_ids.numel()
            positions["packed"] += packed.packing.num_positions
            positions["auto"] += auto.packing.num_positions if auto.packing else auto.input_ids.numel()
            _, loss_a, grads_a = step(padded, items)
            _, loss_b, grads_b = step(packed, items)
            worst_loss = max(worst_loss, float((loss_a - loss_b).abs()))
            for key, grad in grads_a.items():
                scale = float(grad.abs().max()) or 1.0
                worst_grad = max(worst_grad, float((grads_b[key] - grad).abs().max()) / scale)
            times: dict[str, list[float]] = {"padded": [], "packed": []}
            for r in range(args.repeats):
                order = [("padded", padded), ("packed", packed)]
                for layout, batch in order if r % 2 == 0 else order[::-1]:
                    times[layout].append(step(batch, items)[0])
            for layout, seconds in times.items():
                totals[layout] += statistics.median(seconds)
        per_batch = totals
        report[name] = {
            "real_tokens": tokens,
            "positions": positions,
            "tokens_per_s": {k: round(tokens / v, 1) for k, v in per_batch.items()},
            "speedup_packed_over_padded": round(per_batch["padded"] / per_batch["packed"], 3),
            "auto_packs": positions["auto"] < positions["padded"],
            "max_loss_difference": worst_loss,
            "max_gradient_difference_relative": worst_grad,
        }
    session.lock.release()
    print(json.dumps({"recipe": args.recipe, "threads": torch.get_num_threads(), **report}, indent=2))


if __name__ == "__main__":
    main()
