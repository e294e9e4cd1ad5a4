"""Running the reference once over a run's pairs and writing the cache; opening (or building) it for a run."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsealign.data.collate import collate_mismatched, collate_pairs
from sparsealign.data.examples import TokenizedPair
from sparsealign.errors import CacheError
from sparsealign.models.logprobs import TokenModel, resolve_packing
from sparsealign.refcache.identity import run_identity
from sparsealign.refcache.store import (
    SPLITS,
    ReferenceCache,
    mismatched_keys,
    pair_key,
    split_file,
    write_split,
)
from sparsealign.version import __version__

logger = logging.getLogger("sparsealign.refcache")


def sparse_code(code: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A pooled SAE code ``[F]`` as (indices, values): every non-zero, or the ``top_k`` largest non-zeros."""
    if top_k is not None and top_k < code.numel():
        values, indices = code.topk(top_k)
        keep = values != 0
        return indices[keep].cpu(), values[keep].cpu()
    indices = code.nonzero().squeeze(-1)
    return indices.cpu(), code[indices].cpu()


def _progress(total: int, label: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"reference cache ({label})", unit="pair", dynamic_ncols=True)


@dataclass
class PairEntry:
    """The reference's outputs for one pair: what one row of a split file holds."""

    index: int  # the pair's position in the split, to restore the order after a sharded build
    key: int
    logps: tuple[torch.Tensor, torch.Tensor]  # chosen, rejected
    features: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # (indices, values) of each
    mismatched: tuple[tuple[int, torch.Tensor], ...] | None = None  # KTO: (key, log-probs) of its 2 rows


@torch.no_grad()
def reference_entries(
    pairs: Sequence[TokenizedPair],
    indices: Sequence[int],
    bundle: Any,
    cfg: Any,
    probe: torch.nn.Module | None,
    device: torch.device,
    bar: Any = None,
) -> list[PairEntry]:
    """Run the reference over ``pairs[i] for i in indices`` (``reference.batch_size`` pairs at a time, chosen
    and rejected in one forward, through the same per-token path as training). Pairs that carry
    ``mismatched_ids`` (data prepared for KTO) also get the reference log-probs of their 2 mismatched rows.
    Binary-feedback items (pairs with a ``label``) are forwarded once, as in training (``collate_pairs``):
    the completion's log-probs are stored as both responses, and its one mismatched row (both entries of
    ``mismatched_ids``) as both mismatched rows, so the cache keeps one layout."""
    entries: list[PairEntry] = []
    pad = bundle.tokenizer.pad_token_id
    size = cfg.reference.batch_size
    top_k = cfg.reference.feature_top_k
    with bundle.reference_model() as reference:
        packing = resolve_packing(cfg.train.packing, reference)
        tokens = TokenModel(reference, cfg.train.logprob_chunk, features=probe)
        plain = TokenModel(reference, cfg.train.logprob_chunk)  # KTO's mismatched rows need no SAE codes
        for start in range(0, len(indices), size):
            chunk = list(indices[start : start + size])
            items = [pairs[i] for i in chunk]
            batch = collate_pairs(items, pad, cfg.data.padding_side, packing=packing).to(device)
            out = tokens(batch)
            mm = rows = None
            if items[0].mismatched_ids is not None:  # KTO: each prompt continued by its mismatched responses
                rows = collate_mismatched(items, pad, cfg.data.padding_side, packing).to(device)
                mm = plain(rows)
            b = len(items)
            paired = batch.input_ids.shape[0] == 2 * b  # binary feedback: the completions' rows alone
            for i, (index, pair) in enumerate(zip(chunk, items, strict=True)):
                sides = (i, b + i) if paired else (i, i)  # chosen, then rejected (an item's completion twice)
                logps = tuple(out.logps[r][batch.response_mask[r]].float().cpu() for r in sides)
                entry = PairEntry(index, pair_key(pair), logps)
                if probe is not None:
                    entry.features = tuple(sparse_code(out.features[r], top_k) for r in sides)
                if mm is not None:  # rows laid out as the pairs: chosen rows' mismatches, then rejected rows'
                    values = (mm.logps[r][rows.response_mask[r]].float().cpu() for r in sides)
                    entry.mismatched = tuple(zip(mismatched_keys(pair), values, strict=True))
                entries.append(entry)
            if bar is not None:
                bar.update(b)
    return entries


