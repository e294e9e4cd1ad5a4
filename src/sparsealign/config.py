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

from sparsealign.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the configuration schema."""


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


MASK_MODELS = ("simple_all", "simple_last", "mlp_all", "mlp_last", "random")


@dataclass
class MethodConfig:
    name: Literal[
        "dpo", "cdpo", "ipo", "simpo", "sft", "tdpo1", "tdpo2", "sparsepo", "mapo", "fpo", "kto"
    ] = _help("Training objective.", default="dpo")
    beta: float = _help(
        "Inverse temperature (DPO, cDPO, SimPO, TDPO, SparsePO, MaPO, FPO, KTO) or tau (IPO).", default=0.1
    )
    label_smoothing: float = _help(
        "cDPO: assumed probability that a preference label is flipped.", default=0.0
    )
    gamma: float = _help("SimPO target reward margin.", default=0.5)
    alpha: float = _help(
        "TDPO2: weight of the token-KL term; FPO: weight of the feature-distance term.", default=0.5
    )
    shared_mask: bool = _help(
        "SparsePO: one mask network for reward and KL ('sparse-common'); false: two ('sparse-indp').",
        default=True,
    )
    mask_model: Literal["simple_all", "simple_last", "mlp_all", "mlp_last", "random"] = _help(
        "SparsePO mask network on the reference's hidden states.", default="simple_all"
    )
    l1_reward: float = _help("SparsePO: L1 weight on the reward mask values.", default=0.0)
    l1_kl: float = _help("SparsePO: L1 weight on the KL mask values.", default=0.0)
    mask_weight_decay: float = _help(
        "SparsePO: AdamW weight decay of the mask networks' weights.", default=0.01
    )
    activations: str = _help(
        "MaPO: activation types for the mask, comma-separated from mlp, attn, resid, logits; or all, or uniform.",
        default="all",
    )
    k: int = _help("FPO: size of the top-k feature index set.", default=50)
    index_set: Literal["reference", "policy", "union"] = _help(
        "FPO: whose top-k features are constrained: the reference's, the policy's, or their union.",
        default="reference",
    )
    stop_grad_chosen: bool = _help(
        "FPO: stop the gradient through the chosen response's feature distance.", default=True
    )
    desirable_weight: float = _help("KTO: weight of the desirable (chosen) examples' losses.", default=1.0)
    undesirable_weight: float = _help(
        "KTO: weight of the undesirable (rejected) examples' losses.", default=1.0
    )


# Which method uses which method.* field; a field changed from its default for a method that does not use it
# is refused rather than silently ignored.
METHOD_FIELDS = {
    "label_smoothing": {"dpo", "cdpo"},
    "gamma": {"simpo"},
    "alpha": {"tdpo2", "fpo"},
    "k": {"fpo"},
    "index_set": {"fpo"},
    "stop_grad_chosen": {"fpo"},
    "desirable_weight": {"kto"},
    "undesirable_weight": {"kto"},
    "shared_mask": {"sparsepo"},
    "mask_model": {"sparsepo"},
    "l1_reward": {"sparsepo"},
    "l1_kl": {"sparsepo"},
    "mask_weight_decay": {"sparsepo"},
    "activations": {"mapo"},
}

# The option names of the SparsePO paper's code, accepted with a note: alias -> (our key, value conversion).
ALIASES: dict[str, tuple[str, Any]] = {
    "method.rw_kl_independent": ("method.shared_mask", lambda independent: not independent),
    "method.l1_norm_param_u": ("method.l1_reward", lambda v: v),
    "method.l1_norm_param_d": ("method.l1_kl", lambda v: v),
    "method.activation_hook": ("method.activations", lambda v: v),
    "method.pref_optim": ("method.name", lambda v: {"sparse": "sparsepo"}.get(v, v)),
}
# Accepted only with the single value our implementation has (anything else would silently differ).
FIXED_ALIASES = {"method.activation_mapping": "zn_rescale"}


@dataclass
class SAEConfig:
    """The sparse autoencoder whose features FPO constrains (``sae.site=resid_post sae.layer=L``)."""

    path: str | None = _help(
        "SAE folder or file (SAELens, Gemma Scope params.npz, EleutherAI sparsify) or a hub id.", default=None
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
        "Needs a method that uses only reference log-probs (and pooled SAE codes): dpo, cdpo, ipo, fpo.",
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
    method: MethodConfig = field(default_factory=MethodConfig)
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


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(str(key), names)}")
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
    """Fail early, with a suggestion, on an override whose key does not exist."""
    if dotted in ALIASES or dotted in FIXED_ALIASES:
        return
    cls: Any = Config
    walked = []
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(walked)
            full = f"{where}.{part}" if where else part
            raise ConfigError(f"Unknown config key '{full}'.{_suggest(part, list(hints))}")
        walked.append(part)
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


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe as a nested dict. ``base: other.yaml`` (relative to the recipe) inherits another recipe,
    whose sections this one updates key by key."""
    if not path.is_file():
        raise ConfigError(f"Recipe '{path}' not found.")
    if path.resolve() in seen:
        raise ConfigError(f"Recipe '{path}' inherits itself through 'base'.")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"Recipe '{path}' is not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"Recipe '{path}' must be a mapping of sections.")
    tree = loaded or {}
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _merge(read_recipe(path.parent / str(base), (*seen, path.resolve())), tree)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (optional), apply dotted overrides, validate, and return a :class:`Config`."""
    tree: dict[str, Any] = read_recipe(Path(recipe)) if recipe is not None else {}
    for text in overrides or []:
        key, value = parse_override(text)
        if key == "method" and isinstance(value, str):
            key = "method.name"  # `method=kto` is shorthand for `method.name=kto`
        _set_dotted(tree, key, value)
    _apply_aliases(tree)
    config = _build(Config, tree)
    validate(config)
    return config


def _apply_aliases(tree: dict[str, Any]) -> None:
    """Rewrite the SparsePO code's option names to ours, logging a note for each."""
    import logging

    method = tree.get("method")
    if not isinstance(method, dict):
        return
    log = logging.getLogger("sparsealign.config")
    for alias, fixed in FIXED_ALIASES.items():
        key = alias.split(".", 1)[1]
        if key in method:
            value = method.pop(key)
            if value != fixed:
                raise ConfigError(f"'{alias}' supports only '{fixed}' (the paper's mapping), got {value!r}.")
            log.info(
                "config: %s=%s is what method=mapo always does; the option is accepted and dropped",
                alias,
                value,
            )
    for alias, (target, convert) in ALIASES.items():
        key = alias.split(".", 1)[1]
        if key in method:
            value = method.pop(key)
            new_key = target.split(".", 1)[1]
            method[new_key] = convert(value)
            log.info(
                "config: %s=%r is the SparsePO code's name; using %s=%r",
                alias,
                value,
                target,
                method[new_key],
            )


