"""FPO with the offline reference cache against TDPO2 and DPO with a live reference, and DPO with the cache.

Every variant runs the library's training step (``train.step.compute_loss``, backward, clipping, AdamW) on
the same model, the same pairs and the same batch. The reference cache of those pairs (log-probs and, for
FPO, pooled SAE codes) is built once beforehand, as ``sparsealign cache`` would.

Time: the four steps alternate in one process; medians and ratios are printed. Memory: each variant runs
in a fresh subprocess that loads only what the variant needs (no reference model with the cache) and is
measured in its second, steady-state step (optimizer state allocated). On CUDA the figure is
``torch.cuda.max_memory_allocated``; on CPU its analogue, the peak of live tensor bytes (tensors alive
before the step plus the profiler's highest net allocation within it), and also the process's peak RSS
over its RSS before any model was loaded (what the process costs, allocator slack included).

    python benchmarks/fpo_step.py --model tiny-random-llama --layer 1 --sae-width 256 --sae-k 16
    python benchmarks/fpo_step.py --model smollm2-135m-instruct --pairs 4 --length 128 --repeats 3
    python benchmarks/fpo_step.py --model smollm2-135m-instruct --pairs 4 --length 128 --checkpointing --no-timing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step import _status_mb

from sparsealign.data.collate import collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.methods import Need, get_method
from sparsealign.models.loading import enable_gradient_checkpointing, load_bundle
from sparsealign.models.logprobs import TokenModel, unwrap_causal_lm
from sparsealign.recipes.load import load_config
from sparsealign.refcache import ReferenceCache, run_identity, weights_digest
from sparsealign.refcache.build import build_cache
from sparsealign.sae.probe import build_feature_probe
from sparsealign.train.step import build_optimizer, compute_loss, step_inputs

VARIANTS = {  # name: (method, uses the cache)
    "fpo_cache": ("fpo", True),
    "tdpo2_live": ("tdpo2", False),
    "dpo_live": ("dpo", False),
    "dpo_cache": ("dpo", True),
}


def make_pairs(vocab: int, pairs: int, length: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    prompt_len = length // 4

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [
        TokenizedPair(ids(prompt_len), ids(length - prompt_len), ids(length - prompt_len - 8))
        for _ in range(pairs)
    ]


def random_sae(folder: Path, d_in: int, width: int, k: int, layer: int) -> Path:
    """A TopK SAE with random weights of the given shape: same compute as a trained one."""
    from sparsealign.sae import SAEMetadata, SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(
        d_in, width, "topk", k=k, apply_b_dec_to_input=True, metadata=SAEMetadata("resid_post", layer)
    )
    with torch.no_grad():
        sae.W_dec.normal_(0, 1 / d_in**0.5)
        sae.W_enc.copy_(sae.W_dec.T)
    sae.save(folder)
    return folder


def config(args, name: str, cache: Path | None):
    method, cached = VARIANTS[name]
    overrides = [f"model.name={args.model}", f"method.name={method}", "train.progress=false"]
    if args.lora:
        overrides.append("model.lora.r=16")
    if args.checkpointing:
        overrides.append("train.gradient_checkpointing=true")
    if method == "fpo":
        overrides += [f"sae.path={args.sae}", f"sae.layer={args.layer}", "method.alpha=0.5"]
    if method == "tdpo2":
        overrides.append("method.alpha=0.5")
    if cached:
        overrides += [f"reference.cache={cache}", "reference.build_missing=false"]
    return load_config(None, overrides)


def setup(args, name: str, cache: Path, device: torch.device, bundle=None):
    """What one variant's step needs; loads the reference only for live variants."""
    cfg = config(args, name, cache)
    method = get_method(cfg.method.name)
    cached = cfg.reference.cache is not None
    if bundle is None:
        bundle = load_bundle(cfg.model, 0, device, need_reference=method.needs_reference and not cached)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(bundle.policy)
    probe = build_feature_probe(cfg.sae, bundle.policy, device) if Need.SAE_FEATURES in method.needs else None
    ref_cache = None
    if cached:
        digest = weights_digest(unwrap_causal_lm(bundle.policy))
        ref_cache = ReferenceCache(cache_folder(cache, cfg), run_identity(cfg, bundle, probe, digest))
    policy = TokenModel(bundle.policy, cfg.train.logprob_chunk, features=probe).train()  # as the trainer
    optimizer = build_optimizer(policy, cfg, method)  # the library's AdamW (fused)
    items = make_pairs(len(bundle.tokenizer), args.pairs, args.length)
    batch = collate_pairs(items, bundle.tokenizer.pad_token_id).to(device)

    def step() -> float:
        out = compute_loss(policy, step_inputs(cfg, method, bundle, batch, items, ref_cache))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return bundle, step, batch.num_tokens


def cache_folder(root: Path, cfg) -> Path:
    return root / ("with-sae" if Need.SAE_FEATURES in get_method(cfg.method.name).needs else "logps")