def build_split(
    path: Path,
    header: dict[str, Any],
    pairs: Sequence[TokenizedPair],
    bundle: Any,
    cfg: Any,
    probe: torch.nn.Module | None,
    device: torch.device,
    progress: bool = True,
) -> None:
    """Compute the reference's outputs of ``pairs`` and write ``path``. Under ``accelerate launch`` every
    process computes every ``num_processes``-th pair; the main process gathers them and writes the file."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    mine = range(state.process_index, len(pairs), state.num_processes)
    bar = _progress(len(mine), header["split"], progress and state.is_main_process)  # the main's share
    if state.num_processes > 1:
        logger.info(
            "reference cache (%s): process %d of %d computes %d of %d pairs",
            header["split"], state.process_index, state.num_processes, len(mine), len(pairs),
        )  # fmt: skip
    entries = reference_entries(pairs, mine, bundle, cfg, probe, device, bar)
    if bar is not None:
        bar.close()
    if state.num_processes > 1:
        entries = gather_object(entries)
    if state.is_main_process:
        write_entries(path, header, sorted(entries, key=lambda e: e.index))
    state.wait_for_everyone()


def write_entries(path: Path, header: dict[str, Any], entries: list[PairEntry]) -> None:
    with_mismatched = bool(entries) and all(e.mismatched is not None for e in entries)
    features = None
    if entries and entries[0].features is not None:
        features = [code for e in entries for code in e.features]
    mismatched = None
    if with_mismatched:
        rows = [row for e in entries for row in e.mismatched]
        mismatched = ([key for key, _ in rows], [values for _, values in rows])
    header = {**header, "pairs": len(entries), "mismatched_responses": with_mismatched}
    keys = [e.key for e in entries]
    logps = [values for e in entries for values in e.logps]
    write_split(path, header, keys, logps, features, mismatched)


def build_cache(
    cfg: Any,
    bundle: Any,
    splits: dict[str, Sequence[TokenizedPair]],
    probe: torch.nn.Module | None,
    expected: dict[str, Any],
    device: torch.device,
    progress: bool = True,
) -> Path:
    """Write ``<reference.cache>/<split>.safetensors`` for each given split; returns the folder."""
    folder = Path(cfg.reference.cache)
    for split, pairs in splits.items():
        started = time.perf_counter()
        header = {**expected, "split": split, "sparsealign_version": __version__, "created": time.time()}
        build_split(split_file(folder, split), header, pairs, bundle, cfg, probe, device, progress)
        size = split_file(folder, split).stat().st_size
        logger.info(
            "reference cache: %s, %d pairs, %.1f MB, %.1f s",
            split_file(folder, split),
            len(pairs),
            size / 2**20,
            time.perf_counter() - started,
        )
    return folder


def prepare_reference_cache(
    cfg: Any,
    bundle: Any,
    data: Any,
    probe: torch.nn.Module | None,
    digest: str,
    device: torch.device,
    build: bool = True,
) -> ReferenceCache:
    """Open ``reference.cache`` for this run; build missing split files first when ``build`` and
    ``reference.build_missing`` allow (existing files are checked before anything is added to them).
    Every process calls this together: a build is shared out across them (:func:`build_split`)."""
    expected = run_identity(cfg, bundle, probe, digest)
    folder = Path(cfg.reference.cache)
    present = [s for s in SPLITS if split_file(folder, s).is_file()]
    missing = [s for s in SPLITS if s not in present]
    if missing:
        if present:
            ReferenceCache(folder, expected, present)  # refuse to complete someone else's cache
        if not (build and cfg.reference.build_missing):
            raise CacheError(
                f"The reference cache {folder} has no {', '.join(split_file(folder, s).name for s in missing)}. "
                "Build it with `sparsealign cache RECIPE [overrides]`, or set reference.build_missing=true."
            )
        logger.info("reference cache: building %s in %s", ", ".join(missing), folder)
        pairs = {"train": data.train, "eval": data.eval}
        build_cache(cfg, bundle, {s: pairs[s] for s in missing}, probe, expected, device, cfg.train.progress)
    cache = ReferenceCache(folder, expected)
    pairs = [*data.train, *data.eval]
    unserved = cache.missing(pairs)
    if unserved:
        what = " (or their mismatched responses, for KTO)" if pairs and pairs[0].mismatched_ids else ""
        raise CacheError(
            f"The reference cache {folder} lacks {unserved} of this run's {len(pairs)} pairs{what}: the "
            "data changed since it was built. Rebuild it with `sparsealign cache RECIPE [overrides]`."
        )
    logger.info("reference cache: %s (%d pairs); no reference model is run", folder, len(cache))
    return cache
