"""Hugging Face hub ids (``org/name``, ``org/name@revision``): the local cache first, then the hub.

A cache snapshot that holds what a plan reads (config.json and the safetensors weights) is
used without a request. Otherwise ``plan`` fetches only config.json and the index and reads
the safetensors headers with HTTP range requests (the weights stay on the hub), and ``run``
downloads with ``snapshot_download``, limited to the files a plan reads. huggingface_hub is
imported only when the network is needed, so ``validate`` and ``plan`` on a cached model
start fast. The environment is read each time a model is resolved, with huggingface_hub's own
precedence (its ``constants`` freeze it when first imported): HF_HUB_CACHE, then
HUGGINGFACE_HUB_CACHE, then HF_HOME/hub, then XDG_CACHE_HOME/huggingface/hub, ``~`` and
``$VARS`` expanded; HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), HF_ENDPOINT, HF_TOKEN.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from tli_recipe.recipe.sources import is_hub_id
from tli_recipe.source.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    read_index,
    show,
)
from tli_recipe.source.revisions import (
    COMMIT,
    Refused,
    hub_commit,
    read_small,
    valid_revision,
)

DEFAULT_ENDPOINT = "https://huggingface.co"


def _is_true(value: Optional[str]) -> bool:
    return (value or "").upper() in {"1", "ON", "YES", "TRUE"}


def _expand(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def cache_root() -> Path:
    """The hub cache folder, as huggingface_hub.constants.HF_HUB_CACHE computes it from the environment now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    legacy = env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(str(_expand(home)), "hub")
    return _expand(env.get("HF_HUB_CACHE") or legacy)


def offline_env() -> bool:
    return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or None  # None: huggingface_hub's stored token (hf auth login)


@dataclass(frozen=True)
class Access:
    """How far resolving a hub id may go: ``cache`` never makes a request, ``headers`` (plan) fetches
    config.json, the index and the safetensors headers, ``weights`` (run) downloads."""

    fetch: str = "cache"
    offline: bool = False  # --offline; HF_HUB_OFFLINE counts too
    progress: bool = True
    log: Optional[Callable[[str], None]] = None
    pins: dict[str, str] = field(default_factory=dict)  # file name -> sha256 the recipe pins (checked as bytes land)

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


def parse_hub_id(ref: str) -> Optional[tuple[str, str]]:
    """``(repo, revision)`` of ``org/name[@revision]`` (revision ``main`` when none), None for another shape."""
    repo, _, revision = str(ref).partition("@")
    return (repo, revision or "main") if is_hub_id(repo) else None


def fix_command(repo: str, revision: str) -> str:
    return f"hf download {repo}" + (f" --revision {revision}" if revision != "main" else "")


def cached_revisions(folder: Path) -> list[str]:
    """The revisions the cache holds for one model: ``branch (commit)`` for each valid ref, then the
    other snapshot commits. Only validated names and commits are listed (the cache may be shared)."""
    seen: dict[str, str] = {}
    refs = folder / "refs"
    if refs.is_dir() and not refs.is_symlink():
        for path in sorted(refs.rglob("*"))[:200]:
            name = path.relative_to(refs).as_posix()
            if not valid_revision(name) or len(name) > 100:
                continue
            try:
                text = (read_small(path, refs) or "").strip()
            except Refused:
                continue
            if COMMIT.match(text):
                seen.setdefault(text, name)
    snapshots = folder / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir() if COMMIT.match(p.name)) if snapshots.is_dir() else []
    out = [f"{name} ({commit})" for commit, name in seen.items() if commit in commits]
    out += [commit for commit in commits if commit not in seen]
    return out


def not_cached(ref: str, repo: str, revision: str, why: str = "") -> CheckpointError:
    folder = cache_root() / ("models--" + repo.replace("/", "--"))
    held = cached_revisions(folder) if folder.is_dir() else []
    have = f"; the cache holds {repo} at: {', '.join(held[:10])}" if held else ""
    return CheckpointError(
        f"'{ref}' is neither a local directory nor a model in the local Hugging Face cache "
        f"({cache_root()}){have}{why}; "
        f"check the path, or download it ({fix_command(repo, revision)}; HF_HUB_CACHE or HF_HOME locate the cache), "
        "or point at a local copy (--set base_model=/path/to/model)"
    )


def _snapshot(repo: str, revision: str) -> Optional[Path]:
    """The cache snapshot of ``repo`` at ``revision`` (through refs/ for a branch or tag), or None."""
    folder = cache_root() / ("models--" + repo.replace("/", "--"))
    commit = hub_commit(folder, revision)
    snapshot = folder / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def check_revision(ref: str, repo: str, revision: str) -> None:
    """Refuse a revision that cannot name a cache path or a hub revision (:func:`valid_revision`)."""
    if not valid_revision(revision):
        raise not_cached(
            ref,
            repo,
            "main",
            f"; '{show(revision)}' is not a revision (expected a branch, tag or "
            "commit name: letters, digits, . _ + - and /)",
        )


