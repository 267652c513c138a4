"""Which revision a source model is at: a Hugging Face cache snapshot, ``hf download --local-dir``
metadata or a git HEAD; a hub cache's refs; a recipe's pinned revision checked against them.

The checksums of source files (pins, digests) are in ``checksums.py``. No torch, no network.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, Optional

from tli_recipe.source.checkpoint import CheckpointError

# A revision comes from files inside the model directory that anyone who shared it
# controls: ``.git/HEAD`` may say ``ref: /home/u/.ssh/id_ed25519``, a ref file may be a
# symlink or a FIFO. So a revision is only ever a validated token (40 or 64 lowercase
# hex characters), read from a small regular file whose real path stays inside the
# directory; anything else is ignored with a warning that quotes nothing from the file.

#: a commit id: 40 (sha1) or 64 (sha256) lowercase hex characters (``\Z``: no trailing newline)
COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")
#: a git ref name as HEAD may name it: under refs/, plain characters, no empty, "." or ".." part
_REF = re.compile(r"^refs/[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*\Z")
#: a branch or tag name of a hub cache (``refs/<name>``) or a commit (``snapshots/<commit>``)
_HUB_REVISION = re.compile(r"^[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*\Z")
#: the longest branch, tag or commit name accepted
MAX_REVISION = 200
#: a file name that may be quoted in a warning
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]{1,120}\Z")
_SMALL = 4096  # HEAD, a ref file, download metadata, a hub ref: a few dozen bytes
_PACKED = 2**20  # packed-refs lists every branch and tag
_WHY = "a revision is 40 or 64 lowercase hex characters read from a small regular file inside the model directory"


class Refused(Exception):
    """A revision file that is not read: the reason names no content of it."""


def plain_parts(text: str) -> bool:
    """Whether ``text`` is a relative path with no empty, ``.`` or ``..`` part."""
    return all(part not in ("", ".", "..") for part in text.split("/"))


def valid_revision(text: str) -> bool:
    """Whether ``text`` can name a revision of a hub model: a commit, or a branch or tag name made of
    letters, digits, ``. _ + -`` and ``/`` with no empty, ``.`` or ``..`` part, at most MAX_REVISION
    characters. The one revision check: the cache paths ``refs/<name>`` and ``snapshots/<name>`` are
    built from a name that passed it."""
    return len(text) <= MAX_REVISION and _HUB_REVISION.match(text) is not None and plain_parts(text)


def read_small(path: Path, inside: Path, limit: int = _SMALL) -> Optional[str]:
    """The text of ``path`` when it is a regular file of at most ``limit`` bytes whose real
    path lies inside ``inside``; None when it does not exist. Raises Refused otherwise.

    Opened non-blocking (a FIFO must not hang us) and checked on the open descriptor.
    """
    if not os.path.lexists(path):
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused("a dangling or looping link") from None
    if not real.is_relative_to(inside.resolve()):
        raise Refused("a link leaving the directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise Refused("unreadable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused("not a regular file")
        if info.st_size > limit:
            raise Refused(f"larger than {limit} bytes")
        data = os.read(fd, limit + 1)
    except OSError:
        raise Refused("unreadable") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Refused(f"larger than {limit} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("not plain text") from None


def _token(path: Path, inside: Path, label: str, warn: list[str], limit: int = _SMALL) -> Optional[str]:
    """``read_small``, with a refusal turned into a warning naming only ``label``."""
    try:
        return read_small(path, inside, limit)
    except Refused as exc:
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
    if COMMIT.match(head):
        return head
    ref = head[5:].strip() if head.startswith("ref: ") else None
    if ref is None or not _REF.match(ref) or not plain_parts(ref):
        warn.append(f".git/HEAD holds neither a commit nor a ref under .git/refs/; ignored it ({_WHY})")
        return None
    text = _token(git_refs / ref, git_refs, "the ref file that .git/HEAD names", warn)
    if text is not None:
        if COMMIT.match(text.strip()):
            return text.strip()
        warn.append(f"the ref file that .git/HEAD names holds no commit; ignored it ({_WHY})")
        return None
    packed = _token(git_refs / "packed-refs", git_refs, ".git/packed-refs", warn, _PACKED)
    for line in (packed or "").splitlines():
        sha, _, name = line.strip().partition(" ")
        if name == ref:
            if COMMIT.match(sha):
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
    except (OSError, RuntimeError, Refused):
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
        if first and COMMIT.match(first[0].strip()):
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
        and COMMIT.match(folder.name)
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
    if not valid_revision(revision):
        return None
    refs = cache / "refs"
    try:
        text = read_small(refs / revision, refs) if refs.is_dir() else None
    except Refused as exc:
        raise CheckpointError(
            f"{refs / revision}: is {exc}; expected the commit of '{revision}' (the Hugging Face "
            "cache is damaged: download the model again)"
        ) from None
    if text is None:
        return revision
    if not COMMIT.match(text.strip()):
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
