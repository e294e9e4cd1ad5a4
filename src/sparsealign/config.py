"""Run configuration: one dataclass per concern, YAML recipes, dotted ``key=value`` overrides.

A recipe is a YAML file whose top-level keys are the fields of :class:`Config` (``output_dir``) and the
concerns (``model``, ``data``, ``pairs``, ``reward``, ``method``, ``train``, ``eval``). Any field can be
overridden after the recipe on the command line, e.g.::

    sparsealign train configs/imdb/dpo.yaml method.beta=0.2 train.max_steps=50

Values given on the command line are parsed as YAML scalars/lists (``train.lr=5e-4``,
``model.lora.target_modules=[q_proj,v_proj]``, ``model.lora=null``). Unknown keys and values of the wrong
type raise :class:`ConfigError`, which names the key and suggests the closest valid one.

This module imports nothing heavy (no torch), so ``sparsealign --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsealign.errors import ConfigError

logger = logging.getLogger("sparsealign.config")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LoraConfig:
    """Low-rank adapters through PEFT. The reference model is the base with the adapter disabled."""

    r: int = _help("Adapter rank.", default=16)
    alpha: int = _help("LoRA scaling numerator (scale = alpha / r).", default=32)
    dropout: float = _help("Dropout on the adapter input (0 keeps training deterministic).", default=0.0)
    target_modules: list[str] | str = _help(
        "Module names to adapt, or 'all-linear' (every linear layer except the output head).",
        default="all-linear",
    )


@dataclass
class ModelConfig:
    name: str = _help(
        "Hub id, local folder, or a built-in: tiny-random-llama, tiny-random-gpt2, smollm2-135m-instruct.",
        default="tiny-random-llama",
    )
    revision: str | None = _help(
        "Hub revision (branch, tag or commit) when `name` is a hub id.", default=None
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _help(
        "Storage dtype of the loaded weights. 'auto': for inference bfloat16 on GPU and float32 on CPU; for "
        "training what train.precision needs (float32 master weights in fp32 and the mixed modes). An explicit "
        "half dtype stores the frozen weights (reference, LoRA base) in it; trained weights stay float32 "
        "unless train.precision=bf16-pure.",
        default="auto",
    )
    trust_remote_code: bool = _help("Allow model code from the hub repository to run.", default=False)
    lora: LoraConfig | None = _help("LoRA adapter settings; null trains all weights.", default=None)
    disable_dropout: bool = _help("Set every dropout probability in policy and reference to 0.", default=True)
    merge_final: bool = _help("With LoRA, also write a merged full model to final/merged/.", default=False)
    tokenizer: str | None = _help(
        "A separate tokenizer (built-in, folder or hub id, at its default revision); null: the model's own.",
        default=None,
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = _help(
        "Attention kernel passed to transformers (flash_attention_2 needs CUDA and the flash-attn package); "
        "null: transformers' default.",
        default=None,
    )
    load_in_4bit: bool = _help(
        "QLoRA: load the base weights in 4-bit NF4 through bitsandbytes (needs CUDA, bitsandbytes and "
        "model.lora).",
        default=False,
    )
    load_in_8bit: bool = _help(
        "Load the base weights in 8-bit through bitsandbytes (needs CUDA, bitsandbytes and model.lora).",
        default=False,
    )


@dataclass
class DataConfig:
    path: str | None = _help("A local data file: .jsonl, .json, .parquet or .csv.", default=None)
    dataset: str | None = _help(
        "A Hugging Face datasets name or a folder written by `Dataset.save_to_disk`.", default=None
    )
    source: str | None = _help(
        "A named source from the registry (e.g. 'imdb', 'hh', 'mix'); public sources read their local copy from "
        "data.path (docs/data.md).",
        default=None,
    )
    mix: list[dict[str, Any]] = _help(
        "With data.source=mix: entries {source: NAME, path: FILE, weight: W, split: S, eval_split: E}.",
        default_factory=list,
    )
    split: str = _help("Split to train on (for `dataset`).", default="train")
    eval_split: str | None = _help(
        "Split to evaluate on (for `dataset`); else `eval_fraction` is held out.", default=None
    )
    eval_fraction: float = _help(
        "Fraction of examples held out for evaluation when there is no eval split.", default=0.05
    )
    columns: dict[str, str] = _help(
        "Column mapping, e.g. {prompt: question, chosen: good, rejected: bad}.", default_factory=dict
    )
    chat_template: str | None = _help(
        "Jinja chat template, a path to one, or a built-in name ('halos': HALOs' <|user|>/<|assistant|> "
        "format) for conversational rows; default: the tokenizer's.",
        default=None,
    )
    sft_turns: Literal["all", "last"] = _help(
        "Rows with only 'messages' (SFT): train on every assistant turn or on the last one.", default="all"
    )
    flatten_pairs: bool = _help(
        "Turn each preference pair into two binary-feedback items (chosen: desirable, rejected: undesirable), "
        "as TRL's unpair_preference_dataset, for method.name=kto.",
        default=False,
    )
    add_bos: Literal["auto"] | bool = _help(
        "BOS in front of every prompt: 'auto' as the tokenizer does, true always (the SparsePO GPT-2 "
        "recipes, as the original TRL pipeline prepended <|endoftext|>), false never.",
        default="auto",
    )
    max_length: int = _help("Longest prompt+response in tokens; longer responses are truncated.", default=512)
    max_prompt_length: int = _help("Longest prompt in tokens; longer prompts are truncated.", default=256)
    truncation: Literal["keep_end", "keep_start"] = _help(
        "Which end of a too-long prompt to keep (responses always keep their start).", default="keep_end"
    )
    strict: bool = _help("Treat any bad row as an error instead of a counted skip.", default=False)
    max_examples: int | None = _help("Use at most this many training examples.", default=None)
    padding_side: Literal["right", "left"] = _help("Padding side of the model batches.", default="right")


@dataclass
class PairsConfig:
    """On-policy preference pairs: the reference samples continuations and a reward picks chosen/rejected."""

    num_prompts: int = _help("Training prompts to sample for.", default=512)
    eval_prompts: int = _help("Held-out prompts (never trained on) for evaluation.", default=64)
    samples_per_prompt: int = _help("Continuations sampled per prompt (at least 2).", default=2)
    prompt_words: int = _help("Words of the review kept as the prompt.", default=8)
    max_new_tokens: int = _help("Tokens sampled per continuation.", default=24)
    temperature: float = _help("Sampling temperature.", default=1.0)
    top_p: float = _help("Nucleus sampling threshold.", default=1.0)
    min_reward_gap: float = _help("Pairs whose reward gap is at most this are dropped as ties.", default=0.0)
    batch_size: int = _help("Prompts per generation batch.", default=32)
    seed: int = _help("Seed for prompt selection and sampling.", default=0)


@dataclass
class RewardConfig:
    name: str = _help(
        "'imdb-sentiment' (TF-IDF + logistic regression trained offline on IMDB labels), or a hub id / "
        "local folder of a sequence classifier such as lvwerra/distilbert-imdb.",
        default="imdb-sentiment",
    )
    positive_label: int = _help(
        "Class index whose log-odds is the reward, for sequence classifiers.", default=1
    )
    batch_size: int = _help("Texts per scoring batch.", default=64)


@dataclass
class MethodOptions:
    """The ``method:`` section. Each method in ``sparsealign.methods`` subclasses this with its own options
    (a dataclass with defaults and help); the recipe loader builds the subclass that ``name`` selects, so a
    key that the chosen method does not have is an error, never silently ignored."""

    name: str | None = _help(
        "Training method: a registered name (`sparsealign config --keys` lists them with their options), "
        "or a user-defined one as path/to/file.py:name or package.module:name; null: the registry's default.",
        default=None,
    )


# The SparsePO code's generic option name for the method, accepted with a note. Method-specific aliases are
# declared by each method (``Method.aliases``).
NAME_ALIASES = ("pref_optim",)


@dataclass
class SAEConfig:
    """The sparse autoencoder whose features FPO constrains (``sae.site=resid_post sae.layer=L``)."""

    path: str | None = _help(
        "SAE folder or file (SAELens, Gemma Scope params.npz, EleutherAI sparsify), a hub id, or a built-in "
        "name such as smollm2-135m-instruct-imdb (`sparsealign sae train --builtin NAME` builds it).",
        default=None,
    )
    site: Literal["resid_post", "mlp_out"] = _help(
        "Hook site: a block's output, or its MLP's output.", default="resid_post"
    )
    layer: int | None = _help(
        "Decoder block of the site (default: the layer recorded with the SAE).", default=None
    )


@dataclass
class ReferenceConfig:
    """Where the reference side comes from: the live reference model, or an offline cache of its outputs."""

    cache: str | None = _help(
        "A reference cache folder (written by `sparsealign cache`): training then runs no reference model. "
        "Only for methods whose needs a cache provides (reference log-probs, pooled SAE codes, mismatched "
        "rows); `sparsealign config --keys` marks them.",
        default=None,
    )
    build_missing: bool = _help(
        "Build a missing reference.cache before training (false: a missing cache is an error).", default=True
    )
    feature_top_k: int | None = _help(
        "FPO cache: keep only the top-k pooled reference SAE codes per response (null: every non-zero, "
        "exact for any method.index_set; k: exact for index_set=reference with method.k <= k).",
        default=None,
    )
    batch_size: int = _help("Pairs per reference forward while building the cache.", default=8)
    model: str | None = _help(
        "A different reference model (built-in, folder or hub id), e.g. the base model while model.name is "
        "an SFT checkpoint; it must share the policy's tokenizer. null: the policy's starting point (a frozen "
        "copy, or the disabled LoRA adapter).",
        default=None,
    )
    revision: str | None = _help(
        "Hub revision of reference.model (branch, tag or commit) when it is a hub id.", default=None
    )


@dataclass
class TrainConfig:
    max_steps: int = _help("Optimizer steps; 0 means `epochs` passes over the data.", default=0)
    epochs: float = _help("Passes over the training data when `max_steps` is 0.", default=1.0)
    batch_size: int = _help("Pairs per micro-batch per process.", default=4)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", default=1)
    lr: float = _help("Peak learning rate (AdamW).", default=5e-7)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_betas: list[float] = _help("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = _help("Linear warm-up steps from 0 to `lr`.", default=0)
    warmup_ratio: float = _help("Warm-up as a fraction of all steps (instead of warmup_steps).", default=0.0)
    schedule: Literal["constant", "linear", "cosine"] = _help("Decay after warm-up.", default="constant")
    max_grad_norm: float | None = _help(
        "Clip the global gradient norm to this (null: no clipping).", default=1.0
    )
    seed: int = _help("Seed for model init (built-ins), data order and dropout.", default=42)
    log_every: int = _help("Write a metrics.jsonl line every N optimizer steps.", default=1)
    save_every: int = _help("Write a checkpoint every N optimizer steps (0: only at the end).", default=0)
    keep_checkpoints: int | None = _help("Keep only the newest N checkpoints (null: keep all).", default=None)
    eval_every: int = _help("Evaluate on the held-out split every N steps (0: only at the end).", default=0)
    resume: str | None = _help(
        "'auto' (newest complete checkpoint in output_dir), a checkpoint folder, or null.", default=None
    )
    overwrite: bool = _help(
        "Start afresh in an output_dir that holds another run's checkpoints or metrics: the old run is moved "
        "aside to a sibling folder '<output_dir>.old-<UTC time>' (nothing is deleted).",
        default=False,
    )
    max_bad_steps: int = _help(
        "A step whose loss or gradient norm is not finite is skipped (no optimizer update) and counted; after "
        "this many consecutive skipped steps the run stops with a checkpoint of the last good weights.",
        default=3,
    )
    tracker: Literal["none", "tensorboard", "wandb", "mlflow", "trackio"] = _help(
        "Experiment tracker through accelerate, besides metrics.jsonl; its package comes with the extra of "
        "the same name: pip install 'sparsealign[tensorboard]' (or wandb, mlflow, trackio).",
        default="none",
    )
    logprob_chunk: int = _help(
        "Response tokens per chunk in the log-prob/KL head (memory vs. speed).", default=256
    )
    gradient_checkpointing: bool = _help(
        "Recompute each decoder block's activations in the backward pass instead of keeping them "
        "(much less activation memory, about a third more step time).",
        default=False,
    )
    group_by_length: bool = _help(
        "Sort each optimizer step's examples by length before dealing them into micro-batches (with "
        "grad_accum > 1 or several processes): less padding, the same examples per step and the same losses.",
        default=False,
    )
    packing: Literal["auto"] | bool = _help(
        "Padding-free forwards: the sequences of a micro-batch are packed into fewer rows, each keeping its "
        "own position ids, with attention kept within each sequence (flash/varlen attention where supported, "
        "a block-diagonal mask otherwise); outputs equal the padded forward's. true: always; false: padded "
        "rows; auto: a batch is packed when that computes at most 85% of the padded positions. A model whose "
        "packed forward is not exact (checked once at start) trains padded (auto) or is refused (true).",
        default="auto",
    )
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"] = _help(
        "Numeric precision of training. fp32: everything float32. bf16-mixed / fp16-mixed: float32 master "
        "weights and optimizer state, bfloat16 / float16 autocast forward (fp16 with loss scaling; CUDA only), "
        "log-probs, KL and losses in float32. bf16-pure: bfloat16 weights, which lose updates smaller than "
        "|w|/512 (most of them at small learning rates); only on request. auto: bf16-mixed on a CUDA GPU with "
        "bfloat16 support (or with a half model.dtype), fp32 elsewhere. config.yaml records the resolved value.",
        default="auto",
    )
    progress: bool = _help("Show a progress bar.", default=True)


@dataclass
class EvalConfig:
    batch_size: int = _help("Pairs per batch for the held-out loss evaluation.", default=8)
    max_batches: int | None = _help("Evaluate on at most this many held-out batches.", default=None)
    generate: bool = _help(
        "After training, sample from reference and policy on held-out prompts and report reward and KL.",
        default=False,
    )
    max_new_tokens: int = _help("Tokens sampled per held-out prompt in the final report.", default=24)
    samples_per_prompt: int = _help("Samples per held-out prompt in the final report.", default=2)
    temperature: float = _help("Sampling temperature for the final report.", default=1.0)


@dataclass
class Config:
    output_dir: str = _help(
        "Run folder: config.yaml, metrics.jsonl, checkpoints/, final/, report/.", default="runs/default"
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    method: MethodOptions = field(default_factory=MethodOptions)
    sae: SAEConfig = field(default_factory=SAEConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# TRL's names: the options of TRL's DPOConfig / transformers' TrainingArguments, accepted with a note.


def _literal_values(cls: type, name: str) -> tuple[str, ...]:
    return typing.get_args(typing.get_type_hints(cls)[name])


def _schedule(value: Any) -> str:
    """``lr_scheduler_type``: transformers' linear/cosine are warm-up then decay to 0, as ours; its
    ``constant_with_warmup`` is our ``constant`` (warm-up, then flat), and its ``constant`` too (ours has no
    warm-up unless train.warmup_steps / warmup_ratio ask for one)."""
    ours = _literal_values(TrainConfig, "schedule")
    mapped = "constant" if value == "constant_with_warmup" else value
    if mapped not in ours:
        raise ConfigError(
            f"TRL's lr_scheduler_type={value!r} has no equivalent here: train.schedule is one of "
            f"{', '.join(ours)} (each after train.warmup_steps / train.warmup_ratio)."
        )
    return mapped


def _tracker(value: Any) -> str:
    """``report_to``: a name or a list of names (the first is used); none/None: no tracker."""
    ours = _literal_values(TrainConfig, "tracker")
    if isinstance(value, list | tuple):
        if len(value) > 1:
            logger.info("config: report_to=%r: one tracker is supported; using the first", list(value))
        value = value[0] if value else "none"
    mapped = "none" if value is None else value
    if mapped not in ours:
        raise ConfigError(
            f"TRL's report_to={value!r} has no equivalent here: train.tracker is one of {', '.join(ours)}."
        )
    return mapped


def _bf16(value: Any) -> str:
    """``bf16``: transformers' bf16=true is bfloat16 mixed precision (float32 weights, bfloat16 autocast),
    our ``train.precision=bf16-mixed``; bf16=false is full precision, ``train.precision=fp32``."""
    if isinstance(value, bool):
        return "bf16-mixed" if value else "fp32"
    raise ConfigError(f"TRL's bf16={value!r} must be true or false (train.precision=bf16-mixed or fp32).")


def _steps(name: str, ours: str) -> Callable[[Any], Any]:
    """``logging_steps``/``save_steps``/``eval_steps``: a step count is ours; transformers' float below 1
    (a fraction of the run) is refused."""

    def convert(value: Any) -> Any:
        if isinstance(value, float) and 0 < value < 1:
            raise ConfigError(
                f"TRL's {name}={value} (a fraction of the run) has no equivalent here: {ours} counts "
                "optimizer steps."
            )
        return value

    return convert


def _no_completion_cap(value: Any) -> Any:
    raise ConfigError(
        f"TRL's max_completion_length={value!r} caps the response alone; sparsealign has no such cap: "
        "data.max_length caps prompt + response (a response gets what its prompt leaves) and "
        "data.max_prompt_length the prompt. For TRL's max_prompt_length=P, max_completion_length=C write "
        "data.max_prompt_length=P data.max_length=P+C."
    )


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class TrlName:
    """One of TRL's option names. ``key``: our dotted key; ``convert``: TRL's value to ours, raising
    :class:`ConfigError` where there is no honest equivalent. Two names are resolved later: ``loss_type``
    (kept as ``method.loss_type``; the method registry turns it into ``method.name``) and
    ``precompute_ref_log_probs`` (kept as ``reference.precompute_ref_log_probs`` until ``output_dir`` is
    known, see :func:`build_config`)."""

    key: str
    convert: Callable[[Any], Any] = _same
    note: str = ""

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]


LOSS_TYPE = "loss_type"
PRECOMPUTE = "precompute_ref_log_probs"

TRL_NAMES: dict[str, TrlName] = {
    "learning_rate": TrlName("train.lr"),
    "gradient_accumulation_steps": TrlName("train.grad_accum"),
    "per_device_train_batch_size": TrlName("train.batch_size"),
    "per_device_eval_batch_size": TrlName("eval.batch_size"),
    "num_train_epochs": TrlName("train.epochs"),
    "logging_steps": TrlName("train.log_every", _steps("logging_steps", "train.log_every")),
    "save_steps": TrlName("train.save_every", _steps("save_steps", "train.save_every")),
    "eval_steps": TrlName("train.eval_every", _steps("eval_steps", "train.eval_every")),
    "lr_scheduler_type": TrlName(
        "train.schedule", _schedule, "linear, cosine, constant (and constant_with_warmup: constant)"
    ),
    "report_to": TrlName("train.tracker", _tracker, "a list uses its first entry"),
    "bf16": TrlName("train.precision", _bf16, "true: bf16-mixed; false: fp32"),
    "overwrite_output_dir": TrlName("train.overwrite", note="true: a used run folder is moved aside"),
    "group_by_length": TrlName(
        "train.group_by_length", note="sorts within each optimizer step only, so the losses do not change"
    ),
    "padding_free": TrlName("train.packing", note="true: always pack; false: padded rows (default auto)"),
    "max_completion_length": TrlName(
        "data.max_length", _no_completion_cap, "refused: data.max_length caps prompt + response"
    ),
    LOSS_TYPE: TrlName("method.name", note="sigmoid: dpo, ipo: ipo; hinge and robust are refused"),
    PRECOMPUTE: TrlName("reference.cache", note="true: <output_dir>/reference-cache"),
}
"""TRL's ``DPOConfig`` / ``TrainingArguments`` names: TRL name → our key. Each is accepted bare
(``learning_rate=1e-6``), in its section or under ``train`` (``train.learning_rate``), with a note naming
our key."""

_KEPT_AS = {LOSS_TYPE: ("method", LOSS_TYPE), PRECOMPUTE: ("reference", PRECOMPUTE)}
"""The TRL names resolved after the whole tree is known, and where they wait until then."""


def trl_name_at(dotted: str) -> str | None:
    """The TRL name that the dotted key ``dotted`` gives (bare, in its own section or under ``train``)."""
    parts = dotted.split(".")
    entry = TRL_NAMES.get(parts[-1])
    if entry is None or len(parts) > 2:
        return None
    if len(parts) == 1 or parts[0] in (entry.section, "train"):
        return parts[-1]
    return None


def _section(tree: dict[str, Any], name: str) -> dict[str, Any]:
    node = tree.get(name)
    node = dict(node) if isinstance(node, dict) else {}
    tree[name] = node
    return node


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return dataclasses.MISSING
        node = node[part]
    return node


def _put_trl(tree: dict[str, Any], name: str, value: Any, given_as: str, overriding: bool) -> None:
    """Write TRL's ``name=value`` (written as ``given_as``) into ``tree`` under our key. An override replaces
    what the recipe has; within one recipe, TRL's name and ours with different values are an error."""
    entry = TRL_NAMES[name]
    if name in _KEPT_AS:
        section, key = _KEPT_AS[name]
        node = _section(tree, section)
        node[key] = value
        if overriding and name == LOSS_TYPE:
            node.pop("name", None)  # the override chooses the method, as method=NAME does
        return
    converted = entry.convert(value)
    existing = _lookup(tree, entry.key)
    if not overriding and existing is not dataclasses.MISSING and existing != converted:
        raise ConfigError(
            f"'{given_as}' (TRL's name for '{entry.key}') and '{entry.key}' are both given, with different "
            f"values ({value!r} and {existing!r}); keep one."
        )
    _set_dotted(tree, entry.key, converted)
    logger.info("config: %s=%r is TRL's name; using %s=%r", given_as, value, entry.key, converted)


