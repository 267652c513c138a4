"""Byte sizes in a recipe: an integer, or a string such as 5GB or 500MiB (``shard_size``)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from tli_recipe.recipe.base import fail

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """``"5GB"`` -> 5_000_000_000 bytes; an integer is a byte count."""
    if isinstance(value, bool):
        raise fail(f"{value!r} is not a size; expected bytes or a string such as 5GB or 500MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise fail(f"{value!r} is not a size; expected bytes or a string such as 5GB or 500MiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if size < 1:
        raise fail(f"must be at least 1 byte, got {value!r}")
    return size


ShardSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": _SIZE.pattern}],
            "description": "Largest output shard: bytes, or a string such as 5GB or 500MiB.",
        }
    ),
]