def build_caches(args, root: Path, device: torch.device) -> None:
    """The reference caches of the benchmark pairs (one with SAE codes for FPO, one without for DPO)."""
    for name in ("fpo_cache", "dpo_cache"):
        cfg = config(args, name, root)
        cfg.reference.cache = str(cache_folder(root, cfg))
        bundle = load_bundle(cfg.model, 0, device, need_reference=False)
        needs_sae = Need.SAE_FEATURES in get_method(cfg.method.name).needs
        probe = build_feature_probe(cfg.sae, bundle.policy, device) if needs_sae else None
        items = make_pairs(len(bundle.tokenizer), args.pairs, args.length)
        digest = weights_digest(unwrap_causal_lm(bundle.policy))
        expected = run_identity(cfg, bundle, probe, digest)
        build_cache(cfg, bundle, {"train": items, "eval": []}, probe, expected, device, progress=False)


def live_tensor_mb() -> float:
    """Bytes of every tensor storage alive now (weights, optimizer state, caches), each storage once."""
    import gc

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def step_peak_live_mb(step) -> float:
    """Peak bytes of live tensors during one step on CPU, the analogue of CUDA's max_memory_allocated: the
    tensors alive before the step plus the highest net allocation the profiler records within it."""
    from torch.profiler import ProfilerActivity, profile

    before = live_tensor_mb()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace_file:
        prof.export_chrome_trace(trace_file.name)
        events = json.loads(Path(trace_file.name).read_text())["traceEvents"]
    net = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return before + max([0, *net]) / 2**20


def memory(args, name: str, cache: Path, device: torch.device) -> dict:
    """Peak memory of one variant in its second (steady-state) step, run in a fresh process.

    CUDA: ``max_memory_allocated``. CPU: the peak of live tensors (as CUDA's figure: what the tensors need,
    without allocator slack) and the process's peak RSS over its RSS before any model was loaded."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _, step, _ = setup(args, name, cache, device)
        for _ in range(2):
            step()
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    before = _status_mb("VmRSS")
    _, step, _ = setup(args, name, cache, device)
    step()  # the first step creates the optimizer state
    live = step_peak_live_mb(step)
    return {"peak_mb": live, "peak_rss_mb": _status_mb("VmHWM") - before}


def timing(args, cache: Path, device: torch.device) -> dict:
    bundle = None
    steps = {}
    for name in VARIANTS:  # the live variants need the reference: load the bundle with it, share it
        if bundle is None:
            cfg = config(args, "dpo_live", cache)
            bundle = load_bundle(cfg.model, 0, device, need_reference=True)
        _, steps[name], tokens = setup(args, name, cache, device, bundle)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {"tokens_per_step": tokens, "median_step_s": {n: statistics.median(t) for n, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument(
        "--checkpointing", action="store_true", help="Activation checkpointing (as the FPO paper's runs)."
    )
    parser.add_argument("--sae", help="An SAE for FPO (default: a random TopK SAE of --sae-width, --sae-k).")
    parser.add_argument("--layer", type=int, default=20, help="The SAE's block (resid_post).")
    parser.add_argument("--sae-width", type=int, default=4608)
    parser.add_argument("--sae-k", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-timing", action="store_true", help="Measure peak memory only.")
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory_only:
        print(json.dumps(memory(args, args.memory_only, Path(args.cache), device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.sae is None:
            cfg = load_config(None, [f"model.name={args.model}"])
            bundle = load_bundle(cfg.model, 0, torch.device("cpu"), need_reference=False)
            d_in = unwrap_causal_lm(bundle.policy).config.hidden_size
            del bundle
            args.sae = str(random_sae(root / "sae", d_in, args.sae_width, args.sae_k, args.layer))
        build_caches(args, root / "cache", device)
        result = {"model": args.model, "lora": args.lora, "pairs": args.pairs, "length": args.length}
        result["gradient_checkpointing"] = args.checkpointing
        result["device"] = str(device)
        if not args.no_timing:
            result.update(timing(args, root / "cache", device))
        peaks, rss = {}, {}
        for name in VARIANTS:
            argv = [a for a in sys.argv[1:] if a != "--no-timing"]
            cmd = [sys.executable, __file__, *argv, "--sae", args.sae, "--cache", str(root / "cache")]
            out = subprocess.run([*cmd, "--memory-only", name], capture_output=True, text=True, check=True)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[name] = measured["peak_mb"]
            if "peak_rss_mb" in measured:
                rss[name] = measured["peak_rss_mb"]
        result["peak_mb"] = peaks
        targets = {"fpo_cache_memory_over_tdpo2_live (<= 0.85)": peaks["fpo_cache"] / peaks["tdpo2_live"]}
        if rss:
            result["peak_rss_mb"] = rss
            targets["fpo_cache_rss_over_tdpo2_live"] = rss["fpo_cache"] / rss["tdpo2_live"]
        if not args.no_timing:
            med = result["median_step_s"]
            targets["fpo_cache_time_over_dpo_live (<= 1.0)"] = med["fpo_cache"] / med["dpo_live"]
            targets["dpo_live_time_over_dpo_cache (>= 1.2)"] = med["dpo_live"] / med["dpo_cache"]
        result["targets"] = targets
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
