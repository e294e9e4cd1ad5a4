"""Sampling speed: ``sample_continuations`` vs plain ``model.generate`` loops on the IMDB job's prompts.

Three ways to draw ``--samples`` continuations of ``--new-tokens`` tokens for each of ``--prompts`` IMDB
prompts (the main job's: the first 8 words of training reviews), on one model, in one process:

* ``library``: :func:`sparsealign.models.generate.sample_continuations` (length-sorted batches of
  ``--batch-size`` prompts, one prefill per prompt with its KV cache repeated to the samples, finished rows
  dropped);
* ``per-prompt``: the plain loop, ``model.generate(prompt, do_sample=True, num_return_sequences=k)`` for one
  prompt at a time;
* ``batched``: ``model.generate`` on left-padded batches of ``--batch-size`` prompts in file order with
  ``num_return_sequences=k`` (what ``sample_continuations`` did before, and the main job's pairs phase).

A warm-up runs each way on two prompts; then each timed round runs the three in turn (order rotated per
round).
Tokens/s counts generated tokens up to and including EOS (padding after a row's EOS is not counted).
Prints one JSON object with medians and the ratios library / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sparsealign.config import ModelConfig
from sparsealign.data.imdb import split_prompts
from sparsealign.models.generate import eos_ids, pad_id_for, sample_continuations
from sparsealign.models.loading import load_model


def _count(rows: list[list[int]], eos: set[int]) -> int:
    return sum(next((t + 1 for t, tok in enumerate(r) if tok in eos), len(r)) for r in rows)


def plain_per_prompt(model, prompts, k: int, new: int, eos: list[int], pad: int) -> list[list[int]]:
    rows = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            num_return_sequences=k,
            max_new_tokens=new,
            top_k=0,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        rows += out[:, len(p) :].tolist()
    return rows


def plain_batched(model, prompts, k: int, new: int, eos: list[int], pad: int, batch: int) -> list[list[int]]:
    rows = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            num_return_sequences=k,
            max_new_tokens=new,
            top_k=0,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        rows += out[:, width:].tolist()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per batch (the IMDB recipe's 64)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["per-prompt", "batched"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(name=args.model))
    train, _ = split_prompts(max(args.prompts, 1), 1, 8, 0)
    prompts = [list(tokenizer(p)["input_ids"]) for p in train[: args.prompts]]
    eos, pad = eos_ids(model, tokenizer), pad_id_for(tokenizer)
    k, new, batch = args.samples, args.new_tokens, args.batch_size

    def library(ps: list[list[int]]) -> list[list[int]]:
        out = sample_continuations(model, tokenizer, ps, k, new, seed=0, batch_size=batch)
        return [s for per in out for s in per]

    ways: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {"library": library}
    if "per-prompt" not in args.skip:
        ways["per-prompt"] = lambda ps: plain_per_prompt(model, ps, k, new, eos, pad)
    if "batched" not in args.skip:
        ways["batched"] = lambda ps: plain_batched(model, ps, k, new, eos, pad, batch)
    names = list(ways)
    eos_set = set(eos)
    with torch.inference_mode():
        for name in names:  # warm-up
            ways[name](prompts[:2])
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            with torch.inference_mode():
                start = time.perf_counter()
                rows = ways[name](prompts)
                seconds = time.perf_counter() - start
            rates[name].append(_count(rows, eos_set) / seconds)
            print(f"round {round_} {name}: {seconds:.2f} s, {rates[name][-1]:.1f} tok/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "model": args.model,
        "prompts": len(prompts),
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "samples": k,
        "new_tokens": new,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {name: round(v, 1) for name, v in medians.items()},
        "ratio": {
            f"library/{name}": round(medians["library"] / medians[name], 2)
            for name in names
            if name != "library"
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
