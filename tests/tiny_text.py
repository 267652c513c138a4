"""Text for the training tests: a character tokenizer for the tiny models and a little generated prose."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "an old man"]
VERBS = ["sat on", "looked at", "ran to", "jumped over", "slept near"]
OBJECTS = ["the mat", "a tree", "the house", "the river", "a red box"]


def add_char_tokenizer(folder: Path) -> Path:
    """Save a 32-token character tokenizer (ids < 64, the tiny models' vocab) into ``folder``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    # BPE without merges: every character is one token.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    ).save_pretrained(folder)
    return folder


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n)]


def write_text(path: Path, n: int = 200, seed: int = 0) -> Path:
    """Plain text, one sentence (document) per line: about 25 bytes a line."""
    path.write_text("\n".join(sentences(n, seed)) + "\n")
    return path


def write_jsonl(path: Path, n: int = 50, seed: int = 1, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: s}) + "\n" for s in sentences(n, seed)))
    return path
