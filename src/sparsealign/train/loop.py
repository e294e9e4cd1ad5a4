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
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, parse_flag_from_env, set_seed

from sparsealign.config import Config, dump_config, to_dict
from sparsealign.data.collate import Batch, collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.data.prepare import PreparedData
from sparsealign.errors import RunFolderError, TrainingError
from sparsealign.methods import Method, Need, get_method, method_options, save_method_module
from sparsealign.models.digest import weights_digest
from sparsealign.models.loading import (
    ModelBundle,
    enable_gradient_checkpointing,
    load_bundle,
    load_reference,
    save_final,
)
from sparsealign.models.logprobs import TokenModel, resolve_packing, unwrap_causal_lm
from sparsealign.refcache import ReferenceCache, prepare_reference_cache
from sparsealign.train.batches import BatchPlan, shard
from sparsealign.train.callbacks import Callbacks
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
from sparsealign.train.distributed import check_engine
from sparsealign.train.model_card import write_model_card
from sparsealign.train.precision import (
    Precision,
    apply_precision,
    build_accelerator,
    describe,
    resolve_precision,
    training_model_config,
)
from sparsealign.train.prefetch import Prefetcher
from sparsealign.train.preflight import check_resume, preflight
from sparsealign.train.run_folder import RunLock, check_output_dir, claim_run_folder
from sparsealign.train.schedule import build_scheduler
from sparsealign.train.signals import StopOnSignal
from sparsealign.train.step import (
    build_optimizer,
    clip_gradients,
    compute_loss,
    prepare_method_data,
    sae_pooling,
    step_inputs,
)
from sparsealign.train.tracking import require_tracker

logger = logging.getLogger("sparsealign.train")


@dataclass
class TrainedModels:
    """What evaluation after training reads: the trained policy and its reference (``bundle``), the prepared
    data (held-out prompts, reward) and the device. Only the main process gets one."""

    bundle: ModelBundle
    data: PreparedData
    device: torch.device


