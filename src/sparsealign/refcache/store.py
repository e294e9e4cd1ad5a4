"""The reference cache on disk, and the lookup that turns it into the reference side of a batch.

One safetensors file per split (``train.safetensors``, ``eval.safetensors``) in the cache folder. Responses
are stored in pair order, chosen then rejected (response ``2i`` and ``2i+1`` of pair ``i``), CSR style:

- ``keys [P]`` int64: :func:`pair_key` of each pair (its exact token ids);
- ``logp_offsets [2P+1]`` int64 and ``logps [sum of response lengths]`` float32: the reference log-prob of
  every response token;
- with SAE codes (FPO): ``feature_offsets [2P+1]`` int64, ``feature_indices`` int32 and ``feature_values``
  float32: the non-zero entries (or the top-k) of each response's pooled reference SAE code.
- with mismatched responses (built for KTO; such a cache serves DPO, IPO and cDPO too): two rows per pair,
  in the responses' order (row ``2i`` is pair ``i``'s chosen row, ``2i+1`` its rejected row, see
  :mod:`sparsealign.data.mismatched`): ``mismatched_keys [2P]`` int64 (:func:`sequence_key` of the row's
  prompt and mismatched response), ``mismatched_offsets [2P+1]`` int64 and ``mismatched_logps``: the
  reference log-probs of those responses.

The JSON header (:mod:`sparsealign.refcache.identity`) is the file's safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sparsealign.data.collate import Batch
from sparsealign.data.examples import TokenizedPair
from sparsealign.errors import CacheError
from sparsealign.io import atomic_file
from sparsealign.models.logprobs import TokenOutputs
from sparsealign.refcache.identity import VERSION, describe_mismatch

HEADER_KEY = "sparsealign_reference_cache"
SPLITS = ("train", "eval")


def pair_key(pair: TokenizedPair) -> int:
    """A 63-bit key of a pair's exact token ids (prompt, chosen, rejected)."""
    text = json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids], separators=(",", ":"))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sequence_key(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> int:
    """A 63-bit key of one prompt + response row (KTO's mismatched rows)."""
    text = json.dumps([list(prompt_ids), list(response_ids)], separators=(",", ":"))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def mismatched_keys(pair: TokenizedPair) -> tuple[int, ...]:
    """The :func:`sequence_key` of each of a pair's mismatched rows (its chosen row's, its rejected row's)."""
    return tuple(sequence_key(pair.prompt_ids, response) for response in pair.mismatched_ids or ())


def split_file(folder: Path, split: str) -> Path:
    return folder / f"{split}.safetensors"


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def write_split(
    path: Path,
    header: dict[str, Any],
    keys: list[int],
    logps: list[torch.Tensor],
    features: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    mismatched: tuple[list[int], list[torch.Tensor]] | None = None,
) -> None:
    """Write one split atomically. ``logps``: one 1-D tensor per response (2 per pair, chosen first);
    ``features``: one (indices, values) per response; ``mismatched``: (keys, log-probs) of the mismatched
    rows, two per pair (its chosen row's, then its rejected row's)."""
    from safetensors.torch import save_file

    tensors = {
        "keys": torch.tensor(keys, dtype=torch.int64),
        "logp_offsets": _offsets([len(x) for x in logps]),
        "logps": torch.cat(logps).float() if logps else torch.zeros(0),
    }
    if features is not None:
        tensors["feature_offsets"] = _offsets([len(i) for i, _ in features])
        tensors["feature_indices"] = (
            torch.cat([i for i, _ in features]).int() if features else torch.zeros(0, dtype=torch.int32)
        )
        tensors["feature_values"] = (
            torch.cat([v for _, v in features]).float() if features else torch.zeros(0)
        )
    if mismatched is not None:
        mm_keys, mm_logps = mismatched
        tensors["mismatched_keys"] = torch.tensor(mm_keys, dtype=torch.int64)
        tensors["mismatched_offsets"] = _offsets([len(x) for x in mm_logps])
        tensors["mismatched_logps"] = torch.cat(mm_logps).float() if mm_logps else torch.zeros(0)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})


