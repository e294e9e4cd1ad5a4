"""The training loop: one readable step, written against accelerate.

``accelerate launch`` runs the same code with DDP, FSDP or DeepSpeed; a plain ``python``/``sparsealign``
call runs one process (CPU by default). Each optimizer step:

1. take this process's ``grad_accum`` micro-batches from the deterministic :class:`BatchPlan`;
2. for each, run the reference (only if the method needs it) and the policy through the one per-token
   log-prob path, feed the method's loss and backpropagate; accelerate's ``accumulate`` divides by
   ``grad_accum``, synchronises gradients across processes and steps the optimizer on the last
   micro-batch only (so DeepSpeed and FSDP see the same calls);
3. clip, step the schedule, log, evaluate and checkpoint on their schedules.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from sparsealign.config import Config, dump_config, to_dict
from sparsealign.data.collate import Batch, collate_mismatched, collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.data.prepare import PreparedData, prepare_data
from sparsealign.errors import UserError
from sparsealign.losses import LossOutput
from sparsealign.methods import Method, StepOutputs, get_method, save_method_module
from sparsealign.models.loading import (
    ModelBundle,
    enable_gradient_checkpointing,
    load_bundle,
    load_reference,
    save_final,
)
from sparsealign.models.logprobs import TokenModel, TokenOutputs, output_head, unwrap_causal_lm
from sparsealign.refcache import ReferenceCache, prepare_reference_cache, weights_digest
from sparsealign.train.batches import BatchPlan, shard
from sparsealign.train.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    rng_state,
    save_checkpoint,
    truncate_metrics,
)
from sparsealign.train.schedule import build_scheduler

logger = logging.getLogger("sparsealign.train")


class TrainingError(UserError, RuntimeError):
    """A run that cannot start or continue, with the reason."""


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    interrupted: bool
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    report: dict[str, Any] | None = None


def reference_outputs(
    ref_model: torch.nn.Module,
    chunk: int,
    method: Method,
    cfg: Config,
    batch: Batch,
    layers: Sequence[int],
    features: torch.nn.Module | None = None,
) -> tuple[TokenOutputs, torch.Tensor | None]:
    """The reference's per-token outputs and, for MaPO, its activation mask ("uniform": all ones).

    For token-KL methods the reference's head is not run here: the policy's forward runs it once per token
    for both the KL and the reference log-probs.
    """
    tokens = TokenModel(ref_model, chunk, features=features)
    head = not method.needs_token_kl
    types = method.activation_types(cfg.method) if method.activation_types is not None else None
    if not types:  # no activation mask, or "uniform" (an empty list): all ones, TDPO1's weighting
        uniform = None if types is None else batch.response_mask.float()
        return tokens(batch, layers=layers, head=head), uniform
    from sparsealign.masks import activation_mask
    from sparsealign.models.activations import capture_activations

    with capture_activations(ref_model, types, batch) as groups:
        out = tokens(batch, layers=layers, head=head)
    return out, activation_mask(groups, batch.response_mask)


def step_outputs(
    policy: torch.nn.Module,
    bundle: ModelBundle,
    method: Method,
    cfg: Config,
    batch: Batch,
    pairs: Sequence[TokenizedPair] = (),
    cache: ReferenceCache | None = None,
) -> StepOutputs:
    """Run the reference (only if the method needs it, with only the layers, activations and head it needs)
    and the policy on one concatenated batch. With a reference ``cache`` the reference side of ``pairs``
    (the pairs ``batch`` was collated from) is read from it and no reference model runs."""
    token_model = getattr(policy, "module", policy)
    reference = reference_head = activation_mask = None
    if method.needs_reference and cache is not None:
        reference = cache.outputs(pairs, batch)
    elif method.needs_reference:
        layers = token_model.extra.layers() if token_model.extra is not None else ()
        with torch.no_grad(), bundle.reference_model() as ref_model:
            reference, activation_mask = reference_outputs(
                ref_model, token_model.chunk, method, cfg, batch, layers, token_model.features
            )
            if method.needs_token_kl:
                reference_head = output_head(ref_model)
    out = policy(batch, reference=reference, reference_head=reference_head)
    if reference is not None:
        reference.layers = {}  # the mask module has used them: free them before the backward pass
    result = StepOutputs(out, reference, batch.num_pairs, activation_mask)
    if method.needs_mismatched:
        result.mismatched_policy, result.mismatched_reference = mismatched_outputs(
            policy, bundle, cfg, batch, pairs, cache
        )
    return result


@torch.no_grad()
def mismatched_outputs(
    policy: torch.nn.Module,
    bundle: ModelBundle,
    cfg: Config,
    batch: Batch,
    pairs: Sequence[TokenizedPair],
    cache: ReferenceCache | None = None,
) -> tuple[TokenOutputs, TokenOutputs]:
    """Policy and reference log-probs of each prompt of ``pairs`` continued by its mismatched response
    (KTO's reference point): a separate forward without gradients, as the reference point is detached."""
    if len(pairs) != batch.num_pairs:
        raise ValueError("KTO needs the pairs the batch was collated from (compute_loss(..., pairs))")
    rows = collate_mismatched(pairs, bundle.tokenizer.pad_token_id, cfg.data.padding_side)
    rows = rows.to(batch.input_ids.device)
    if cache is not None:
        reference = cache.mismatched_outputs(pairs, rows)
    else:
        with bundle.reference_model() as ref_model:
            reference = TokenModel(ref_model, getattr(policy, "module", policy).chunk)(rows)
    return policy(rows), reference


def compute_loss(
    policy: torch.nn.Module,
    bundle: ModelBundle,
    method: Method,
    cfg: Config,
    batch: Batch,
    pairs: Sequence[TokenizedPair] = (),
    cache: ReferenceCache | None = None,
) -> LossOutput:
    return method.compute(step_outputs(policy, bundle, method, cfg, batch, pairs, cache), cfg.method)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus accelerate trackers."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()}}
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.accelerator.log(metrics, step=step)


def _mean_metrics(
    records: list[tuple[int, dict[str, torch.Tensor]]], accelerator: Accelerator, device
) -> dict[str, float]:
    """Example-weighted means over micro-batches and processes."""
    if not records:
        return {}
    names = sorted(records[0][1])
    totals = torch.zeros(len(names) + 1, device=device, dtype=torch.float64)
    for weight, metrics in records:
        totals[:-1] += torch.stack([metrics[n].double() * weight for n in names]).to(device)
        totals[-1] += weight
    totals = accelerator.reduce(totals, reduction="sum")
    return {name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}


def evaluate_loss(
    policy: torch.nn.Module,
    bundle: ModelBundle,
    method: Method,
    cfg: Config,
    pairs: list[TokenizedPair],
    accelerator: Accelerator,
    cache: ReferenceCache | None = None,
) -> dict[str, float]:
    """Held-out loss and metrics (``eval/loss``, ``eval/rewards/accuracies``, ...)."""
    if not pairs:
        return {}
    pad = bundle.tokenizer.pad_token_id
    batches = shard(pairs, cfg.eval.batch_size, accelerator.process_index, accelerator.num_processes)
    if cfg.eval.max_batches is not None:
        batches = batches[: cfg.eval.max_batches]
    records = []
    policy.eval()
    with torch.no_grad():
        for items, counted in batches:
            batch = collate_pairs(items, pad, cfg.data.padding_side, not method.paired).to(accelerator.device)
            out = compute_loss(policy, bundle, method, cfg, batch, items, cache)
            records.append((len(items) if counted else 0, {"loss": out.loss, **out.metrics}))
    return {f"eval/{k}": v for k, v in _mean_metrics(records, accelerator, accelerator.device).items()}


def build_feature_probe(cfg: Config, bundle: ModelBundle, device: torch.device) -> torch.nn.Module:
    """FPO: the frozen SAE of ``sae.*`` at its hook site, checked against the model's width and depth."""
    from sparsealign.sae import load_sae, site_module
    from sparsealign.sae.probe import FeatureProbe

    model_config = unwrap_causal_lm(bundle.policy).config
    sae = load_sae(cfg.sae.path, d_in=model_config.hidden_size)
    layer = cfg.sae.layer if cfg.sae.layer is not None else sae.layer
    if layer is None:
        raise TrainingError(f"The SAE at {cfg.sae.path} records no layer: set sae.layer.")
    try:
        site_module(unwrap_causal_lm(bundle.policy), cfg.sae.site, layer)
    except ValueError as error:
        raise TrainingError(f"sae.site={cfg.sae.site} sae.layer={layer}: {error}") from None
    return FeatureProbe(sae, cfg.sae.site, layer).to(device)


def _total_steps(cfg: Config, plan: BatchPlan) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))


