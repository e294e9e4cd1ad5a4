"""One benchmark run of one tool, in its own process: ``vs_trl.py`` calls :func:`run` through a subprocess.

Each tool is run as its user runs it: sparsealign through its training loop (``train.loop.build`` then
``run``, with a recipe of dotted overrides), TRL through ``DPOTrainer(model=<folder>, ...).train()``. Before
training, a run may *probe* the benchmark's pairs (the token ids, response positions, per-sequence log-probs
of policy and reference and the DPO loss, see ``vs_trl_check``); then it trains ``warmup + steps`` optimizer
steps and times each one from the end of the previous step to its own end (a callback at step end in both
tools), so data collation, logging and the optimizer are inside the timed interval and the warm-up steps
are not. Peak memory is read at the end of the last step: the process's peak RSS on CPU
(``resource.getrusage``, model loading included, as a user sees it), ``torch.cuda.max_memory_allocated`` on a
GPU. The result is written to ``spec["result"]`` as JSON and the process ends there: what each tool does
after training (sparsealign's final checkpoint, TRL's teardown) is not part of the comparison.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

BETA = 0.1
LR = 1e-6


def _peak_memory_mb(device: str) -> float:
    """Peak memory so far: CUDA's allocated-tensor peak on a GPU, else the process's peak RSS."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


class _Clock:
    """Step-end timestamps; at the last step, writes the result and ends the process."""

    def __init__(self, spec: dict[str, Any], result: dict[str, Any]):
        self.spec = spec
        self.result = result
        self.ends: list[float] = [time.perf_counter()]
        self.losses: dict[int, float] = {}

    def step_end(self, step: int) -> None:
        if self.spec["device"] == "cuda":
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if step >= self.spec["warmup"] + self.spec["steps"]:
            durations = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
            self.result["step_s"] = durations[self.spec["warmup"] :]
            self.result["warmup_s"] = durations[: self.spec["warmup"]]
            self.result["peak_mb"] = _peak_memory_mb(self.spec["device"])
            self.result["losses"] = self.losses
            Path(self.spec["result"]).write_text(json.dumps(self.result))
            os._exit(0)


def _rows(input_ids, attention_mask, scored) -> list[dict[str, list[int]]]:
    """Per sequence: its non-padding ids and the positions of its scored response tokens (right padding)."""
    rows = []
    for ids, keep, positions in zip(input_ids.tolist(), attention_mask.tolist(), scored, strict=True):
        rows.append({"ids": [t for t, k in zip(ids, keep, strict=True) if k], "response": positions})
    return rows


# --------------------------------------------------------------------------------------------------
# sparsealign


def sparsealign_overrides(spec: dict[str, Any]) -> list[str]:
    """The run's recipe as ``sparsealign train`` overrides (the same settings as :func:`trl_config`)."""
    overrides = [
        f"output_dir={spec['workdir']}/sparsealign-run",
        f"model.name={spec['model']}",
        f"data.path={spec['data']}",
        f"data.max_length={spec['max_length']}",
        f"data.max_prompt_length={spec['max_length'] // 2}",
        "data.eval_fraction=0",
        "method.name=dpo",
        f"method.beta={BETA}",
        f"train.batch_size={spec['pairs']}",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        f"train.lr={LR}",
        "train.schedule=constant",
        "train.max_grad_norm=1.0",
        "train.log_every=1",
        "train.progress=false",
        f"train.precision={spec['precision']}",
        f"train.seed={spec['seed']}",
    ]
    if spec["reference"] == "precomputed":
        overrides.append(f"reference.cache={spec['workdir']}/reference-cache")
    return overrides


def _origin_line(origin: str) -> int:
    return int(origin.rsplit(":", 1)[1])


def probe_sparsealign(session: Any) -> dict[str, Any]:
    """The probe (see ``vs_trl_check``) of a built sparsealign session, on its pairs in file order."""
    import torch

    from sparsealign.data.collate import collate_pairs
    from sparsealign.train.step import step_inputs, step_outputs

    s = session
    items = sorted(s.data.train, key=lambda p: _origin_line(p.origin))
    batch = collate_pairs(items, s.bundle.tokenizer.pad_token_id, s.cfg.data.padding_side)
    batch = batch.to(s.accelerator.device)
    with torch.no_grad():
        inputs = step_inputs(s.cfg, s.method, s.bundle, batch, items, s.cache)
        out = step_outputs(s.policy, inputs)
        loss = s.method.loss(out, s.cfg.method).loss
    mask = batch.response_mask
    scored = [(index[m] + 1).tolist() for index, m in zip(batch.response_index, mask, strict=True)]
    return {
        "rows": _rows(batch.input_ids, batch.attention_mask, scored),
        "policy_logps": (out.policy.logps.float() * mask).sum(-1).tolist(),
        "reference_logps": (out.reference.logps.float() * mask).sum(-1).tolist(),
        "loss": float(loss),
    }


