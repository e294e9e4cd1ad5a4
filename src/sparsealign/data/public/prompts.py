"""Prompt-only sources for sampling and judging: ``alpacaeval`` and ``arenahard`` (no training pairs).

``alpacaeval``: ``tatsu-lab/alpaca_eval`` (https://huggingface.co/datasets/tatsu-lab/alpaca_eval, file
``alpaca_eval.json``: a list of ``{"instruction", "output", "generator", "dataset"}``; split ``eval``): the
805 instructions.

``arenahard``: Arena-Hard-Auto questions (https://github.com/lmarena/arena-hard-auto,
``data/arena-hard-v0.1/question.jsonl``: ``{"question_id", "category", "cluster", "turns": [{"content"}]}``;
v2.0 files have ``{"uid", "category", "subcategory", "prompt"}``): the first turn, or ``prompt``. HALOs (FPO)
reads the same local file.

Both return ``SourceData(train=[], eval_prompts=[...])``; :func:`load_prompts` is the direct way in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparsealign.data.public.common import PublicDataset, RowReader
from sparsealign.data.public_files import read_public
from sparsealign.data.sources import SourceData, SourceRequest, register_source
from sparsealign.errors import DataError

ALPACAEVAL = PublicDataset(
    "alpacaeval",
    "tatsu-lab/alpaca_eval",
    "eval",
    None,
    config_name="alpaca_eval",
    schema_url="https://huggingface.co/datasets/tatsu-lab/alpaca_eval",
)
ARENAHARD = PublicDataset(
    "arenahard",
    "lmarena-ai/arena-hard-auto-v0.1",
    "train",
    None,
    schema_url="https://github.com/lmarena/arena-hard-auto",
)


def alpacaeval_prompts(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[str]:
    return [reader.get(row, origin, "instruction") for origin, row in reader.rows(rows)]


def arenahard_prompts(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[str]:
    prompts = []
    for origin, row in reader.rows(rows):
        if "turns" not in row and "prompt" in row:
            prompts.append(reader.get(row, origin, "prompt"))
            continue
        turns = reader.get(row, origin, "turns", list)
        if not turns or not isinstance(turns[0], dict):
            raise DataError(f"arenahard: {reader.where(origin)}: column 'turns' has no first turn object.")
        prompts.append(reader.get(turns[0], origin, "content"))
    return prompts


_PROMPTS = {"alpacaeval": (ALPACAEVAL, alpacaeval_prompts), "arenahard": (ARENAHARD, arenahard_prompts)}


def load_prompts(name: str, path: str | None = None) -> list[str]:
    """The prompts of ``alpacaeval`` or ``arenahard``, from ``path`` (file or folder) or the hub."""
    dataset, convert = _PROMPTS[name]
    found = read_public(
        name, path, dataset.train_split, hub_id=dataset.hub_id, config_name=dataset.config_name
    )
    if found is None:
        raise DataError(f"data source '{name}': split '{dataset.train_split}' not found in {path}.")
    return convert(found.stream, RowReader(name, "eval", found.stream.unit))


@register_source("alpacaeval")
def alpacaeval(request: SourceRequest) -> SourceData:
    """AlpacaEval instructions as ``eval_prompts`` (prompts only)."""
    return SourceData(train=[], eval_prompts=load_prompts("alpacaeval", request.config.data.path))


@register_source("arenahard")
def arenahard(request: SourceRequest) -> SourceData:
    """Arena-Hard questions as ``eval_prompts`` (prompts only)."""
    return SourceData(train=[], eval_prompts=load_prompts("arenahard", request.config.data.path))