def build_optimizer(model: TokenModel, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. A method's own module (mask networks) has its own weight decay
    on its weight matrices (``method.mask_weight_decay``), none on biases and norms, as in SparsePO.

    The fused implementation (CPU and CUDA) updates each tensor in place: no optimizer-wide temporaries, so
    the step's peak memory is the states themselves (the for-each default allocates copies of all of them),
    and it is several times faster on CPU."""
    t = cfg.train
    policy = [p for p in model.model.parameters() if p.requires_grad]
    groups = [{"params": policy, "weight_decay": t.weight_decay}] if policy else []
    if model.extra is not None:
        named = [(n, p) for n, p in model.extra.named_parameters() if p.requires_grad]
        decayed = [p for n, p in named if p.dim() >= 2]
        plain = [p for n, p in named if p.dim() < 2]
        groups += [
            {"params": decayed, "weight_decay": cfg.method.mask_weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TrainingError("The model has no trainable parameters.")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), fused=fused)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: Config) -> RunResult:
    """Train ``cfg.model`` with ``cfg.method`` on ``cfg.data``; write the run folder; return a summary."""
    output_dir = Path(cfg.output_dir)
    tracker = None if cfg.train.tracker == "none" else cfg.train.tracker
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum, log_with=tracker, project_dir=str(output_dir)
    )
    set_seed(cfg.train.seed)
    method = get_method(cfg.method.name)
    config_tree = to_dict(cfg)

    resume_from = resolve_resume(output_dir, cfg.train.resume)
    if (
        resume_from is None
        and cfg.train.resume is None
        and list_checkpoints(output_dir)
        and accelerator.is_main_process
    ):
        logger.warning(
            "%s already holds checkpoints; starting afresh (train.resume=auto would continue).", output_dir
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")

    cached = cfg.reference.cache is not None
    bundle = load_bundle(
        cfg.model, cfg.train.seed, accelerator.device, need_reference=method.needs_reference and not cached
    )
    digest = weights_digest(unwrap_causal_lm(bundle.policy)) if cached else None  # the untrained weights
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(bundle.policy)
    with accelerator.main_process_first():
        data: PreparedData = prepare_data(cfg, bundle, accelerator.is_main_process)
    plan = BatchPlan(
        len(data.train), cfg.train.batch_size, cfg.train.grad_accum, accelerator.num_processes, cfg.train.seed
    )
    if plan.steps_per_epoch == 0:
        raise TrainingError(
            f"Only {len(data.train)} training pairs, but one optimizer step needs {plan.global_batch} "
            f"(train.batch_size x train.grad_accum x processes). Lower train.batch_size or add data."
        )
    total = _total_steps(cfg, plan)

    extra = None
    if method.build_module is not None:
        extra = method.build_module(cfg.method, unwrap_causal_lm(bundle.policy).config, cfg.train.seed)
        extra.to(accelerator.device)
    features = build_feature_probe(cfg, bundle, accelerator.device) if method.needs_features else None
    cache = None
    if cached:
        cache = prepare_reference_cache(cfg, bundle, data, features, digest, accelerator.device)
    bundle.untrained = False  # from here on the policy is no longer the reference
    policy = TokenModel(bundle.policy, cfg.train.logprob_chunk, extra, features)
    optimizer = build_optimizer(policy, cfg)
    warmup = cfg.train.warmup_steps or round(cfg.train.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, warmup, total, cfg.train.schedule)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)

    state = TrainState()
    metrics_path = output_dir / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, unwrapped, optimizer, scheduler, config_tree, accelerator.process_index
        )
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, state.step)
            logger.info("resumed from %s at step %d", resume_from, state.step)
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    if tracker:
        accelerator.init_trackers(output_dir.name, config={k: str(v) for k, v in config_tree.items()})
    log = MetricsLog(metrics_path, accelerator)

    def checkpoint(rng: dict[str, Any] | None = None) -> None:
        """Save at the current step boundary; ``rng`` is the RNG state at that boundary (default: now)."""
        rngs = gather_object([rng if rng is not None else rng_state()])
        if accelerator.is_main_process:
            epoch, index = plan.position(state.step)
            state.epoch, state.batch_in_epoch = epoch, index
            save_checkpoint(
                output_dir / "checkpoints" / f"step-{state.step}",
                unwrapped,
                optimizer,
                scheduler,
                state,
                config_tree,
                rngs,
            )
            prune_checkpoints(output_dir, cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    pad = bundle.tokenizer.pad_token_id
    bar = _progress(total, state.step, cfg.train.progress and accelerator.is_main_process)
    last_saved = state.step if resume_from is not None else -1
    step_start_rng = rng_state()
    interrupted = False
    final_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf
    window_tokens, window_start = 0, time.perf_counter()
    try:
        while state.step < total:
            policy.train()
            step_start_rng = rng_state()  # what a checkpoint taken on Ctrl-C during this step restores
            records = []
            micro = plan.micro_batches(state.step, accelerator.process_index)
            for indices in micro:
                items = [data.train[j] for j in indices]
                batch = collate_pairs(items, pad, cfg.data.padding_side, not method.paired).to(
                    accelerator.device
                )
                with accelerator.accumulate(policy):  # syncs gradients and steps only on the last micro-batch
                    out = compute_loss(policy, bundle, method, cfg, batch, items, cache)
                    accelerator.backward(out.loss)  # divides by grad_accum
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_norm)
                        lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                records.append((len(indices), {"loss": out.loss.detach(), **out.metrics}))
                window_tokens += batch.num_tokens
            scheduler.step()
            state.step += 1

            if state.step % cfg.train.log_every == 0 or state.step == total:
                metrics = _mean_metrics(records, accelerator, accelerator.device)
                tokens = accelerator.reduce(
                    torch.tensor(float(window_tokens), device=accelerator.device), reduction="sum"
                )
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    lr=lr, grad_norm=float(grad_norm), tokens_per_s=float(tokens) / max(elapsed, 1e-9)
                )
                metrics["epoch"] = state.step / plan.steps_per_epoch
                log.write(state.step, metrics)
                final_metrics = metrics
                window_tokens, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total:
                eval_metrics = evaluate_loss(policy, bundle, method, cfg, data.eval, accelerator, cache)
                if eval_metrics:
                    log.write(state.step, eval_metrics)
            if cfg.train.save_every and state.step % cfg.train.save_every == 0:
                checkpoint()
                last_saved = state.step
    except KeyboardInterrupt:
        interrupted = True
        if bar is not None:
            bar.close()
        if state.step > 0 and state.step != last_saved:
            checkpoint(step_start_rng)
        logger.warning(
            "interrupted at step %d; checkpoint saved; continue with train.resume=auto", state.step
        )
        return RunResult(output_dir, state.step, True, final_metrics, eval_metrics)
    if bar is not None:
        bar.close()

    if state.step != last_saved:
        checkpoint()
    eval_metrics = evaluate_loss(policy, bundle, method, cfg, data.eval, accelerator, cache)
    if eval_metrics:
        log.write(state.step, eval_metrics)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = save_final(bundle, output_dir / "final", merge=cfg.model.merge_final)
        if unwrapped.extra is not None:
            save_method_module(unwrapped.extra, cfg.method, final)
    report = None
    if cfg.eval.generate and data.eval_prompts and accelerator.is_main_process:
        from sparsealign.eval.report import evaluate_generations

        if bundle.reference is None and not bundle.is_lora:  # trained from a cache: load it for the KL
            bundle.reference = load_reference(cfg.model, cfg.train.seed, accelerator.device, digest)
        report = evaluate_generations(
            bundle, data.reward, data.eval_prompts, cfg.eval, cfg.train.seed, output_dir
        )
    accelerator.end_training()
    return RunResult(output_dir, state.step, interrupted, final_metrics, eval_metrics, report)
