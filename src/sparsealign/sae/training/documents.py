"""The text an SAE is trained on: IMDB review text, or a local file of documents."""

from __future__ import annotations

import json
from pathlib import Path

from sparsealign.data.imdb import read_imdb_reviews
from sparsealign.errors import SAEError

__all__ = ["load_documents"]


def _read_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SAEError(f"{path}:{number} is not valid JSON: {error}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SAEError(
                    f"{path}:{number} has no string field 'text' (each line must be {{\"text\": ...}})"
                )
            texts.append(row["text"])
    return texts


def load_documents(source: str) -> list[str]:
    """The documents of ``source``, in file order: ``imdb`` → the 25k cleaned IMDB reviews; a ``.jsonl``
    file → each line's ``text``; any other file → each non-empty line. Empty documents are dropped."""
    if source == "imdb":
        texts, _ = read_imdb_reviews()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise SAEError(
                f"SAE training source {source!r} is neither 'imdb' nor an existing file "
                "(.jsonl with a 'text' field, or a text file with one document per line)"
            )
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    texts = [text.strip() for text in texts if text.strip()]
    if not texts:
        raise SAEError(f"SAE training source {source!r} has no non-empty documents")
    return texts
