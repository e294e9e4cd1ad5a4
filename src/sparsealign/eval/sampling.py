"""``sparsealign sample``: N samples per prompt at each temperature, written as resumable JSONL.

Prompts (:func:`load_prompts`) come from

* a data file (JSONL, JSON, Parquet, CSV; :mod:`sparsealign.data.files`): preference rows (any format of
  :mod:`sparsealign.data.formats`; the chosen response is the ``reference``), or prompt-only rows:
  ``prompt`` (text or messages), ``messages`` (a conversation; a last assistant turn is the reference),
  ``instruction`` (AlpacaEval; its ``output`` is the reference) or ``turns`` (Arena-Hard questions);
* a dataset folder written by ``save_to_disk`` (``--split``, default ``train``);
* a recipe (built-in name or YAML file): its held-out split (``--split eval``, the default) or its
  training split (``--split train``), read as training reads them;
* a named data source (:mod:`sparsealign.data.sources`): its eval pairs' prompts, else its held-out
  ``eval_prompts`` (``--split train``: its training pairs' prompts).

Prompt formatting is the training pipeline's own: each prompt is tokenised by
:func:`sparsealign.data.tokenize.tokenize_pair` with the run's ``data`` settings (chat template for
conversations, exactly one BOS, ``max_prompt_length`` truncation), so a run is sampled on exactly the
ids it was trained to continue; rows that carry their ids (``meta["prompt_ids"]``, sampled sources) keep
them. Instruction-style rows (``instruction``, ``turns``) are user messages; plain text prompts stay text
unless ``chat`` wraps them in a user message.

Sampling (:func:`sample_to_file`) goes through :func:`sparsealign.models.generate.sample_continuations`
(KV cache, left padding, stops at EOS; temperature 0 is greedy). The work is cut into fixed chunks
(temperature, ``batch_size`` consecutive prompts), each seeded from ``(seed, temperature, first prompt)``
only, so a chunk's samples do not depend on what ran before: a rerun after an interruption regenerates
the missing chunks exactly and the final file equals an uninterrupted run. Each finished chunk is
appended (:func:`sparsealign.eval.samples.append_rows`); a truncated last line is dropped and redone. The
settings are kept beside the file (``<stem>.sample.json``) and a rerun with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsealign.config import Config
from sparsealign.data.examples import Message, PreferenceExample
from sparsealign.errors import DataError
from sparsealign.eval.run_model import EvalModel
from sparsealign.eval.samples import append_rows, iter_rows, summary_path
from sparsealign.io import atomic_write

__all__ = [
    "PASSTHROUGH",
    "PromptItem",
    "SampleSettings",
    "alpacaeval_records",
    "arenahard_records",
    "encode_prompts",
    "load_prompts",
    "sample_to_file",
]

logger = logging.getLogger(__name__)

ID_COLUMNS = ("id", "question_id", "task_id", "uid")
"""The first of these a source row has becomes the sample's ``id``."""

PASSTHROUGH = (
    "question_id",
    "task_id",
    "tests",
    "test",
    "entry_point",
    "test_list",
    "test_setup_code",
    "challenge_test_list",
    "dataset",
    "category",
)
"""Source columns copied into every sample row (what ``passk``, AlpacaEval and Arena-Hard need back)."""


@dataclass
class PromptItem:
    """One prompt: as the source wrote it (text or messages), its reference response (or None), its
    position in the prompt set, and the source's id and pass-through columns."""

    prompt: str | list[Message]
    reference: str | None
    index: int
    id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] | None = None


# --------------------------------------------------------------------------------------------------
# Prompt sets


def _response_text(response: Any) -> str | None:
    if response is None:
        return None
    if isinstance(response, str):
        return response
    return "".join(message.get("content", "") for message in response)