def run_sparsealign(spec: dict[str, Any]) -> dict[str, Any]:
    from sparsealign.recipes.load import load_config
    from sparsealign.train.callbacks import Callbacks
    from sparsealign.train.loop import build, run
    from sparsealign.version import __version__

    result: dict[str, Any] = {"tool": "sparsealign", "version": __version__}
    started = time.perf_counter()
    session = build(load_config(None, sparsealign_overrides(spec)))
    result["setup_s"] = time.perf_counter() - started  # models, tokenisation, reference cache
    if spec["probe"]:
        result["probe"] = probe_sparsealign(session)
    clock = _Clock(spec, result)

    class StepEnd:
        def on_log(self, step: int, metrics: dict[str, Any]) -> None:
            clock.losses[step] = float(metrics["loss"])

        def on_step_end(self, step: int) -> None:
            clock.step_end(step)

    clock.ends = [time.perf_counter()]
    run(session, Callbacks([StepEnd()]))
    raise RuntimeError("sparsealign stopped before the last benchmark step")


# --------------------------------------------------------------------------------------------------
# TRL


def trl_config(spec: dict[str, Any]):
    """TRL's ``DPOConfig`` for the same work: sigmoid DPO, beta, learning rate, batch, steps, clipping,
    constant schedule, no warm-up, fp32 on CPU (``use_cpu``) or bf16 autocast over fp32 weights on a GPU,
    no gradient checkpointing, no saving, no tracker, a log line every step as sparsealign writes."""
    import torch
    from trl import DPOConfig

    cuda = spec["device"] == "cuda"
    return DPOConfig(
        output_dir=f"{spec['workdir']}/trl-run",
        per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=spec["reference"] == "precomputed",
        model_init_kwargs={"dtype": torch.float32},
        use_cpu=not cuda,
        bf16=cuda and spec["precision"] == "bf16-mixed",
        fp16=False,
        activation_checkpointing=False,  # TRL defaults to True (transformers 5 name)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        seed=spec["seed"],
    )


def probe_trl(trainer: Any) -> dict[str, Any]:
    """The probe (see ``vs_trl_check``) of a TRL ``DPOTrainer``, on its (tokenised) dataset in file order."""
    import torch

    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    batch = trainer._prepare_inputs(batch)
    with torch.no_grad():
        policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
        if trainer.precompute_ref_logps:  # what training will read: the precomputed column
            reference = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        else:
            reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
        loss = trainer.compute_loss(trainer.model, batch)
    scored = [row.nonzero().flatten().tolist() for row in batch["completion_mask"]]
    return {
        "rows": _rows(batch["input_ids"], batch["attention_mask"], scored),
        "policy_logps": policy.float().tolist(),
        "reference_logps": reference.float().tolist(),
        "loss": float(loss),
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    result: dict[str, Any] = {"tool": "trl", "version": trl.__version__}
    started = time.perf_counter()
    args = trl_config(spec)
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    trainer = DPOTrainer(
        model=spec["model_folder"], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    result["setup_s"] = time.perf_counter() - started  # models, tokenisation, precomputed log-probs
    result["optimizer"] = args.optim if isinstance(args.optim, str) else args.optim.value
    if spec["probe"]:
        result["probe"] = probe_trl(trainer)
    clock = _Clock(spec, result)

    class StepEnd(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # the last step's line comes after its step end: not recorded
                clock.losses[state.global_step] = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end(state.global_step)

    trainer.add_callback(StepEnd())
    clock.ends = [time.perf_counter()]
    trainer.train()
    raise RuntimeError("TRL stopped before the last benchmark step")


RUNNERS = {"sparsealign": run_sparsealign, "trl": run_trl}


def run(spec: dict[str, Any]) -> None:
    """Run ``spec["tool"]`` as described in the module docstring; the process ends in the last step."""
    RUNNERS[spec["tool"]](spec)