@dataclass
class RunResult:
    """The outcome of :func:`train`: the run folder, optimizer steps taken, whether it was interrupted, the
    last logged training and evaluation metrics, the trained models (main process), the generation report
    once :func:`sparsealign.api.train` has evaluated, and what the end-of-run summary shows: the run's
    elapsed seconds (continued across resumption), the mean training tokens/s of this session, the best
    held-out ``eval/loss`` and its step, and the paths written (a label -> path map)."""

    output_dir: Path
    steps: int
    interrupted: bool
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    trained: TrainedModels | None = None
    report: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    tokens_per_s: float | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    written: dict[str, Path] = field(default_factory=dict)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus accelerate trackers.

    Each line also carries ``time`` (the wall clock, ISO-8601 UTC) and ``elapsed_s`` (seconds since the run
    started: ``elapsed_before`` — the checkpoint's, on resumption — plus the time since ``started``, a
    :func:`time.perf_counter` reading). Trackers get the metrics only; they keep their own clocks.
    """

    def __init__(self, path: Path, accelerator: Accelerator, started: float, elapsed_before: float = 0.0):
        self.path = path
        self.accelerator = accelerator
        self.started = started
        self.elapsed_before = elapsed_before

    def elapsed(self) -> float:
        """Seconds since the run started, including the time before a resumption."""
        return self.elapsed_before + time.perf_counter() - self.started

    def write(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Append one line for ``step`` and return it (the dict callbacks receive)."""
        record = {"step": step, **{k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()}}
        record["time"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        record["elapsed_s"] = round(self.elapsed(), 3)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        self.accelerator.log(metrics, step=step)
        return record


def best_eval_loss(path: Path) -> tuple[float, int] | None:
    """The lowest ``eval/loss`` in a ``metrics.jsonl`` and its step (the first on ties); None without one."""
    if not path.is_file():
        return None
    best: tuple[float, int] | None = None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        loss = record.get("eval/loss")
        if isinstance(loss, (int, float)) and (best is None or loss < best[0]):
            best = (float(loss), int(record["step"]))
    return best


def progress_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows after a logged step: the loss, the reward accuracy when the method logs
    ``rewards/accuracies``, and the training throughput (tokens/s summed over processes)."""
    postfix = {"loss": f"{metrics['loss']:.4f}"}
    if "rewards/accuracies" in metrics:
        postfix["acc"] = f"{metrics['rewards/accuracies']:.3f}"
    if "tokens_per_s" in metrics:
        postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
    return postfix


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
            batch = collate_pairs(
                items, pad, cfg.data.padding_side, method.rows == "chosen", cfg.train.packing
            ).to(accelerator.device)
            out = compute_loss(policy, step_inputs(cfg, method, bundle, batch, items, cache))
            records.append((len(items) if counted else 0, {"loss": out.loss, **out.metrics}))
    return {f"eval/{k}": v for k, v in _mean_metrics(records, accelerator, accelerator.device).items()}


def save_model(session: Session, folder: Path) -> Path:
    """Write the policy (model or adapter, merged too with ``model.merge_final``) and the method's module, if
    any, to ``folder``, as ``final/`` is written. Main process only."""
    cfg = session.cfg
    saved = save_final(session.bundle, folder, merge=cfg.model.merge_final)
    if session.unwrapped.extra is not None:
        save_method_module(session.unwrapped.extra, cfg.method, saved)
    return saved


def _total_steps(cfg: Config, plan: BatchPlan) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * plan.steps_per_epoch))


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


@dataclass
class Session:
    """A run built and ready to step: what :func:`build` prepares once and :func:`run` trains (the Python
    API's ``Trainer`` holds one). ``policy`` and ``optimizer`` are accelerate-prepared; ``unwrapped`` is the
    bare :class:`TokenModel`; ``resumed`` says whether ``state`` came from a checkpoint."""

    cfg: Config
    accelerator: Accelerator
    method: Method
    bundle: ModelBundle
    data: PreparedData
    plan: BatchPlan
    total: int
    policy: Any
    unwrapped: TokenModel
    optimizer: Any
    scheduler: Any
    cache: ReferenceCache | None
    state: TrainState
    log: MetricsLog
    config_tree: dict[str, Any]
    digest: str | None
    resumed: bool
    lock: RunLock | None = None  # the run folder's lock (main process), released when :func:`run` ends
    precision: Precision | None = None  # the resolved train.precision (:mod:`sparsealign.train.precision`)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def train(cfg: Config, callbacks: Iterable[object] = ()) -> RunResult:
    """Train ``cfg.model`` with ``cfg.method`` on ``cfg.data``; write the run folder; return a summary.
    ``callbacks``: see :mod:`sparsealign.train.callbacks`."""
    hooks = Callbacks(callbacks)  # checked before any expensive work
    return run(build(cfg), hooks)


def evaluate(session: Session, callbacks: Callbacks) -> dict[str, float]:
    """The held-out loss at the current step (:func:`evaluate_loss`), written to ``metrics.jsonl`` and
    passed to the callbacks' ``on_evaluate``; ``{}`` without held-out pairs."""
    s = session
    metrics = evaluate_loss(s.policy, s.bundle, s.method, s.cfg, s.data.eval, s.accelerator, s.cache)
    if metrics:
        record = s.log.write(s.state.step, metrics)
        if s.accelerator.is_main_process:
            callbacks.on_evaluate(s.state.step, record)
    return metrics


def _stop_requested(accelerator: Accelerator, wanted: bool) -> bool:
    """Whether a callback on any process asked to stop; every process gets the same answer."""
    if accelerator.num_processes == 1:
        return wanted
    votes = accelerator.reduce(torch.tensor(float(wanted), device=accelerator.device), reduction="sum")
    return bool(votes.item() > 0)


def _non_finite(accelerator: Accelerator, loss_finite: bool, grad_norm: Any) -> str | None:
    """What was not finite in this step on any process: ``"loss"``, ``"gradient norm"``, or None when the step
    may update the weights. Under fp16's loss scaling an infinite gradient norm is the scaler's business (it
    skips the step and lowers the scale), so only the loss is checked there."""
    norm_bad = accelerator.scaler is None and grad_norm is not None and not math.isfinite(float(grad_norm))
    if not _stop_requested(accelerator, not loss_finite or norm_bad):
        return None
    loss_bad = _stop_requested(accelerator, not loss_finite)
    return "loss" if loss_bad else "gradient norm"


def _skip_step(session: Session, what: str, origins: list[str], bad_run: int) -> int:
    """Count a skipped step (``bad_steps`` in ``metrics.jsonl``, with ``skipped: true`` on its line), log its
    examples' origins and return the number of consecutive skipped steps."""
    state = session.state
    state.bad_steps += 1
    session.log.write(state.step, {"skipped": True, "bad_steps": state.bad_steps})
    if session.accelerator.is_main_process:
        shown = ", ".join(origins[:16]) + (f", ... ({len(origins)} in all)" if len(origins) > 16 else "")
        logger.warning(
            "step %d skipped: non-finite %s (no optimizer update); its examples: %s",
            state.step,
            what,
            shown or "(no origins)",
        )
    return bad_run + 1


def _claim(cfg: Config, accelerator: Accelerator) -> RunLock | None:
    """The main process creates and locks the run folder (:mod:`sparsealign.train.run_folder`); when it
    refuses, the other processes exit quietly (status 2) so that the reason is shown once."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = claim_run_folder(Path(cfg.output_dir), cfg.train.resume, cfg.train.overwrite)
        except RunFolderError as error:
            refused = error
    if _stop_requested(accelerator, refused is not None):
        if refused is not None:
            raise refused
        raise SystemExit(2)
    return lock


def build(cfg: Config) -> Session:
    """Everything before the first step: the run folder's lock, accelerator, models, data, method module,
    SAE probe, reference cache, optimizer, schedule, resumption and the metrics log."""
    started = time.perf_counter()
    require_tracker(cfg.train.tracker)  # before any expensive work: accelerate would only warn
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir)
    preflight(cfg)  # data file, model, room in output_dir: one line each, before anything loads
    tracker = None if cfg.train.tracker == "none" else cfg.train.tracker
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device  # as Accelerator() reads it
    precision = resolve_precision(cfg.train.precision, device, cfg.model.dtype, cfg.train.lr)
    cfg.train.precision = precision.name  # config.yaml and checkpoints record the resolved precision
    accelerator = build_accelerator(
        precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=tracker,
        project_dir=str(output_dir),
    )
    check_engine(accelerator.distributed_type.value, accelerator.device.type)  # e.g. FSDP on CPU
    lock = _claim(cfg, accelerator)
    try:
        session = _build(cfg, accelerator, tracker, started, precision)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    session.lock = lock
    if lock is not None:  # a session that is never run (a Trainer only evaluated) frees the folder too
        weakref.finalize(session, lock.release)
    return session


def _build(
    cfg: Config, accelerator: Accelerator, tracker: str | None, started: float, precision: Precision
) -> Session:
    """:func:`build` once the run folder is this run's."""
    output_dir = Path(cfg.output_dir)
    set_seed(cfg.train.seed)
    method = get_method(cfg.method.name)
    cfg.method = method_options(cfg.method)
    config_tree = to_dict(cfg)

    resume_from = resolve_resume(output_dir, cfg.train.resume)
    check_resume(resume_from, config_tree)  # before any model loads
    if accelerator.is_main_process:
        dump_config(cfg, output_dir / "config.yaml")

    cached = cfg.reference.cache is not None
    if accelerator.is_main_process:
        logger.info(describe(precision))
    bundle = load_bundle(
        training_model_config(cfg.model, precision),
        cfg.train.seed,
        accelerator.device,
        need_reference=method.needs_reference and not cached,
        reference=cfg.reference,
    )
    digest = weights_digest(unwrap_causal_lm(bundle.policy)) if cached else None  # the untrained weights
    apply_precision(bundle, precision, cfg.model.dtype)  # float32 master weights in the mixed modes
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(bundle.policy)
    cfg.train.packing = resolve_packing(cfg.train.packing, bundle.policy)  # config.yaml keeps what was asked
    with accelerator.main_process_first():
        data: PreparedData = prepare_method_data(cfg, method, bundle, accelerator.is_main_process)
    lengths = tuple(len(pair) for pair in data.train) if cfg.train.group_by_length else None
    plan = BatchPlan(
        len(data.train),
        cfg.train.batch_size,
        cfg.train.grad_accum,
        accelerator.num_processes,
        cfg.train.seed,
        lengths,
    )
    if plan.steps_per_epoch == 0:
        raise TrainingError(
            f"Only {len(data.train)} training pairs, but one optimizer step needs {plan.global_batch} "
            f"(train.batch_size x train.grad_accum x processes). Lower train.batch_size or add data."
        )
    total = _total_steps(cfg, plan)

    extra = None
    if method.module is not None:
        extra = method.module(cfg.method, unwrap_causal_lm(bundle.policy).config, cfg.train.seed)
        extra.to(accelerator.device)
    features = None
    if Need.SAE_FEATURES in method.needs:
        from sparsealign.sae.probe import build_feature_probe

        with accelerator.main_process_first():  # a missing built-in SAE is built once, by the main process
            features = build_feature_probe(
                cfg.sae, bundle.policy, accelerator.device, sae_pooling(method, cfg)
            )
    cache = None
    if cached:
        cache = prepare_reference_cache(cfg, bundle, data, features, digest, accelerator.device)
    bundle.untrained = False  # from here on the policy is no longer the reference
    policy = TokenModel(bundle.policy, cfg.train.logprob_chunk, extra, features)
    optimizer = build_optimizer(policy, cfg, method)
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
        accelerator.init_trackers(
            output_dir.resolve().name or "run",  # the run's own folder name, even for ``runs/x/..``
            config={k: str(v) for k, v in config_tree.items()},
            init_kwargs={"wandb": {"dir": str(output_dir)}},  # W&B's files inside the run, not the cwd
        )
    log = MetricsLog(metrics_path, accelerator, started, state.elapsed_s)
    return Session(
        cfg=cfg,
        accelerator=accelerator,
        method=method,
        bundle=bundle,
        data=data,
        plan=plan,
        total=total,
        policy=policy,
        unwrapped=unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        cache=cache,
        state=state,
        log=log,
        config_tree=config_tree,
        digest=digest,
        resumed=resume_from is not None,
        precision=precision,
    )


def run(session: Session, callbacks: Callbacks | None = None) -> RunResult:
    """Step a built session to the end (``train.max_steps`` or ``train.epochs``), logging, evaluating and
    checkpointing on their schedules and calling ``callbacks``; then evaluate and save ``final/``.

    SIGTERM and SIGINT (Ctrl-C) save a checkpoint and return an interrupted result; a second signal ends
    the process at once (:mod:`sparsealign.train.signals`). The run folder's lock is released at the end,
    on errors too."""
    try:
        with StopOnSignal() as stop:
            return _run(session, callbacks if callbacks is not None else Callbacks(), stop)
    finally:
        if session.lock is not None:
            session.lock.release()


def _run(session: Session, callbacks: Callbacks, stop: StopOnSignal) -> RunResult:
    """:func:`run` with the signal handlers in place."""
    s = session
    cfg, accelerator, method, bundle, data, plan, total = (
        s.cfg,
        s.accelerator,
        s.method,
        s.bundle,
        s.data,
        s.plan,
        s.total,
    )
    policy, unwrapped, optimizer, scheduler, cache, state, log = (
        s.policy,
        s.unwrapped,
        s.optimizer,
        s.scheduler,
        s.cache,
        s.state,
        s.log,
    )
    output_dir, config_tree, digest = s.output_dir, s.config_tree, s.digest
    metrics_path = log.path

    def checkpoint(rng: dict[str, Any] | None = None) -> None:
        """Save at the current step boundary; ``rng`` is the RNG state at that boundary (default: now)."""
        rngs = gather_object([rng if rng is not None else rng_state()])
        if accelerator.is_main_process:
            epoch, index = plan.position(state.step)
            state.epoch, state.batch_in_epoch = epoch, index
            state.elapsed_s = log.elapsed()
            path = output_dir / "checkpoints" / f"step-{state.step}"
            save_checkpoint(path, unwrapped, optimizer, scheduler, state, config_tree, rngs)
            prune_checkpoints(output_dir, cfg.train.keep_checkpoints)
            callbacks.on_save(state.step, path)
        accelerator.wait_for_everyone()

    def result(interrupted: bool, trained: TrainedModels | None = None) -> RunResult:
        """The run's outcome and what the end-of-run summary shows (see :class:`RunResult`)."""
        best = best_eval_loss(metrics_path) if accelerator.is_main_process else None
        written = {"config": output_dir / "config.yaml", "metrics": metrics_path}
        if list_checkpoints(output_dir):
            written["checkpoints"] = output_dir / "checkpoints"
        if (output_dir / "final").is_dir():
            written["final"] = output_dir / "final"
        return RunResult(
            output_dir,
            state.step,
            interrupted,
            final_metrics,
            eval_metrics,
            trained=trained,
            elapsed_s=log.elapsed(),
            tokens_per_s=run_tokens / run_seconds if run_seconds > 0 else None,
            best_eval_loss=best[0] if best else None,
            best_eval_step=best[1] if best else None,
            written=written,
        )

    pad = bundle.tokenizer.pad_token_id
    bar = _progress(total, state.step, cfg.train.progress and accelerator.is_main_process)
    last_saved = state.step if s.resumed else -1
    step_start_rng = rng_state()
    interrupted = stopped = False
    final_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else math.inf
    window_tokens, window_start = 0, time.perf_counter()
    run_tokens, run_seconds = 0.0, 0.0  # over the logged windows: the session's mean tokens/s
    bad_run = 0  # consecutive skipped steps

    def collate_step(step: int) -> list[tuple[list[TokenizedPair], Batch]]:
        """This process's micro-batches of optimizer step ``step``, collated on the host."""
        micro = plan.micro_batches(step, accelerator.process_index)
        return [
            (
                items,
                collate_pairs(items, pad, cfg.data.padding_side, method.rows == "chosen", cfg.train.packing),
            )
            for items in ([data.train[j] for j in indices] for indices in micro)
        ]

    prefetch = Prefetcher(collate_step, total)  # the next step's batches are collated while this one runs
    try:
        while state.step < total:
            policy.train()
            step_start_rng = rng_state()  # what a checkpoint taken on Ctrl-C during this step restores
            records = []
            origins: list[str] = []  # the batch's examples, named when the step is skipped
            finite = torch.tensor(True, device=accelerator.device)
            for items, collated in prefetch.get(state.step):
                origins += [item.origin for item in items]
                window_tokens += collated.num_tokens
                batch = collated.to(accelerator.device)
                with accelerator.accumulate(policy):  # syncs gradients and steps only on the last micro-batch
                    out = compute_loss(policy, step_inputs(cfg, method, bundle, batch, items, cache))
                    finite &= torch.isfinite(out.loss.detach()).all()
                    accelerator.backward(out.loss)  # divides by grad_accum
                    bad = None
                    if accelerator.sync_gradients:
                        grad_norm = clip_gradients(accelerator, policy, max_norm)
                        lr = scheduler.get_last_lr()[0]
                        bad = _non_finite(accelerator, bool(finite), grad_norm)
                    if bad is None:  # a non-finite step is skipped: no update of weights or optimizer state
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                records.append((len(items), {"loss": out.loss.detach(), **out.metrics}))
            scheduler.step()
            state.step += 1
            if bad is not None:
                bad_run = _skip_step(s, bad, gather_object(origins), bad_run)
                if bad_run >= cfg.train.max_bad_steps:
                    if bar is not None:
                        bar.close()
                    checkpoint()  # the weights and optimizer state are the last good step's
                    raise TrainingError(
                        f"{bad_run} consecutive steps (up to step {state.step}) had a non-finite {bad}; the "
                        f"run stops (train.max_bad_steps={cfg.train.max_bad_steps}). The last good weights "
                        f"are saved in {output_dir / 'checkpoints' / f'step-{state.step}'}. Try a lower "
                        "train.lr, train.max_grad_norm=1.0 or train.precision=fp32, then train.resume=auto."
                    )
            else:
                bad_run = 0

            if bad is None and (state.step % cfg.train.log_every == 0 or state.step == total):
                metrics = _mean_metrics(records, accelerator, accelerator.device)
                tokens = accelerator.reduce(
                    torch.tensor(float(window_tokens), device=accelerator.device), reduction="sum"
                )
                elapsed = time.perf_counter() - window_start
                run_tokens, run_seconds = run_tokens + float(tokens), run_seconds + elapsed
                metrics.update(
                    lr=lr, grad_norm=float(grad_norm), tokens_per_s=float(tokens) / max(elapsed, 1e-9)
                )
                metrics["epoch"] = state.step / plan.steps_per_epoch
                if state.bad_steps:
                    metrics["bad_steps"] = state.bad_steps
                record = log.write(state.step, metrics)
                if accelerator.is_main_process:
                    callbacks.on_log(state.step, record)
                final_metrics = metrics
                window_tokens, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(progress_postfix(metrics))
            if bar is not None:
                bar.update(1)
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total:
                eval_metrics = evaluate(session, callbacks)
            if cfg.train.save_every and state.step % cfg.train.save_every == 0:
                checkpoint()
                last_saved = state.step
            callbacks.on_step_end(state.step)
            if callbacks and _stop_requested(accelerator, callbacks.should_stop):
                stopped = True
                break
    except KeyboardInterrupt:
        interrupted = True
        if bar is not None:
            bar.close()
        if state.step > 0 and state.step != last_saved:
            checkpoint(step_start_rng)
        how = f" by {stop.received}" if stop.received else ""
        logger.warning(
            "interrupted%s at step %d; checkpoint saved; continue with train.resume=auto", how, state.step
        )
        return result(True)
    finally:
        prefetch.close()
    if bar is not None:
        bar.close()
    if stopped:  # ends as Ctrl-C does, at a step boundary: checkpoint, no final/
        if state.step != last_saved:
            checkpoint()
        logger.warning(
            "stopped by a callback at step %d; checkpoint saved; continue with train.resume=auto", state.step
        )
        return result(True)

    if state.step != last_saved:
        checkpoint()
    eval_metrics = evaluate(session, callbacks)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(session, output_dir / "final")
        write_model_card(output_dir, config_tree)
    if accelerator.is_main_process:
        callbacks.on_save(state.step, output_dir / "final")
    trained = None
    if accelerator.is_main_process:
        if cfg.eval.generate and bundle.reference is None and not (bundle.is_lora or bundle.reference_loader):
            # trained from a cache: load the reference for the evaluation's KL
            model_cfg = training_model_config(cfg.model, s.precision) if s.precision else cfg.model
            bundle.reference = load_reference(model_cfg, cfg.train.seed, accelerator.device, digest)
        trained = TrainedModels(bundle, data, accelerator.device)
    accelerator.end_training()
    return result(interrupted, trained)
