"""Training and evaluation text: read documents, tokenize, pack into fixed-length sequences.

A ``.jsonl``/``.json`` file holds one JSON object per line with the text in a field
(``text`` by default); any other file is plain text with one document per non-empty
line, as the Hugging Face ``datasets`` text loader (and so Axolotl and LLaMA-Factory)
reads it. Documents are tokenized with the checkpoint's tokenizer, each followed by
the EOS token, concatenated, and cut into sequences of ``length`` tokens. No torch here.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

from tli_recipe.errors import TliError


class DataError(TliError):
    """Training or evaluation text that cannot be read; the message names the file and line."""


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, in order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a text file or JSONL with a '{text_field}' field")
    jsonl = path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))
    try:
        with _open(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if not jsonl:
                    yield line.rstrip("\n")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not JSON ({exc.msg}); expected one object per line, "
                                    f"such as {{\"{text_field}\": \"...\"}}") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: no string field '{text_field}'; expected one object per line, "
                                    f"such as {{\"{text_field}\": \"...\"}} (another field name: text_field in the "
                                    "recipe's dataset)")
                if text:
                    yield text
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected text or JSONL") from None


def tokenize(paths: Sequence[tuple[str | Path, str]], tokenizer, batch: int = 1000) -> list[int]:
    """Token ids of every document of every ``(path, text_field)``, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []

    def flush(docs: list[str]) -> None:
        for row in tokenizer(docs)["input_ids"]:
            ids.extend(row)
            if eos is not None and (not row or row[-1] != eos):
                ids.append(eos)

    for path, field in paths:
        docs: list[str] = []
        for doc in read_documents(path, field):
            docs.append(doc)
            if len(docs) == batch:
                flush(docs)
                docs = []
        if docs:
            flush(docs)
    return ids


def pack(ids: Sequence[int], length: int, keep_short: bool = False) -> list[list[int]]:
    """Consecutive sequences of ``length`` tokens; the remainder is dropped (kept as a
    shorter last sequence with ``keep_short`` when no full sequence fits)."""
    blocks = [list(ids[i:i + length]) for i in range(0, len(ids) - length + 1, length)]
    if not blocks and keep_short and len(ids) >= 2:
        blocks = [list(ids)]
    return blocks


def split_validation(blocks: list[list[int]], fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """(train, validation): the last ``ceil(fraction * n)`` sequences are held out (at least one
    when ``fraction > 0`` and there are two or more)."""
    if fraction <= 0 or len(blocks) < 2:
        return blocks, []
    held = min(len(blocks) - 1, max(1, math.ceil(fraction * len(blocks))))
    return blocks[:-held], blocks[-held:]