def validate(config: Config) -> None:
    """Cross-field checks that a single field's type cannot express."""
    t = config.train
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("'train.batch_size' and 'train.grad_accum' must be at least 1.")
    if t.max_steps < 0 or t.log_every < 1 or t.save_every < 0 or t.eval_every < 0:
        raise ConfigError(
            "'train.max_steps', 'train.save_every', 'train.eval_every' must be >= 0 and 'train.log_every' >= 1."
        )
    m = config.method
    if m.name == "cdpo" and not 0.0 < m.label_smoothing < 0.5:
        raise ConfigError(
            "'method.label_smoothing' must be in (0, 0.5) for cdpo (e.g. method.label_smoothing=0.1)."
        )
    defaults = MethodConfig()
    for key, methods in METHOD_FIELDS.items():
        if m.name not in methods and getattr(m, key) != getattr(defaults, key):
            users = ", ".join(sorted(methods))
            raise ConfigError(
                f"'method.{key}' has no effect with method '{m.name}' (it is used by: {users})."
            )
    if m.desirable_weight < 0 or m.undesirable_weight < 0:
        raise ConfigError("'method.desirable_weight' and 'method.undesirable_weight' must be >= 0.")
    kto_ratio = m.desirable_weight / max(m.undesirable_weight, 1e-12)
    if m.name == "kto" and not 1.0 <= kto_ratio <= 4 / 3:
        import logging

        logging.getLogger("sparsealign.config").warning(
            "KTO: desirable_weight / undesirable_weight = %.3g; the KTO paper recommends a ratio in [1, 4/3] "
            "for paired data (as many desirable as undesirable examples).",
            kto_ratio,
        )
    if t.warmup_steps and t.warmup_ratio:
        raise ConfigError("Give 'train.warmup_steps' or 'train.warmup_ratio', not both.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError("'train.warmup_ratio' must be in [0, 1).")
    if m.name == "fpo" and config.sae.path is None:
        raise ConfigError("method fpo needs a sparse autoencoder: set sae.path (and sae.site, sae.layer).")
    if m.name != "fpo" and config.sae.path is not None:
        raise ConfigError(f"'sae.path' has no effect with method '{m.name}' (it is used by: fpo).")
    validate_reference(config)
    d = config.data
    if d.max_prompt_length >= d.max_length:
        raise ConfigError("'data.max_prompt_length' must be smaller than 'data.max_length'.")
    if sum(x is not None for x in (d.path, d.dataset, d.source)) > 1:
        raise ConfigError("Give only one of 'data.path', 'data.dataset' and 'data.source'.")
    if config.pairs.samples_per_prompt < 2:
        raise ConfigError("'pairs.samples_per_prompt' must be at least 2.")


CACHEABLE_METHODS = ("dpo", "cdpo", "ipo", "kto", "fpo")
"""Methods whose reference side is per-token log-probs (and pooled SAE codes) only, so it can be cached."""


def validate_reference(config: Config) -> None:
    """``reference.*`` settings that would be ignored or could not work are refused."""
    r, m = config.reference, config.method
    if r.cache is None:
        changed = [k for k in ("feature_top_k",) if getattr(r, k) != getattr(ReferenceConfig(), k)]
        if changed:
            raise ConfigError(f"'reference.{changed[0]}' has no effect without reference.cache.")
        return
    if m.name not in CACHEABLE_METHODS:
        why = (
            "it uses no reference model"
            if m.name in ("simpo", "sft")
            else "it needs the reference's full distribution (token KL), hidden states or activations at "
            "every step, which a cache of log-probs cannot hold"
        )
        raise ConfigError(
            f"'reference.cache' cannot serve method '{m.name}': {why}. "
            f"Methods that train from a cache: {', '.join(CACHEABLE_METHODS)}."
        )
    if r.feature_top_k is not None:
        if m.name != "fpo":
            raise ConfigError(f"'reference.feature_top_k' has no effect with method '{m.name}' (fpo only).")
        if m.index_set != "reference" or m.k > r.feature_top_k:
            raise ConfigError(
                f"'reference.feature_top_k={r.feature_top_k}' keeps only the reference's top "
                f"{r.feature_top_k} codes, which is exact only for method.index_set=reference with "
                f"method.k <= {r.feature_top_k} (got index_set={m.index_set}, k={m.k}). Use "
                "reference.feature_top_k=null to keep every non-zero code."
            )
    if r.batch_size < 1:
        raise ConfigError("'reference.batch_size' must be at least 1.")


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
