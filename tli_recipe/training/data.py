"""Training and evaluation text: read documents, tokenize, pack into fixed-length sequences.

A ``.jsonl``/``.json`` file holds one JSON object per line, each one of

- raw text in a field (``{"text": "..."}``; another field name: ``text_field``);
- a chat, ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with the tokenizer's
  chat template (a tokenizer without one is an error);
- an instruction, ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional),
  rendered as a user/assistant chat with the chat template when the tokenizer has one, else in the
  Alpaca prompt format (``### Instruction:`` / ``### Input:`` / ``### Response:``).

Any other file is plain text with one document per non-empty
line, as the Hugging Face ``datasets`` text loader (and so Axolotl and LLaMA-Factory)
reads it. The loss covers every token of the rendered text (prompts included). Documents are
tokenized with the checkpoint's tokenizer, each followed by the EOS token, concatenated, and cut
into sequences of ``length`` tokens. No torch here.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

from tli_recipe.errors import TliError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def is_jsonl(path: str | Path) -> bool:
    """A file of JSON records, one per line (else plain text, one document per line)."""
    return str(path).endswith(JSONL_SUFFIXES)


class DataError(TliError):
    """Training or evaluation text that cannot be read; the message names the file and line."""


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


ALPACA = "### Instruction:\n{instruction}\n\n{input}### Response:\n{output}"


def _chat(path: Path, number: int, messages, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f'{path}:{number}: a chat ({{"messages": [...]}}) is rendered with the tokenizer\'s chat template, '
            "and this tokenizer has none; use a tokenizer that has one (--tokenizer DIR), or write the text "
            'as {"text": "..."}'
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in messages
    ):
        raise DataError(f'{path}:{number}: messages must be a list of {{"role": ..., "content": "..."}}')
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template error is the data's or the template's
        raise DataError(f"{path}:{number}: the chat template cannot render these messages ({str(exc)[:160]})") from None


def _instruction(path: Path, number: int, record: dict, tokenizer) -> str:
    fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
    if not all(isinstance(v, str) for v in fields.values()) or "output" not in record:
        raise DataError(
            f"{path}:{number}: an instruction needs string fields instruction and output (input "
            'optional): {"instruction": "...", "input": "...", "output": "..."}'
        )
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        return _chat(
            path,
            number,
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}],
            tokenizer,
        )
    given = f"### Input:\n{fields['input']}\n\n" if fields["input"] else ""
    return ALPACA.format(instruction=fields["instruction"], input=given, output=fields["output"])


def _record_text(path: Path, number: int, record, text_field: str, tokenizer) -> str:
    if isinstance(record, dict):
        if isinstance(record.get(text_field), str):
            return record[text_field]
        if "messages" in record:
            return _chat(path, number, record["messages"], tokenizer)
        if "instruction" in record:
            return _instruction(path, number, record, tokenizer)
    raise DataError(
        f"{path}:{number}: no string field '{text_field}'; expected one object per line: "
        f'{{"{text_field}": "..."}} (another field name: text_field in the recipe\'s dataset), '
        '{"messages": [{"role": "user", "content": "..."}, ...]} or '
        '{"instruction": "...", "input": "...", "output": "..."}'
    )


def read_documents(path: str | Path, text_field: str = "text", tokenizer=None) -> Iterator[str]:
    """The documents of one file, in order (chats and instructions rendered with ``tokenizer``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a text file or JSONL with a '{text_field}' field")
    jsonl = is_jsonl(path.name)
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
                    raise DataError(
                        f"{path}:{number}: not JSON ({exc.msg}); expected one object per line, "
                        f'such as {{"{text_field}": "..."}}'
                    ) from None
                text = _record_text(path, number, record, text_field, tokenizer)
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
        for doc in read_documents(path, field, tokenizer):
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
    blocks = [list(ids[i : i + length]) for i in range(0, len(ids) - length + 1, length)]
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


def record_format(path: str | Path, text_field: str = "text") -> str:
    """What the first record of a data file is: ``text`` (plain text, or JSONL with ``text_field``),
    ``chat`` (``messages``) or ``instruction``; ``text`` when the file is absent or unreadable (the
    trainer reports those), so emitting a config never fails on data it does not read."""
    path = Path(path)
    if not is_jsonl(path.name) or not path.is_file():
        return "text"
    try:
        with _open(path) as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    break
            else:
                return "text"
    except (OSError, ValueError, UnicodeDecodeError):
        return "text"
    if isinstance(record, dict) and not isinstance(record.get(text_field), str):
        if "messages" in record:
            return "chat"
        if "instruction" in record:
            return "instruction"
    return "text"