def _carry(row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    ident = next((row[key] for key in ID_COLUMNS if row.get(key) is not None), None)
    return ident, {key: row[key] for key in PASSTHROUGH if key in row}


def _prompt_only(row: dict[str, Any]) -> tuple[Any, str | None] | str:
    """``(prompt, reference)`` of a row without a preference pair, or the reason it cannot be used."""
    if isinstance(row.get("instruction"), str):
        reference = row.get("output") if isinstance(row.get("output"), str) else None
        return [{"role": "user", "content": row["instruction"]}], reference
    if isinstance(row.get("turns"), list):
        turns = row["turns"]
        if len(turns) != 1 or not isinstance(turns[0], dict) or not isinstance(turns[0].get("content"), str):
            return "multi_turn"
        return [{"role": "user", "content": turns[0]["content"]}], None
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = [dict(m) for m in row["messages"]]
        if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            return "not_a_string"
        if messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt, row.get("reference") if isinstance(row.get("reference"), str) else None
    if isinstance(prompt, list) and prompt:
        return [dict(m) for m in prompt], None
    return "missing_field"


def _rows_to_items(stream: Any) -> list[PromptItem]:
    """Prompt items of raw rows: preference rows through :func:`parse_row`, others as prompt-only rows."""
    from sparsealign.data.formats import SkipReport, parse_row

    report = SkipReport(unit=stream.unit)
    items: list[PromptItem] = []
    for origin, row in stream:
        report.total += 1
        if isinstance(row, Exception):
            report.add("malformed_json", origin)
            continue
        ident, extra = _carry(row)
        if row.get("chosen") is not None and row.get("rejected") is not None:
            example = parse_row(row, None, origin)
            if not isinstance(example, PreferenceExample):
                report.add(example.reason, origin)
                continue
            items.append(PromptItem(example.prompt, _response_text(example.chosen), len(items), ident, extra))
            continue
        found = _prompt_only(row)
        if isinstance(found, str):
            report.add(found, origin)
            continue
        items.append(PromptItem(found[0], found[1], len(items), ident, extra))
    if report.skipped:
        logger.warning("%s: %s", stream.name, report.summary())
    return items


def _examples_to_items(examples: Sequence[PreferenceExample]) -> list[PromptItem]:
    items = []
    for example in examples:
        ident, extra = _carry(example.meta)
        ids = example.meta.get("prompt_ids")
        items.append(
            PromptItem(
                example.prompt,
                _response_text(example.chosen),
                len(items),
                ident,
                extra,
                list(ids) if ids is not None else None,
            )
        )
    return items


def _recipe_path(spec: str) -> Path | None:
    from sparsealign.recipes import builtin_recipes, resolve_recipe

    if spec.endswith((".yaml", ".yml")) or spec in builtin_recipes():
        return resolve_recipe(spec)
    return None


class _SourceBundle:
    """What a named source may ask of ``context["bundle"]``: the tokenizer, and the run's base model as
    the reference (loaded only if the source samples with it, e.g. IMDB pairs not yet cached)."""

    def __init__(self, tokenizer: Any, config: Config) -> None:
        self.tokenizer = tokenizer
        self._config = config
        self._reference: Any = None

    def reference_model(self) -> Any:
        import contextlib

        from sparsealign.eval.run_model import base_model_config
        from sparsealign.models.loading import load_model

        if self._reference is None:
            self._reference, _ = load_model(base_model_config(self._config), self._config.train.seed)

        return contextlib.nullcontext(self._reference)


def _source_items(config: Config, split: str, tokenizer: Any) -> list[PromptItem]:
    from sparsealign.data.prepare import LazyReward
    from sparsealign.data.sources import load_source

    context = {
        "bundle": _SourceBundle(tokenizer, config),
        "reward": LazyReward(config.reward),
        "model_id": config.model.name,
        "is_main_process": True,
    }
    data = load_source(config, context)
    if split == "train":
        return _examples_to_items(data.train)
    if data.eval:
        return _examples_to_items(data.eval)
    return [PromptItem(prompt, None, index) for index, prompt in enumerate(data.eval_prompts)]


def _config_items(config: Config, split: str, tokenizer: Any) -> list[PromptItem]:
    from sparsealign.data.formats import load_examples

    if split not in ("eval", "train"):
        raise DataError(f"--split for a recipe or a named source is 'eval' or 'train', not '{split}'.")
    if config.data.source is not None:
        return _source_items(config, split, tokenizer)
    train, evaluation, _ = load_examples(config.data)
    return _examples_to_items(evaluation if split == "eval" else train)


def load_prompts(
    source: str,
    tokenizer: Any,
    split: str | None = None,
    limit: int | None = None,
    run_config: Config | None = None,
    chat: bool = False,
) -> list[PromptItem]:
    """The prompt set ``source`` names (see the module docstring), at most ``limit`` prompts.

    A named source is called with ``run_config`` (a run's own configuration) when given, so its settings
    (e.g. IMDB's ``pairs``) are the run's. With ``chat`` text prompts become one user message. An empty
    prompt set is a :class:`DataError`.
    """
    from sparsealign.data.files import SUPPORTED_EXTENSIONS, read_dataset, read_file
    from sparsealign.data.sources import available_sources
    from sparsealign.plugins import is_plugin_spec

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in SUPPORTED_EXTENSIONS:
        if split is not None:
            raise DataError("--split applies to recipes, named sources and dataset folders, not to a file.")
        items = _rows_to_items(read_file(path))
    elif path.is_dir():
        items = _rows_to_items(read_dataset(str(path), split or "train"))
    elif source in available_sources() or is_plugin_spec(source):
        from sparsealign.recipes.load import load_config

        config = run_config if run_config is not None else load_config()
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=source))
        items = _config_items(config, split or "eval", tokenizer)
    elif (recipe := _recipe_path(source)) is not None:
        from sparsealign.recipes.load import load_config

        items = _config_items(load_config(recipe), split or "eval", tokenizer)
    else:
        from sparsealign.recipes import builtin_recipes

        raise DataError(
            f"--prompts '{source}' is not a data file ({', '.join(SUPPORTED_EXTENSIONS)}), a dataset folder, "
            f"a recipe ({', '.join(builtin_recipes()[:4])}, ... or a .yaml file) or a named source "
            f"({', '.join(available_sources())})."
        )
    if limit is not None:
        items = items[: max(0, limit)]
    if chat:
        for item in items:
            if isinstance(item.prompt, str) and item.prompt_ids is None:
                item.prompt = [{"role": "user", "content": item.prompt}]
    if not items:
        raise DataError(f"--prompts '{source}' gave no prompts (split {split or 'default'}, limit {limit}).")
    return items


