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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsealign.errors import ConfigError


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
        "Parameter dtype; 'auto' is float32 on CPU and bfloat16 on GPU.", default="auto"
    )
    trust_remote_code: bool = _help("Allow model code from the hub repository to run.", default=False)
    lora: LoraConfig | None = _help("LoRA adapter settings; null trains all weights.", default=None)
    disable_dropout: bool = _help("Set every dropout probability in policy and reference to 0.", default=True)
    merge_final: bool = _help("With LoRA, also write a merged full model to final/merged/.", default=False)


@dataclass
class DataConfig:
    path: str | None = _help("A local data file: .jsonl, .json, .parquet or .csv.", default=None)
    dataset: str | None = _help(
        "A Hugging Face datasets name or a folder written by `Dataset.save_to_disk`.", default=None
    )
    source: str | None = _help("A named source from the registry (e.g. 'imdb').", default=None)
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
        "Jinja chat template (or a path to one) for conversational rows; default: the tokenizer's.",
        default=None,
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
    tracker: Literal["none", "tensorboard", "wandb"] = _help(
        "Experiment tracker through accelerate.", default="none"
    )
    logprob_chunk: int = _help(
        "Response tokens per chunk in the log-prob/KL head (memory vs. speed).", default=256
    )
    gradient_checkpointing: bool = _help(
        "Recompute each decoder block's activations in the backward pass instead of keeping them "
        "(much less activation memory, about a third more step time).",
        default=False,
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
# Building a Config from nested dicts with type checking and suggestions.


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


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
        return _build(tp, value, key)
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
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


_build = build_section


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
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(part, list(hints))}")
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
    _check_path(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``tree`` (a recipe as nested dicts) with dotted ``key=value`` overrides applied; ``method=NAME`` is
    shorthand for ``method.name=NAME``."""
    for text in overrides:
        key, value = parse_override(text)
        if key == "method" and isinstance(value, str):
            key = "method.name"
        _set_dotted(tree, key, value)
    return tree


def build_config(
    tree: dict[str, Any], build_method: typing.Callable[[dict[str, Any]], MethodOptions]
) -> Config:
    """A :class:`Config` from a recipe tree. ``build_method`` turns the ``method`` section into the chosen
    method's options (the method registry provides it: this layer knows no method)."""
    tree = dict(tree)
    section = tree.pop("method", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"'method' is a section; give a mapping (e.g. method.name=dpo), not {section!r}.")
    for alias in NAME_ALIASES:
        if alias in section:
            value = section.pop(alias)
            import logging

            logging.getLogger("sparsealign.config").info(
                "config: method.%s=%r is the SparsePO code's name; using method.name", alias, value
            )
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
    if sum(x is not None for x in (d.path, d.dataset, d.source)) > 1:
        raise ConfigError("Give only one of 'data.path', 'data.dataset' and 'data.source'.")
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