def resolve_trl_names(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with TRL's names (:data:`TRL_NAMES`) rewritten to ours; ``loss_type`` and
    ``precompute_ref_log_probs`` are moved to where :func:`build_config` and the method registry read them."""
    tree = dict(tree)
    for key in [k for k in tree if k in TRL_NAMES]:
        _put_trl(tree, key, tree.pop(key), key, overriding=False)
    for section in [k for k, v in tree.items() if isinstance(v, dict)]:
        for key in list(tree[section]):
            name = trl_name_at(f"{section}.{key}")
            if name is None or _KEPT_AS.get(name) == (section, key):
                continue
            node = _section(tree, section)
            _put_trl(tree, name, node.pop(key), f"{section}.{key}", overriding=False)
    return tree


def _resolve_precompute(tree: dict[str, Any]) -> None:
    """TRL's ``precompute_ref_log_probs``: true is a reference cache at ``<output_dir>/reference-cache`` (where
    ``sparsealign cache`` puts it; built before training), unless ``reference.cache`` names one; false is the
    live reference model."""
    reference = tree.get("reference")
    if not isinstance(reference, dict) or PRECOMPUTE not in reference:
        return
    reference = _section(tree, "reference")
    flag = reference.pop(PRECOMPUTE)
    if not isinstance(flag, bool):
        raise ConfigError(f"'{PRECOMPUTE}': expected true or false, got {flag!r}.")
    cache = reference.get("cache")
    if flag and cache is None:
        output_dir = tree.get("output_dir", Config.output_dir)
        reference["cache"] = str(Path(str(output_dir)) / "reference-cache")
        logger.info("config: %s=true is TRL's name; using reference.cache=%s", PRECOMPUTE, reference["cache"])
    elif flag:
        logger.info("config: %s=true is TRL's name; reference.cache=%s is used", PRECOMPUTE, cache)
    elif cache is not None:
        raise ConfigError(f"'{PRECOMPUTE}=false' asks for the live reference, but reference.cache={cache!r}.")
    else:
        logger.info("config: %s=false is TRL's name; the live reference model is the default", PRECOMPUTE)


def describe_trl_names() -> list[tuple[str, str, str]]:
    """(TRL name, our key, note) rows for ``sparsealign config --keys`` and the README."""
    return [(name, entry.key, entry.note) for name, entry in TRL_NAMES.items()]


def _method_option_names() -> set[str]:
    """Every option of every method whose options class is defined (the subclasses of
    :class:`MethodOptions`): so that a method's option given at the top level can point to ``method.``."""
    names: set[str] = set()
    todo = list(MethodOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if dataclasses.is_dataclass(cls):
            names.update(f.name for f in dataclasses.fields(cls) if f.name != "name")
    return names


# --------------------------------------------------------------------------------------------------
# Building a Config from nested dicts with type checking and suggestions.


def _suggest(name: str, options: list[str], section: str = "") -> str:
    """The hint after "Unknown config key": a TRL name's key (:data:`TRL_NAMES`), ``method.NAME`` for a
    method's option given at the top level, else the closest valid key or TRL name (close spellings only),
    else the valid keys."""
    if name in TRL_NAMES:
        key = TRL_NAMES[name].key
        return f" '{name}' is TRL's name for '{key}': write {key}=... (or {name}=... at the top level)."
    if not section and name in _method_option_names():
        return f" Did you mean 'method.{name}'? (a method's options are under method.)"
    scored = [(difflib.SequenceMatcher(None, name, o).ratio(), o, o) for o in options]
    scored += [(difflib.SequenceMatcher(None, name, t).ratio(), t, TRL_NAMES[t].key) for t in TRL_NAMES]
    ratio, near, key = max(scored, default=(0.0, "", ""))
    if ratio >= 0.6:  # 0.5 matched unrelated keys (beta -> eval)
        return f" Did you mean '{near}'?" if near == key else f" Did you mean '{key}' (TRL: {near})?"
    return f" Valid keys: {', '.join(sorted(options))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with int->float widening); return the converted value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"'{key}': {value!r} does not fit {_type_name(tp)}.")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'{key}': {value!r} is not one of {list(args)}.{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' is a section ({tp.__name__}); give a mapping, not {value!r}.")
        return build_section(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{key}': expected a list, got {value!r}.")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}.")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-7" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"'{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def build_section(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """A dataclass ``cls`` from a mapping, every value type-checked; unknown keys name the closest valid one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(str(key), names, prefix)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(dotted: str) -> None:
    """Fail early, with a suggestion, on an override whose key does not exist. ``method.*`` keys depend on
    the chosen method and are checked when the method section is built."""
    cls: Any = Config
    walked = []
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(walked)
            full = f"{where}.{part}" if where else part
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(part, list(hints), where)}")
        walked.append(part)
        if walked == ["method"]:
            return
        tp = hints[part]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        cls = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if cls is None:
            break


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key=value (e.g. train.max_steps=50).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if trl_name_at(key) is None:
        _check_path(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``tree`` (a recipe as nested dicts) with dotted ``key=value`` overrides applied; ``method=NAME`` is
    shorthand for ``method.name=NAME``. TRL's names (:data:`TRL_NAMES`) are rewritten to ours, in the recipe
    and in the overrides."""
    tree = resolve_trl_names(tree)
    for text in overrides:
        key, value = parse_override(text)
        if key == "method" and isinstance(value, str):
            key = "method.name"
        name = trl_name_at(key)
        if name is not None:
            _put_trl(tree, name, value, key, overriding=True)
            continue
        if key == "method.name" and isinstance(tree.get("method"), dict):
            _section(tree, "method").pop(LOSS_TYPE, None)  # the override chooses the method
        _set_dotted(tree, key, value)
    return tree


def build_config(
    tree: dict[str, Any], build_method: typing.Callable[[dict[str, Any]], MethodOptions]
) -> Config:
    """A :class:`Config` from a recipe tree. ``build_method`` turns the ``method`` section into the chosen
    method's options (the method registry provides it: this layer knows no method)."""
    tree = resolve_trl_names(tree)
    _resolve_precompute(tree)
    section = tree.pop("method", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"'method' is a section; give a mapping (e.g. method.name=dpo), not {section!r}.")
    for alias in NAME_ALIASES:
        if alias in section:
            value = section.pop(alias)
            logger.info("config: method.%s=%r is the SparsePO code's name; using method.name", alias, value)
            section["name"] = value
    config = build_section(Config, tree)
    config.method = build_method(section)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a single field's type cannot express (the chosen method checks its own)."""
    t = config.train
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("'train.batch_size' and 'train.grad_accum' must be at least 1.")
    if t.max_steps < 0 or t.log_every < 1 or t.save_every < 0 or t.eval_every < 0:
        raise ConfigError(
            "'train.max_steps', 'train.save_every', 'train.eval_every' must be >= 0 and 'train.log_every' >= 1."
        )
    if t.max_bad_steps < 1 or (t.keep_checkpoints is not None and t.keep_checkpoints < 1):
        raise ConfigError("'train.max_bad_steps' and 'train.keep_checkpoints' must be at least 1.")
    if t.warmup_steps and t.warmup_ratio:
        raise ConfigError("Give 'train.warmup_steps' or 'train.warmup_ratio', not both.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError("'train.warmup_ratio' must be in [0, 1).")
    r = config.reference
    if r.cache is None and r.feature_top_k is not None:
        raise ConfigError("'reference.feature_top_k' has no effect without reference.cache.")
    if r.batch_size < 1:
        raise ConfigError("'reference.batch_size' must be at least 1.")
    d = config.data
    if d.max_prompt_length >= d.max_length:
        raise ConfigError("'data.max_prompt_length' must be smaller than 'data.max_length'.")
    if d.dataset is not None and (d.path is not None or d.source is not None):
        raise ConfigError(
            "Give only one of 'data.path', 'data.dataset' and 'data.source' (a named source reads its local copy "
            "from 'data.path')."
        )
    if d.mix and d.source != "mix":
        raise ConfigError("'data.mix' is read only with data.source=mix.")
    if config.pairs.samples_per_prompt < 2:
        raise ConfigError("'pairs.samples_per_prompt' must be at least 2.")


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `sparsealign config --list`."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if inner:
            rows.extend(describe(inner[0], key + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