# --------------------------------------------------------------------------------------------------
# Prompt ids


def encode_prompts(items: list[PromptItem], tokenizer: Any, data: Any) -> tuple[list[PromptItem], Counter]:
    """Set each item's ``prompt_ids`` as training tokenises its prompt; returns the usable items and the
    counts of dropped ones per reason (a chat template that cannot render the prompt, an empty prompt).

    The ids are those :func:`~sparsealign.data.tokenize.tokenize_pair` gives the prompt of a pair made of
    this prompt and a placeholder response (the prompt's ids never depend on the response), with the run's
    ``data`` settings except that no prompt is dropped for its length (``max_length`` only bounds the
    responses; the prompt is still truncated to ``max_prompt_length``)."""
    from sparsealign.data.examples import TokenizedPair
    from sparsealign.data.tokenize import tokenize_pair

    cfg = dataclasses.replace(data, max_length=data.max_prompt_length + 1)
    dropped: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    kept = []
    for item in items:
        if item.prompt_ids is None:
            placeholder: Any = (
                "x" if isinstance(item.prompt, str) else [{"role": "assistant", "content": "x"}]
            )
            example = PreferenceExample(item.prompt, placeholder, placeholder, origin=f"prompt {item.index}")
            result = tokenize_pair(example, tokenizer, cfg, stats=stats)
            if not isinstance(result, TokenizedPair):
                dropped[result] += 1
                continue
            item.prompt_ids = result.prompt_ids
        kept.append(item)
    if stats.get("prompt_truncated"):
        logger.warning(
            "%d prompts were longer than data.max_prompt_length=%d and were truncated (%s), as in training",
            stats["prompt_truncated"],
            data.max_prompt_length,
            data.truncation,
        )
    if dropped:
        logger.warning("dropped %d prompts: %s", sum(dropped.values()), dict(dropped))
    return kept, dropped


