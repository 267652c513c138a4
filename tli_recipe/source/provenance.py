"""Where an output came from: source revisions, source-file checksums, pins.

A recipe may pin a source model (``base_model: {path, revision, checksums}`` or
``org/name@revision``). ``plan`` checks the revision (cheap: a directory name or a
small file); ``run`` hashes every source file it reads or copies, refuses a file whose
sha256 differs from the recipe's, and records the digests in ``plan.json``, the model
card and the safetensors metadata. No torch; hashing streams 8 MiB at a time.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Optional

from tli_recipe.errors import Problem, RecipeError
from tli_recipe.source.checkpoint import (
    INDEX_FILE,
    SIDE_FILES,
    Checkpoint,
    CheckpointError,
)
from tli_recipe.source.hashes import SourceHasher

# --- revisions ---------------------------------------------------------------------
#
# A revision comes from files inside the model directory that anyone who shared it
# controls: ``.git/HEAD`` may say ``ref: /home/u/.ssh/id_ed25519``, a ref file may be a
# symlink or a FIFO. So a revision is only ever a validated token (40 or 64 lowercase
# hex characters), read from a small regular file whose real path stays inside the
# directory; anything else is ignored with a warning that quotes nothing from the file.

_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
#: a git ref name as HEAD may name it: under refs/, plain characters, no empty, "." or ".." part
_REF = re.compile(r"^refs/[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*$")
#: a branch or tag name of a hub cache (``refs/<name>``) or a commit (``snapshots/<commit>``)
_HUB_REVISION = re.compile(r"^[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*$")
#: a file name that may be quoted in a warning
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
_SMALL = 4096  # HEAD, a ref file, download metadata, a hub ref: a few dozen bytes
_PACKED = 2**20  # packed-refs lists every branch and tag
_WHY = "a revision is 40 or 64 lowercase hex characters read from a small regular file inside the model directory"


class _Refused(Exception):
    """A revision file that is not read: the reason names no content of it."""


def _plain_parts(text: str) -> bool:
    return all(part not in ("", ".", "..") for part in text.split("/"))


def read_small(path: Path, inside: Path, limit: int = _SMALL) -> Optional[str]:
    """The text of ``path`` when it is a regular file of at most ``limit`` bytes whose real
    path lies inside ``inside``; None when it does not exist. Raises _Refused otherwise.

    Opened non-blocking (a FIFO must not hang us) and checked on the open descriptor.
    """
    if not os.path.lexists(path):
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _Refused("a dangling or looping link") from None
    if not real.is_relative_to(inside.resolve()):
        raise _Refused("a link leaving the directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise _Refused("unreadable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("not a regular file")
        if info.st_size > limit:
            raise _Refused(f"larger than {limit} bytes")
        data = os.read(fd, limit + 1)
    except OSError:
        raise _Refused("unreadable") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _Refused(f"larger than {limit} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _Refused("not plain text") from None


def _token(path: Path, inside: Path, label: str, warn: list[str], limit: int = _SMALL) -> Optional[str]:
    """``read_small``, with a refusal turned into a warning naming only ``label``."""
    try:
        return read_small(path, inside, limit)
    except _Refused as exc:
        warn.append(f"{label} is {exc}; ignored it ({_WHY})")
        return None


def _git_head(git: Path, warn: list[str], common: Optional[Path] = None) -> Optional[str]:
    """The commit ``.git/HEAD`` names: detached, through a ref file under .git/refs/, or packed-refs.
    In a worktree, HEAD is in ``git`` (its own git dir) and the refs in ``common`` (the main .git)."""
    head = _token(git / "HEAD", git, ".git/HEAD", warn)
    git_refs = common or git
    if head is None:
        return None
    head = head.strip()
    if _COMMIT.match(head):
        return head
    ref = head[5:].strip() if head.startswith("ref: ") else None
    if ref is None or not _REF.match(ref) or not _plain_parts(ref):
        warn.append(f".git/HEAD holds neither a commit nor a ref under .git/refs/; ignored it ({_WHY})")
        return None
    text = _token(git_refs / ref, git_refs, "the ref file that .git/HEAD names", warn)
    if text is not None:
        if _COMMIT.match(text.strip()):
            return text.strip()
        warn.append(f"the ref file that .git/HEAD names holds no commit; ignored it ({_WHY})")
        return None
    packed = _token(git_refs / "packed-refs", git_refs, ".git/packed-refs", warn, _PACKED)
    for line in (packed or "").splitlines():
        sha, _, name = line.strip().partition(" ")
        if name == ref:
            if _COMMIT.match(sha):
                return sha
            warn.append(f".git/packed-refs holds no commit for the ref that .git/HEAD names; ignored it ({_WHY})")
            return None
    warn.append("the ref that .git/HEAD names is in neither .git/refs/ nor .git/packed-refs; the revision is unknown")
    return None


def _worktree(folder: Path, warn: list[str]) -> Optional[tuple[Path, Path]]:
    """The git dir and common dir of a git worktree, whose ``.git`` is a file ``gitdir: PATH``.

    PATH leaves the folder by design (``<main>/.git/worktrees/<name>``), so it is followed only
    when it is a genuine worktree of this folder: its ``gitdir`` file points back at this
    ``.git``, and its ``commondir`` (the main .git) holds it. Nothing read is echoed."""
    text = _token(folder / ".git", folder, ".git", warn)
    line = (text or "").strip()
    if not line.startswith("gitdir: ") or "\0" in line or "\n" in line:
        if text is not None:
            warn.append(f".git is a file that does not say `gitdir: PATH`; ignored it ({_WHY})")
        return None
    try:
        gitdir = (folder / line[len("gitdir: ") :]).resolve(strict=True)
        back = read_small(gitdir / "gitdir", gitdir) if gitdir.is_dir() else None
        points_back = back is not None and (gitdir / back.strip()).resolve() == (folder / ".git").resolve()
        common_text = read_small(gitdir / "commondir", gitdir) if points_back else None
    except (OSError, RuntimeError, _Refused):
        points_back, common_text = False, None
    if not points_back or common_text is None:
        warn.append(f".git names a git directory that is not a worktree of this folder; ignored it ({_WHY})")
        return None
    common = (gitdir / common_text.strip()).resolve()
    if not common.is_dir() or not gitdir.is_relative_to(common):
        warn.append(f".git names a worktree whose main git directory does not hold it; ignored it ({_WHY})")
        return None
    return gitdir, common


def _download_metadata(folder: Path, warn: list[str]) -> Optional[tuple[str, str]]:
    """The commit ``hf download --local-dir`` recorded, and the file it is in."""
    downloads = folder / ".cache" / "huggingface" / "download"
    if not downloads.is_dir():
        return None
    if not downloads.resolve().is_relative_to(folder.resolve()):
        warn.append(f".cache/huggingface/download is a link leaving the directory; ignored it ({_WHY})")
        return None
    for meta in dict.fromkeys([downloads / "config.json.metadata", *sorted(downloads.glob("*.metadata"))]):
        name = (
            f".cache/huggingface/download/{meta.name}" if _PLAIN_NAME.match(meta.name) else "a download metadata file"
        )
        text = _token(meta, folder, name, warn)
        if text is None:
            continue
        first = text.splitlines()[:1]
        if first and _COMMIT.match(first[0].strip()):
            return first[0].strip(), name
        warn.append(f"{name} does not start with a commit; ignored it ({_WHY})")
    return None


def source_revision(folder: Path, warnings: Optional[list[str]] = None) -> Optional[tuple[str, str]]:
    """The commit a model directory holds and how it is known, or None.

    A Hugging Face cache snapshot is named by its commit; ``hf download
    --local-dir`` records the commit in ``.cache/huggingface/download/*.metadata``; a git
    clone has its HEAD. Each file that gives no valid commit adds a warning to ``warnings``.
    """
    if (
        folder.parent.name == "snapshots"
        and folder.parent.parent.name.startswith("models--")
        and _COMMIT.match(folder.name)
    ):
        return folder.name, "its Hugging Face cache snapshot"
    warn: list[str] = []
    found = _download_metadata(folder, warn)
    git = folder / ".git"
    if found is None and git.is_file() and not git.is_symlink():
        worktree = _worktree(folder, warn)
        commit = _git_head(worktree[0], warn, worktree[1]) if worktree else None
        found = (commit, "its git HEAD (a git worktree)") if commit else None
    elif found is None and git.is_dir():
        if not git.resolve().is_relative_to(folder.resolve()):
            warn.append(f".git is a link leaving the directory; ignored it ({_WHY})")
        else:
            commit = _git_head(git, warn)
            found = (commit, "its git HEAD") if commit else None
    if warnings is not None:
        warnings += [f"{folder}: {w}" for w in warn]
    return found


def hub_commit(cache: Path, revision: str) -> Optional[str]:
    """The snapshot name of ``revision`` (a commit, or a branch or tag under ``refs/``) in the
    hub cache folder of one model; None when ``revision`` cannot name one (``..``, absolute).

    Raises CheckpointError when ``refs/<revision>`` exists but holds no commit.
    """
    if not _HUB_REVISION.match(revision) or not _plain_parts(revision):
        return None
    refs = cache / "refs"
    try:
        text = read_small(refs / revision, refs) if refs.is_dir() else None
    except _Refused as exc:
        raise CheckpointError(
            f"{refs / revision}: is {exc}; expected the commit of '{revision}' (the Hugging Face "
            "cache is damaged: download the model again)"
        ) from None
    if text is None:
        return revision
    if not _COMMIT.match(text.strip()):
        raise CheckpointError(
            f"{refs / revision}: holds no commit; expected 40 or 64 lowercase hex characters (the "
            "Hugging Face cache is damaged: download the model again)"
        )
    return text.strip()


def check_pin(ref: Any, folder: Path) -> tuple[list[tuple[tuple, str]], list[str]]:
    """Problems ``(sub-path, message)`` and warnings about ``ref``'s pinned revision
    (and about revision files that were ignored, pinned or not)."""
    warnings: list[str] = []
    found = source_revision(folder, warnings)
    wanted = getattr(ref, "revision", None)
    if not wanted:
        return [], warnings
    if found is None:
        return [
            (
                ("revision",),
                f"cannot tell which revision {folder} holds (not a Hugging Face cache snapshot, no "
                "download metadata, no git HEAD); expected a directory written by `hf download "
                "ORG/NAME --revision REV --local-dir DIR` or a git clone, or pin its files with "
                "checksums instead of a revision",
            )
        ], warnings
    commit, how = found
    if commit == wanted:
        return [], warnings
    if str(ref) != ref.path:  # written org/name@revision: the cache resolved a branch or tag name through refs/
        return [], warnings + [
            f"{ref}: revision '{wanted}' is a branch or tag name, now commit {commit}; it moves, so "
            f"pin the commit for a reproducible recipe (revision: {commit})"
        ]
    if len(wanted) >= 7 and commit.startswith(wanted):  # an abbreviated commit of a local directory
        return [], warnings
    return [
        (
            ("revision",),
            f"{folder} is at revision {commit} (from {how}), the recipe pins {wanted}; expected the "
            f"pinned revision: download it again (hf download ORG/NAME --revision {wanted} "
            "--local-dir DIR), or change the pin",
        )
    ], warnings


# --- checksums ---------------------------------------------------------------------


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
    a file inside the folder, or in a hub snapshot a link into its repo's blobs; a link anywhere else
    is not the model's (it is never read, so nothing from outside reaches the output)."""
    return (folder / name).is_file() and _inside(folder, name)


def expected_checksums(plan) -> dict[str, dict[str, str]]:
    """Source key -> expected sha256 by file name, from the plan's pins (never the recipe again)."""
    return {key: dict(pin.checksums) for key, pin in plan.pins.items() if pin.checksums}


_BLOB_NAME = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # a git blob id, or an LFS sha256


def _inside(folder: Path, name: str) -> bool:
    """Whether a pinned file name is a plain relative path that stays inside ``folder`` (for a Hugging
    Face cache snapshot, ``<repo>/snapshots/<commit>``, also a link into its own ``<repo>/blobs``)."""
    parts = Path(name).parts
    if Path(name).is_absolute() or not parts or ".." in parts:
        return False
    target = (folder / name).resolve()
    if target.is_relative_to(folder.resolve()):
        return True
    if folder.parent.name != "snapshots":
        return False
    blobs = folder.parent.parent.resolve() / "blobs"  # the repo's own blobs folder, itself no link
    return not blobs.is_symlink() and target.parent == blobs and _BLOB_NAME.match(target.name) is not None


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
            if not _inside(ckpt.path, name) or not (ckpt.path / name).is_file():
                present = ", ".join(source_file_names(ckpt, side_files=True))
                problems.append(
                    _at(
                        plan,
                        pin,
                        f"checksums.{name}#key",
                        f"{ckpt.path} has no file '{name}'; expected one of: {present}",
                    )
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
                        f"checksums.{name}",
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


_LOCATION = re.compile(r"^(?P<file>.*):(?P<line>\d+):(?P<column>\d+): (?P<path>.+)$", re.S)


def _at(plan, pin, entry: str, message: str) -> Problem:
    """A problem at the place the plan recorded for ``entry`` of a pin (``file:line:col: field.path``;
    ``checksums.<name>#key`` is the key of that entry, ``checksums.<name>`` its value)."""
    locations = pin.locations if pin is not None else {}
    match = _LOCATION.match(locations.get(entry) or locations.get(entry.partition("#")[0], ""))
    if match is None:  # a plan written without locations: the recipe file, at its top
        return Problem((entry.partition("#")[0],), message, plan.recipe_file, 1, 1)
    return Problem((match["path"],), message, match["file"], int(match["line"]), int(match["column"]))


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