def read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CacheError(f"{path} is not a readable reference cache file ({error}).") from None
    if HEADER_KEY not in metadata:
        raise CacheError(f"{path} is a safetensors file but not a sparsealign reference cache (no header).")
    return json.loads(metadata[HEADER_KEY])


class _Split:
    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.path = path
        self.tensors = load_file(str(path))
        self.rows = {int(k): i for i, k in enumerate(self.tensors["keys"].tolist())}
        self.has_features = "feature_offsets" in self.tensors
        self.has_mismatched = "mismatched_keys" in self.tensors

    def logps(self, response: int) -> torch.Tensor:
        o = self.tensors["logp_offsets"]
        return self.tensors["logps"][int(o[response]) : int(o[response + 1])]

    def mismatched_keys(self, row: int) -> tuple[int, ...] | None:
        """The keys of the two mismatched rows stored for pair ``row`` (None: the file has none)."""
        if not self.has_mismatched:
            return None
        return tuple(int(k) for k in self.tensors["mismatched_keys"][2 * row : 2 * row + 2])

    def mismatched_logps(self, row: int) -> torch.Tensor:
        """The log-probs of mismatched row ``row`` (``2i``: pair i's chosen row, ``2i+1``: its rejected row)."""
        o = self.tensors["mismatched_offsets"]
        return self.tensors["mismatched_logps"][int(o[row]) : int(o[row + 1])]

    def features(self, response: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.tensors["feature_offsets"]
        span = slice(int(o[response]), int(o[response + 1]))
        return self.tensors["feature_indices"][span].long(), self.tensors["feature_values"][span]


class ReferenceCache:
    """A cache folder checked against a run's identity; serves the reference side of batches.

    Raises :class:`CacheError` when a split file is missing, unreadable, or its header does not match
    ``expected`` (the message names every mismatching field).
    """

    def __init__(self, folder: str | Path, expected: dict[str, Any], splits: Sequence[str] = SPLITS) -> None:
        self.folder = Path(folder)
        self.splits: list[_Split] = []
        self.header: dict[str, Any] = {}
        for split in splits:
            path = split_file(self.folder, split)
            if not path.is_file():
                raise CacheError(f"The reference cache {self.folder} has no {path.name}.")
            header = read_header(path)
            if header.get("version") != VERSION:
                raise CacheError(
                    f"The reference cache {self.folder} has the layout of cache format version "
                    f"{header.get('version')}; this version of sparsealign reads version {VERSION} only. "
                    "Rebuild it with `sparsealign cache --force RECIPE [overrides]` (or delete it; training "
                    "builds a missing cache)."
                )
            mismatch = describe_mismatch(header, expected)
            if mismatch:
                raise CacheError(
                    f"The reference cache {self.folder} does not match this run:\n  "
                    + "\n  ".join(mismatch)
                    + "\nRebuild it with `sparsealign cache RECIPE [overrides]` (or delete it; training "
                    "builds a missing cache), or point reference.cache at another folder."
                )
            self.header = header
            self.splits.append(_Split(path))
        self.d_sae = (expected.get("features") or {}).get("d_sae")

    def __len__(self) -> int:
        return sum(len(s.rows) for s in self.splits)

    def missing(self, pairs: Sequence[TokenizedPair]) -> int:
        """How many of ``pairs`` this cache cannot serve: no entry, or (for pairs that carry
        ``mismatched_ids``) no stored mismatched rows or other ones."""
        count = 0
        for pair in pairs:
            found = self._locate(pair)
            if found is not None and pair.mismatched_ids is not None:
                split, row = found
                if split.mismatched_keys(row) != mismatched_keys(pair):
                    found = None
            count += found is None
        return count

    def _locate(self, pair: TokenizedPair) -> tuple[_Split, int] | None:
        key = pair_key(pair)
        return next(((split, split.rows[key]) for split in self.splits if key in split.rows), None)

    def _find(self, pair: TokenizedPair) -> tuple[_Split, int]:
        found = self._locate(pair)
        if found is not None:
            return found
        where = f" ({pair.origin})" if pair.origin else ""
        raise CacheError(
            f"The reference cache {self.folder} has no entry for a pair of this run{where}: the data changed "
            "since the cache was built. Rebuild it with `sparsealign cache RECIPE [overrides]`."
        )

    def outputs(self, pairs: Sequence[TokenizedPair], batch: Batch) -> TokenOutputs:
        """The reference's :class:`TokenOutputs` for ``batch`` (built from ``pairs`` by ``collate_pairs``):
        response-aligned ``logps`` and, with SAE codes, dense ``features [2B, d_sae]``."""
        mask = batch.response_mask
        found = [self._find(pair) for pair in pairs]
        responses = [(split, 2 * row) for split, row in found]
        if batch.num_pairs and mask.shape[0] == 2 * len(found):  # not a chosen-only batch (SFT, KTO's items)
            responses += [(split, 2 * row + 1) for split, row in found]
        logps = self._logps([split.logps(response) for split, response in responses], batch)
        features = None
        if self.d_sae is not None:
            features = torch.zeros(len(responses), self.d_sae, dtype=torch.float32)
            for n, (split, response) in enumerate(responses):
                if not split.has_features:
                    raise CacheError(f"{split.path} holds no SAE codes; rebuild it for method fpo.")
                indices, values = split.features(response)
                features[n, indices] = values
            features = features.to(mask.device)
        return TokenOutputs(
            logps=logps,
            mask=mask,
            head_inputs=logps.new_zeros(0, 1),
            features=features,
            offsets=batch.response_offsets,
        )

    def mismatched_outputs(self, pairs: Sequence[TokenizedPair], batch: Batch) -> TokenOutputs:
        """The reference's log-probs of KTO's mismatched rows of ``pairs``, for ``batch`` (built from
        ``pairs`` by ``collate_mismatched``: the chosen rows' mismatched rows, then the rejected rows')."""
        found = []
        for pair in pairs:
            split, row = self._find(pair)
            if not split.has_mismatched:
                raise CacheError(
                    f"The reference cache {self.folder} was built without mismatched responses; KTO needs "
                    "them. Rebuild it with `sparsealign cache RECIPE method.name=kto` (a KTO cache serves "
                    "DPO, IPO and cDPO too)."
                )
            if split.mismatched_keys(row) != mismatched_keys(pair):
                raise CacheError(
                    f"The reference cache {self.folder} holds other mismatched responses for a pair of this "
                    "run (the order of the pairs or data.max_length changed since it was built). Rebuild it "
                    "with `sparsealign cache RECIPE [overrides]`."
                )
            found.append((split, row))
        sides = (0, 1) if batch.response_mask.shape[0] == 2 * len(found) else (0,)  # (0,): labelled items
        rows = [split.mismatched_logps(2 * row + side) for side in sides for split, row in found]
        logps = self._logps(rows, batch)
        return TokenOutputs(
            logps=logps,
            mask=batch.response_mask,
            head_inputs=logps.new_zeros(0, 1),
            offsets=batch.response_offsets,
        )

    def _logps(self, rows: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Response-aligned ``[N, T]`` log-probs from one stored 1-D tensor per row of ``batch`` (its response
        lengths counted on the host, so the step does not wait on the device)."""
        mask = batch.response_mask
        offsets = batch.response_offsets
        lengths = (
            [b - a for a, b in zip(offsets, offsets[1:], strict=False)] if offsets else mask.sum(1).tolist()
        )
        logps = torch.zeros(mask.shape, dtype=torch.float32)
        for n, values in enumerate(rows):
            if len(values) != lengths[n]:
                raise CacheError(
                    f"The reference cache {self.folder} holds {len(values)} log-probs for a response of "
                    f"{lengths[n]} tokens: the file is corrupt; rebuild it."
                )
            logps[n, : len(values)] = values
        return logps.to(mask.device)