# --------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: ``n`` samples per prompt at each of ``temperatures`` (0 = greedy), nucleus ``top_p``,
    at most ``max_new_tokens`` new tokens, ``seed``, ``batch_size`` prompts per generation call, and the
    CSFT ``control`` prefix (``"good"``/``"bad"``/None)."""

    n: int = 1
    temperatures: tuple[float, ...] = (1.0,)
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 16
    control: str | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise DataError("--n, --batch-size and --max-new-tokens must be at least 1.")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise DataError("--temperatures must be a non-empty list of numbers >= 0 (0 is greedy).")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise DataError(f"--temperatures lists a temperature twice: {list(self.temperatures)}.")
        if not 0 < self.top_p <= 1:
            raise DataError(f"--top-p must be in (0, 1], got {self.top_p}.")


def chunk_seed(seed: int, temperature: float, start: int) -> int:
    """The seed of the chunk of prompts ``start, start+1, ...`` at ``temperature``: independent of every
    other chunk, so chunks can be (re)generated in any order."""
    digest = hashlib.sha256(
        f"sparsealign-sample-chunk:{seed}:{float(temperature)!r}:{start}".encode()
    ).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _key(prompt_index: int, temperature: float, sample_index: int) -> tuple[int, float, int]:
    return int(prompt_index), float(temperature), int(sample_index)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that has no newline (an interrupted append) off ``path``."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            cut = handle.read(end - start).rfind(b"\n")
            if cut >= 0:
                handle.truncate(start + cut + 1)
                break
            end = start
        else:
            handle.truncate(0)
        logger.warning("%s: dropped a truncated last line (an interrupted write); it is sampled again", path)


def _settings_record(model: EvalModel, source: str, settings: SampleSettings, count: int) -> dict[str, Any]:
    return {
        "model": model.label,
        "prompts": source,
        "num_prompts": count,
        **{key: value for key, value in dataclasses.asdict(settings).items() if key != "batch_size"},
        "temperatures": list(settings.temperatures),
    }


def _done_keys(out: Path, record: dict[str, Any]) -> set[tuple[int, float, int]]:
    """Keys of the rows ``out`` already holds, after checking that it was written with the same settings."""
    side = summary_path(out, "sample")
    if not out.exists():
        return set()
    if side.is_file():
        before = json.loads(side.read_text(encoding="utf-8"))
        changed = [key for key, value in record.items() if key != "temperatures" and before.get(key) != value]
        if changed:
            detail = ", ".join(f"{key}: {before.get(key)!r} -> {record[key]!r}" for key in changed)
            raise DataError(
                f"{out} holds samples made with other settings ({detail}); rerun with the same settings to "
                "resume, or choose another --out."
            )
    _drop_partial_line(out)
    done = set()
    for number, row in iter_rows(out):
        if row.get("model") != record["model"] or "prompt_index" not in row:
            raise DataError(
                f"{out}, line {number}: not a sample of '{record['model']}' written by this command; "
                "choose another --out."
            )
        done.add(_key(row["prompt_index"], row["temperature"], row["sample_index"]))
    return done


def _prompts_for_model(items: list[PromptItem], model: EvalModel, control: str | None) -> list[list[int]]:
    ids = [list(item.prompt_ids or []) for item in items]
    if control is None:
        return ids
    from sparsealign.methods.csft import CSFTOptions, sampling_prompt

    options = model.config.method if model.config is not None else None
    if not isinstance(options, CSFTOptions):
        raise DataError("--control applies to conditional SFT runs (method.name=csft) only.")
    return [sampling_prompt(p, options, model.tokenizer, control) for p in ids]  # type: ignore[arg-type]


def _row(
    item: PromptItem,
    output: str,
    temperature: float,
    j: int,
    label: str,
    prompt_ids: list[int],
    output_ids: list[int],
) -> dict[str, Any]:
    """One sample row: the columns of :data:`~sparsealign.eval.samples.SAMPLE_FIELDS`, the source's id and
    pass-through columns, and the exact token ids the model saw and produced (``prompt_ids``, ``output_ids``:
    teacher-forced metrics score these, with no re-tokenisation of the text)."""
    row: dict[str, Any] = {
        "prompt": item.prompt,
        "output": output,
        "reference": item.reference,
        "temperature": float(temperature),
        "sample_index": j,
        "model": label,
        "prompt_index": item.index,
        "prompt_ids": list(prompt_ids),
        "output_ids": list(output_ids),
    }
    if item.id is not None:
        row["id"] = item.id
    row.update(item.extra)
    return row


def sample_to_file(
    model: EvalModel,
    items: list[PromptItem],
    settings: SampleSettings,
    out: str | Path,
    source: str = "",
    progress: bool = True,
) -> tuple[int, int]:
    """Sample every (prompt, temperature, sample index) that ``out`` does not hold yet and append it.

    ``items`` must carry their ``prompt_ids`` (:func:`encode_prompts`). Returns ``(written, kept)``: rows
    added now and rows found from an earlier run."""
    from sparsealign.models.generate import decode_continuation, sample_continuations

    out = Path(out)
    record = _settings_record(model, source, settings, len(items))
    done = _done_keys(out, record)
    with atomic_write(summary_path(out, "sample")) as handle:
        json.dump(record, handle, indent=2)
    prompts = _prompts_for_model(items, model, settings.control)
    total = len(items) * len(settings.temperatures) * settings.n
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=min(len(done), total), desc="sample", unit="sample")
    written = 0
    try:
        for temperature in settings.temperatures:
            for start in range(0, len(items), settings.batch_size):
                chunk = range(start, min(start + settings.batch_size, len(items)))
                missing = [
                    (i, j)
                    for i in chunk
                    for j in range(settings.n)
                    if _key(items[i].index, temperature, j) not in done
                ]
                if not missing:
                    continue
                samples = sample_continuations(
                    model.model,
                    model.tokenizer,
                    [prompts[i] for i in chunk],
                    num_samples=settings.n,
                    max_new_tokens=settings.max_new_tokens,
                    temperature=temperature,
                    top_p=settings.top_p,
                    seed=chunk_seed(settings.seed, temperature, start),
                    batch_size=len(chunk),
                )
                rows = []
                for i, j in missing:
                    ids = samples[i - start][j]
                    text = decode_continuation(model.tokenizer, prompts[i], ids)
                    rows.append(_row(items[i], text, temperature, j, model.label, prompts[i], ids))
                append_rows(out, rows)
                written += len(rows)
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    return written, len(done)


# --------------------------------------------------------------------------------------------------
# Benchmark formats


def _single_sample(rows: list[dict[str, Any]], what: str) -> None:
    seen = Counter(row["prompt_index"] for row in rows)
    if any(count > 1 for count in seen.values()):
        raise DataError(
            f"{what} takes one answer per prompt: sample with --n 1 and a single temperature "
            "(e.g. --temperatures 0)."
        )


def _user_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else "".join(m.get("content", "") for m in prompt)


def alpacaeval_records(rows: list[dict[str, Any]], generator: str) -> list[dict[str, Any]]:
    """AlpacaEval's model outputs: one ``{"instruction", "output", "generator"}`` record per prompt (plus
    ``dataset`` when the source had it), in prompt order. AlpacaEval reads a ``.json`` list of records
    (``alpaca_eval --model_outputs FILE.json``; it has no JSONL reader)."""
    _single_sample(rows, "--format alpacaeval")
    records = []
    for row in sorted(rows, key=lambda r: r["prompt_index"]):
        record = {"instruction": _user_text(row["prompt"]), "output": row["output"], "generator": generator}
        if "dataset" in row:
            record["dataset"] = row["dataset"]
        records.append(record)
    return records


def arenahard_records(rows: list[dict[str, Any]], model_id: str, tokenizer: Any) -> list[dict[str, Any]]:
    """Arena-Hard (v0.1 ``gen_answer.py``) answers: ``question_id``, ``answer_id``, ``model_id``,
    ``choices: [{index, turns: [{content}]}]``, ``tstamp`` and ``conv_metadata.token_len``, one per
    question. The answer id is a digest of (model, question), so a rewrite gives the same ids."""
    import time

    _single_sample(rows, "--format arenahard")
    records = []
    now = time.time()
    for row in sorted(rows, key=lambda r: r["prompt_index"]):
        question = row.get("question_id", row.get("id"))
        if question is None:
            raise DataError(
                "--format arenahard needs the source's question_id (Arena-Hard's question.jsonl has it)."
            )
        answer_id = hashlib.sha256(f"{model_id}:{question}".encode()).hexdigest()[:22]
        records.append(
            {
                "question_id": question,
                "answer_id": answer_id,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": [{"content": row["output"]}]}],
                "tstamp": now,
                "conv_metadata": {
                    "token_len": len(tokenizer(row["output"], add_special_tokens=False)["input_ids"])
                },
            }
        )
    return records