def missing_files(snapshot: Path) -> tuple[list[str], list[str]]:
    """Files a plan reads that ``snapshot`` lacks, and its files that are dangling links (an
    interrupted download: the blob they point at is not there)."""
    dangling = sorted(p.name for p in snapshot.iterdir() if p.is_symlink() and not p.exists())
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    if (snapshot / INDEX_FILE).is_file():
        missing += [n for n in sorted(set(read_index(snapshot / INDEX_FILE).values())) if not (snapshot / n).is_file()]
    elif not (snapshot / SINGLE_FILE).is_file() and not any(p.is_file() for p in snapshot.glob("*.safetensors")):
        missing.append(SINGLE_FILE if SINGLE_FILE in dangling else "*.safetensors")
    return missing, dangling


def _names(names: list[str]) -> str:
    shown = [n if re.match(r"^[A-Za-z0-9._-]{1,120}$", n) else "a file with an odd name" for n in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def cached_model(ref: str) -> Path:
    """The cache snapshot of a hub id; no request is made."""
    hub = parse_hub_id(ref)
    if hub is None or Path(ref).expanduser().exists():
        raise CheckpointError(
            f"'{ref}' is not a directory; expected a model directory with config.json, or a hub id org/name"
        )
    repo, revision = hub
    check_revision(ref, repo, revision)
    snapshot = _snapshot(repo, revision)
    if snapshot is None:
        raise not_cached(ref, repo, revision)
    return snapshot


def open_model(ref: str, access: Access = Access()) -> Checkpoint:
    """A local directory, or a hub id: from the cache when it holds what the plan reads, else
    (as ``access`` allows) its headers or its files from the hub."""
    local = Path(ref).expanduser()
    if local.is_dir() or parse_hub_id(ref) is None or local.exists():
        from tli_recipe.source.checkpoint import resolve_model

        return open_checkpoint(resolve_model(ref))
    repo, revision = parse_hub_id(ref)
    check_revision(ref, repo, revision)
    offline = access.offline or offline_env()
    network = access.fetch != "cache" and not offline
    snapshot = _snapshot(repo, revision)
    if snapshot is not None:
        missing, dangling = missing_files(snapshot)
        if not missing and not dangling:
            return open_checkpoint(snapshot)
        if dangling and not (network and access.fetch == "weights"):
            raise CheckpointError(
                f"{snapshot}: an incomplete download: {_names(dangling)} point(s) at blobs that are not "
                f"in the cache; complete it with `{fix_command(repo, snapshot.name)}`"
            )
        if not network:
            return open_checkpoint(snapshot)  # config.json alone is enough for plan (shapes from the architecture)
    elif not network:
        why = "; --offline forbids downloading" if access.offline else "; HF_HUB_OFFLINE is set" if offline else ""
        raise not_cached(ref, repo, revision, why)
    from tli_recipe.source.hubfetch import download, remote_headers

    access = replace(access, pins=dict(getattr(ref, "checksums", None) or {}))
    if access.fetch == "headers":
        return remote_headers(repo, revision, access)
    return open_checkpoint(download(repo, revision, access))


def pin_target(ref: str, offline: bool = False, log: Optional[Callable[[str], None]] = None) -> str:
    """``org/name@commit`` for a hub id whose revision is a branch or tag, resolved on the hub now
    (the cache's refs/ may be stale); ``ref`` itself for a directory, a commit, or offline."""
    hub = parse_hub_id(ref)
    if hub is None or Path(ref).expanduser().exists() or offline or offline_env() or COMMIT.match(hub[1]):
        return ref
    repo, revision = hub
    check_revision(ref, repo, revision)
    from tli_recipe.source.hubfetch import hub_errors, resolve_commit

    with hub_errors(ref, repo, revision, "resolving"):
        commit = resolve_commit(repo, revision)[0]
    if log is not None:
        log(f"hub: {repo}@{revision} is commit {commit} on {endpoint()}")
    return f"{repo}@{commit}"


def pin_sources(
    ref: str, offline: bool = False, log: Optional[Callable[[str], None]] = None
) -> tuple[Checkpoint, dict[str, str]]:
    """The checkpoint ``pin`` hashes, and the digests already known without reading: a directory or a
    complete cache snapshot as it is (no digests); an uncached hub model from the hub without its
    weights, whose sha256 the hub lists (``hubfetch.pin_sources``)."""
    access = Access(fetch="weights", offline=offline, log=log)
    hub = parse_hub_id(ref)
    local = Path(ref).expanduser()
    if hub is None or local.exists() or offline or offline_env():
        return open_model(ref, access), {}
    repo, revision = hub
    check_revision(ref, repo, revision)
    snapshot = _snapshot(repo, revision)
    if snapshot is not None and missing_files(snapshot) == ([], []):
        return open_checkpoint(snapshot), {}
    from tli_recipe.source.hubfetch import pin_sources as from_hub

    return from_hub(repo, revision, access)
