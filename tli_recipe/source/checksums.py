"""The checksums of a source's files: which files an output depends on, the recipe's pins checked
against their sha256, and the provenance records (plan.json, safetensors metadata, ``pin``).

A recipe may pin a source model (``base_model: {path, revision, checksums}`` or
``org/name@revision``). ``plan`` checks the revision (``revisions.py``: cheap, a directory name
or a small file); ``run`` hashes every source file it reads or copies, refuses a file whose
sha256 differs from the recipe's, and records the digests in ``plan.json``, the model card and
the safetensors metadata. No torch; hashing streams 8 MiB at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tli_recipe.errors import Problem, RecipeError
from tli_recipe.source.checkpoint import (
    INDEX_FILE,
    SIDE_FILES,
    Checkpoint,
    link_problem,
)
from tli_recipe.source.hashes import SourceHasher
from tli_recipe.source.revisions import source_revision


def source_file_names(ckpt: Checkpoint, side_files: bool) -> list[str]:
    """The files of a source that an output depends on, relative to its directory."""
    folder = ckpt.path
    names = ["config.json"]
    if (folder / INDEX_FILE).is_file():
        names.append(INDEX_FILE)
    names += [str(f.relative_to(folder)) for f in ckpt.files()]
    if side_files:
        names += [n for n in SIDE_FILES if side_file(folder, n)]
    return sorted(set(names))


def side_file(folder: Path, name: str) -> bool:
    """Whether ``folder`` has the side file ``name`` (a tokenizer or generation file) to hash and copy:
    one that passes the link rule (:func:`checkpoint.link_problem`); a link anywhere else is not the
    model's (it is never read, so nothing from outside reaches the output)."""
    return (folder / name).is_file() and link_problem(folder, name) is None


def expected_checksums(plan) -> dict[str, dict[str, str]]:
    """Source key -> expected sha256 by file name, from the plan's pins (never the recipe again)."""
    return {key: dict(pin.checksums) for key, pin in plan.pins.items() if pin.checksums}


def pinned_files(plan, checkpoints: dict[str, Checkpoint]) -> dict[str, dict[str, Path]]:
    """Source key -> {file name: path} of every file each source contributes (config, index,
    shards; side files of the base model) and of any other file the recipe pins.

    Raises a RecipeError, located where the plan says each pin was written, for every pinned
    file that does not exist (before anything is read or written).
    """
    files: dict[str, dict[str, Path]] = {}
    problems: list[Problem] = []
    for key, ckpt in checkpoints.items():
        pin = plan.pins.get(key)
        names = set(source_file_names(ckpt, side_files=key == plan.base_model))
        for name in dict(pin.checksums) if pin else {}:
            why = link_problem(ckpt.path, name)
            if why is not None:
                message = f"{ckpt.path / name} {why}; a pinned file is read only from inside the model folder"
                problems.append(_at(plan, pin, name, message, at_key=True))
            elif not (ckpt.path / name).is_file():
                present = ", ".join(source_file_names(ckpt, side_files=True))
                problems.append(
                    _at(plan, pin, name, f"{ckpt.path} has no file '{name}'; expected one of: {present}", at_key=True)
                )
            else:
                names.add(name)
        files[key] = {name: ckpt.path / name for name in sorted(names)}
    if problems:
        raise RecipeError(problems)
    return files


def check_digests(plan, files: dict[str, dict[str, Path]], digests: dict[Path, str]) -> dict[str, dict[str, str]]:
    """Source key -> {file name: sha256}; a RecipeError for every digest that differs from its pin."""
    found = {key: {name: digests[path] for name, path in names.items()} for key, names in files.items()}
    problems: list[Problem] = []
    for key, names in files.items():
        pin = plan.pins.get(key)
        for name, digest in (dict(pin.checksums) if pin else {}).items():
            if name in found[key] and found[key][name] != digest:
                problems.append(
                    _at(
                        plan,
                        pin,
                        name,
                        f"{names[name]} has sha256 {found[key][name]}, the recipe expects {digest}; the "
                        "file changed: download the pinned revision again, or update the checksum if the change "
                        "is intended",
                    )
                )
    if problems:
        raise RecipeError(problems)
    return found


def hash_sources(plan, checkpoints: dict[str, Checkpoint], *, trust_cache: bool = True) -> dict[str, dict[str, str]]:
    """:func:`pinned_files`, hashed (in the caller's time), then :func:`check_digests`."""
    files = pinned_files(plan, checkpoints)
    hasher = SourceHasher([p for names in files.values() for p in names.values()], trust_cache=trust_cache).start()
    return check_digests(plan, files, hasher.result())


def _at(plan, pin, name: str, message: str, at_key: bool = False) -> Problem:
    """A problem at the spot the plan recorded for the checksum of ``name`` in a pin: its value
    (a wrong digest) or, ``at_key``, its key (a missing file)."""
    spot = pin.checksums_at.get(name) if pin is not None else None
    if spot is None:  # a plan written without spots: the recipe file, at its top
        return Problem(("checksums", name), message, plan.recipe_file, 1, 1)
    line, column = (spot.key_line, spot.key_column) if at_key else (spot.line, spot.column)
    return Problem(tuple(spot.path), message, spot.file, line, column)


def metadata(plan) -> dict[str, str]:
    """Safetensors ``__metadata__`` entries: each source's revision and file checksums, as canonical JSON."""
    sources = {
        key: {"revision": src.revision, "sha256": plan.source_files.get(key, {})} for key, src in plan.sources.items()
    }
    return {"sources": json.dumps(sources, sort_keys=True, separators=(",", ":"))}


def pin_block(
    ref: str,
    ckpt: Checkpoint,
    warnings: Optional[list[str]] = None,
    known: Optional[dict[str, str]] = None,
    rehash: bool = False,
) -> str:
    """A ``base_model:`` block pinning ``ref`` to its revision and file checksums (for ``tli-recipe pin``);
    revision files that were ignored add a warning to ``warnings``. ``known``: digests by file name
    that need no read (the hub's LFS records); the others come from hub blob names or the digest
    cache, else are hashed (``rehash``: every local file is hashed)."""
    found = source_revision(ckpt.path, warnings)
    path = ref if Path(ref).expanduser().exists() else ref.partition("@")[0]  # a hub id: the revision gets its own key
    names = source_file_names(ckpt, side_files=True)
    known = known or {}
    digests = SourceHasher([ckpt.path / n for n in names if n not in known], trust_cache=not rehash).start().result()
    lines = ["base_model:", f"  path: {json.dumps(path)}"]
    if found:
        lines.append(f"  revision: {found[0]}   # from {found[1]}")
    lines.append("  checksums:")
    for name in names:
        lines.append(f'    {json.dumps(name)}: "{known.get(name) or digests[ckpt.path / name]}"')
    return "\n".join(lines) + "\n"
