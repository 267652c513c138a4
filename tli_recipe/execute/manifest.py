"""The manifest of an output, ``tli-recipe.json``: how ``--force`` knows a folder is ours.

Written last into every output: the manifest format, the recipe hash (the same one that
sits in every shard's ``__metadata__``) and each file the tool wrote with its size (and,
for files other than shards, its sha256). A folder is an earlier tli-recipe output only
when its manifest reads back, its shards carry the same recipe hash, and it holds no file
that is not listed or that changed since: a user's ``plan.json`` or an edited training
config is never taken for ours, so ``--force`` cannot delete it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

MANIFEST = "tli-recipe.json"
MANIFEST_FORMAT = 1
#: Files up to this size (other than shards) are hashed too: an edit that keeps the size still shows.
HASHED_UP_TO = 16 * 2**20
_SHA = re.compile(r"[0-9a-f]{64}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hashed(rel: str, size: int) -> bool:
    return not rel.endswith(".safetensors") and size <= HASHED_UP_TO


def _entries(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files below ``folder`` by relative path, and everything else (links, devices...)."""
    files, odd = {}, []
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs):
            if os.path.islink(os.path.join(root, name)):
                odd.append(os.path.relpath(os.path.join(root, name), folder))
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not path.is_symlink():
                files[rel] = path
            else:
                odd.append(rel)
    return files, odd


def write_manifest(folder: Path, recipe_sha256: str, skip: Iterable[str] = ()) -> None:
    files, _ = _entries(folder)
    listed = {}
    for rel in sorted(set(files) - {MANIFEST, *skip}):
        size = files[rel].stat().st_size
        listed[rel] = {"size": size, **({"sha256": _sha256(files[rel])} if _hashed(rel, size) else {})}
    data = {"tool": "tli-recipe", "format": MANIFEST_FORMAT, "recipe_sha256": recipe_sha256, "files": listed}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def _read_manifest(folder: Path) -> tuple[Optional[dict], str]:
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None, f"no {MANIFEST}"
    try:
        if path.stat().st_size > 64 * 2**20:
            raise ValueError
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"{MANIFEST} is not a tli-recipe manifest"
    files = data.get("files") if isinstance(data, dict) else None
    if (
        (data.get("tool") if isinstance(data, dict) else None) != "tli-recipe"
        or data.get("format") != MANIFEST_FORMAT
        or not isinstance(data.get("recipe_sha256"), str)
        or not _SHA.fullmatch(data["recipe_sha256"])
        or not isinstance(files, dict)
        or not all(isinstance(v, dict) for v in files.values())
    ):
        return None, f"{MANIFEST} is not a tli-recipe manifest of format {MANIFEST_FORMAT}"
    return data, ""


def _shard_recipe(path: Path) -> Optional[str]:
    """``__metadata__.recipe_sha256`` of a safetensors file, read defensively (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > min(100 * 2**20, path.stat().st_size - 8):
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    value = meta.get("recipe_sha256") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _names(items: list[str]) -> str:
    shown = [ascii(n)[1:-1] for n in sorted(items)[:3]]  # escaped: a file name may hold control characters
    return ", ".join(shown) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def output_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a genuine earlier tli-recipe output, or None when it is one."""
    data, problem = _read_manifest(folder)
    if data is None:
        return problem
    files, odd = _entries(folder)
    listed = data["files"]
    foreign = odd + [rel for rel in files if rel != MANIFEST and rel not in listed]
    if foreign:
        return f"it holds files tli-recipe did not write: {_names(foreign)}"
    changed = []
    for rel, path in files.items():
        if rel == MANIFEST:
            continue
        size, want = path.stat().st_size, listed[rel]
        if size != want.get("size") or ("sha256" in want and _hashed(rel, size) and _sha256(path) != want["sha256"]):
            changed.append(rel)
    if changed:
        return f"files changed since tli-recipe wrote them: {_names(changed)}"
    shards = [rel for rel in files if rel.endswith(".safetensors")]
    wrong = [rel for rel in shards if _shard_recipe(files[rel]) != data["recipe_sha256"]]
    if wrong:
        return f"{MANIFEST} does not match the recipe_sha256 in the metadata of {_names(wrong)}"
    return None
