"""Where an output came from: source revisions, source-file checksums, pins.

A recipe may pin a source model (``base_model: {path, revision, checksums}`` or
``org/name@revision``). ``plan`` checks the revision (cheap: a directory name or a
small file); ``run`` hashes every source file it reads or copies, refuses a file whose
sha256 differs from the recipe's, and records the digests in ``plan.json``, the model
card and the safetensors metadata. No torch; hashing streams 8 MiB at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

from tli_recipe.errors import Problem, RecipeError
from tli_recipe.source.checkpoint import INDEX_FILE, SIDE_FILES, Checkpoint

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 8 * 2**20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- revisions ---------------------------------------------------------------------

def _git_head(git: Path) -> Optional[str]:
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head if _COMMIT.match(head) else None
    ref = head[5:]
    if (git / ref).is_file():
        return (git / ref).read_text().strip()
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    return None


def source_revision(folder: Path) -> Optional[tuple[str, str]]:
    """The commit a model directory holds and how it is known, or None.

    A Hugging Face cache snapshot is named by its commit; ``huggingface-cli download
    --local-dir`` records the commit in ``.cache/huggingface/download/*.metadata``; a git
    clone has its HEAD.
    """
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--") and _COMMIT.match(folder.name):
        return folder.name, "its Hugging Face cache snapshot"
    downloads = folder / ".cache" / "huggingface" / "download"
    for meta in [downloads / "config.json.metadata", *sorted(downloads.glob("*.metadata"))]:
        if meta.is_file():
            first = meta.read_text().splitlines()[:1]
            if first and _COMMIT.match(first[0].strip()):
                return first[0].strip(), f"{meta.relative_to(folder)}"
    if (folder / ".git").is_dir():
        commit = _git_head(folder / ".git")
        if commit:
            return commit, "its git HEAD"
    return None


def check_pin(ref: Any, folder: Path) -> tuple[list[tuple[tuple, str]], list[str]]:
    """Problems ``(sub-path, message)`` and warnings about ``ref``'s pinned revision."""
    wanted = getattr(ref, "revision", None)
    if not wanted:
        return [], []
    found = source_revision(folder)
    if found is None:
        return [(("revision",), f"cannot tell which revision {folder} holds (not a Hugging Face cache snapshot, no "
                                "download metadata, no git HEAD); expected a directory written by `huggingface-cli "
                                "download --revision REV --local-dir DIR` or a git clone, or pin its files with "
                                "checksums instead of a revision")], []
    commit, how = found
    if commit == wanted:
        return [], []
    if str(ref) != ref.path:  # written org/name@revision: the cache resolved a branch or tag name through refs/
        return [], [f"{ref}: revision '{wanted}' is a branch or tag name, now commit {commit}; it moves, so pin the "
                    f"commit for a reproducible recipe (revision: {commit})"]
    if len(wanted) >= 7 and commit.startswith(wanted):  # an abbreviated commit of a local directory
        return [], []
    return [(("revision",), f"{folder} is at revision {commit} (from {how}), the recipe pins {wanted}; expected the "
                            f"pinned revision: download it again (huggingface-cli download ORG/NAME --revision {wanted} "
                            "--local-dir DIR), or change the pin")], []


# --- checksums ---------------------------------------------------------------------

def source_file_names(ckpt: Checkpoint, side_files: bool) -> list[str]:
    """The files of a source that an output depends on, relative to its directory."""
    folder = ckpt.path
    names = ["config.json"]
    if (folder / INDEX_FILE).is_file():
        names.append(INDEX_FILE)
    names += [str(f.relative_to(folder)) for f in ckpt.files()]
    if side_files:
        names += [n for n in SIDE_FILES if (folder / n).is_file()]
    return sorted(set(names))


def expected_checksums(plan) -> dict[str, tuple[tuple, dict[str, str]]]:
    """Source key -> (field path of its pin, expected sha256 by file name), from the plan's recipe."""
    from tli_recipe.recipe.schema import Recipe

    recipe = Recipe.model_validate(plan.recipe)
    out = {}
    if recipe.base_model.checksums:
        out[str(recipe.base_model)] = (("base_model",), recipe.base_model.checksums)
    for i, piece in enumerate(recipe.slices or []):
        if piece.model is not None and piece.model.checksums:
            out.setdefault(str(piece.model), (("slices", i, "model"), piece.model.checksums))
    return out


def hash_sources(plan, checkpoints: dict[str, Checkpoint]) -> dict[str, dict[str, str]]:
    """sha256 of every file each source contributes (config, index, shards; side files of
    the base model) and of any other file the recipe names; checks the recipe's pins.

    Raises a RecipeError, located in the recipe file, for every mismatch at once.
    """
    expected = expected_checksums(plan)
    digests: dict[str, dict[str, str]] = {}
    problems: list[tuple[tuple, str, bool]] = []  # (field path, message, locate the key rather than the value)
    for key, ckpt in checkpoints.items():
        where, wanted = expected.get(key, ((), {}))
        names = set(source_file_names(ckpt, side_files=key == plan.base_model))
        for name in wanted:
            if not (ckpt.path / name).is_file():
                present = ", ".join(source_file_names(ckpt, side_files=True))
                problems.append((where + ("checksums", name), f"{ckpt.path} has no file '{name}'; expected one of: {present}", True))
            else:
                names.add(name)
        digests[key] = {name: sha256_file(ckpt.path / name) for name in sorted(names)}
        for name, digest in wanted.items():
            got = digests[key].get(name)
            if got is not None and got != digest:
                problems.append((where + ("checksums", name),
                                 f"{ckpt.path / name} has sha256 {got}, the recipe expects {digest}; the file changed: "
                                 "download the pinned revision again, or update the checksum if the change is intended", False))
    if problems:
        raise RecipeError([_locate(plan.recipe_file, *problem) for problem in problems])
    return digests


def _locate(recipe_file: str, path: tuple, message: str, prefer_key: bool) -> Problem:
    """A problem at its place in the recipe file (re-read for its marks; line 1 when unreadable)."""
    from tli_recipe.recipe.load import read_recipe

    try:
        _, marks = read_recipe(recipe_file)
    except (RecipeError, OSError):
        return Problem(path, message, recipe_file, 1, 1)
    return marks.problem(path, message, prefer_key)


def metadata(plan) -> dict[str, str]:
    """Safetensors ``__metadata__`` entries: each source's revision and file checksums, as canonical JSON."""
    sources = {key: {"revision": src.revision, "sha256": plan.source_files.get(key, {})} for key, src in plan.sources.items()}
    return {"sources": json.dumps(sources, sort_keys=True, separators=(",", ":"))}


def pin_block(ref: str, ckpt: Checkpoint) -> str:
    """A ``base_model:`` block pinning ``ref`` to its revision and file checksums (for ``tli-recipe pin``)."""
    found = source_revision(ckpt.path)
    path = ref if Path(ref).expanduser().exists() else ref.partition("@")[0]  # a hub id: the revision gets its own key
    lines = ["base_model:", f"  path: {json.dumps(path)}"]
    if found:
        lines.append(f"  revision: {found[0]}   # from {found[1]}")
    lines.append("  checksums:")
    for name in source_file_names(ckpt, side_files=True):
        lines.append(f"    {json.dumps(name)}: \"{sha256_file(ckpt.path / name)}\"")
    return "\n".join(lines) + "\n"
