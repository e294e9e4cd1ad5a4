"""Host-device synchronisations inside one training step on a CUDA GPU (issue 12, item 3).

Builds the ``smoke`` run (or ``--recipe``) on the GPU, runs two warm-up steps, then runs one more micro-step
(``compute_loss`` + backward, the part of the step between collation and the optimizer) under
``torch.cuda.set_sync_debug_mode("warn")`` and prints each synchronising call site with its count, as JSON.
The expected answer is none: response sizes are counted on the host at collation and nothing in the forward,
the loss or the backward reads a value back; the optimizer step's non-finite guard (one read per optimizer
step) and logging are outside what is measured here. Needs CUDA; on a machine without it, says so and exits 2.

    python benchmarks/gpu_syncs.py [--recipe smoke] [--method sparsepo]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import traceback
import warnings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smoke")
    parser.add_argument(
        "--method", default="dpo", help="method.name for the run (its needs decide the forwards)"
    )
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_syncs.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from sparsealign.data.collate import collate_pairs
    from sparsealign.recipes.load import load_config
    from sparsealign.train.loop import build
    from sparsealign.train.step import compute_loss, step_inputs

    cfg = load_config(
        args.recipe,
        [
            "output_dir=/tmp/sparsealign-gpu-syncs",
            "train.overwrite=true",
            "train.progress=false",
            f"method.name={args.method}",
        ],
    )
    session = build(cfg)
    pad = session.bundle.tokenizer.pad_token_id
    policy = session.policy
    policy.train()

    def micro_step(start: int) -> None:
        items = session.data.train[start : start + cfg.train.batch_size]
        batch = collate_pairs(
            items, pad, cfg.data.padding_side, session.method.rows == "chosen", cfg.train.packing
        ).to(session.accelerator.device)
        out = compute_loss(
            policy, step_inputs(cfg, session.method, session.bundle, batch, items, session.cache)
        )
        out.loss.backward()
        policy.zero_grad(set_to_none=True)

    for start in (0, cfg.train.batch_size):
        micro_step(start)
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            micro_step(2 * cfg.train.batch_size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            sites[f"{warning.filename}:{warning.lineno}"] += 1
    session.lock.release()
    print(json.dumps({"recipe": args.recipe, "method": args.method, "syncs": dict(sites)}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a diagnostic: show everything
        traceback.print_exc()
        sys.exit(1)
