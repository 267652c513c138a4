"""The requests to the hub, with huggingface_hub: a revision's commit, config.json and the index,
safetensors headers by HTTP range requests, and ``snapshot_download`` of the files a plan reads.

Imported only when a hub id is not (completely) in the cache; every failure of the hub or the
transfer becomes one CheckpointError line (exit 2), never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Iterator, Optional

from tli_recipe.files import write_text_atomic
from tli_recipe.source.checkpoint import (
    INDEX_FILE,
    SIDE_FILES,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    header_length,
    header_tensors,
    open_checkpoint,
    parse_header,
    read_index,
    show,
)
from tli_recipe.source.hub import (
    Access,
    cache_root,
    endpoint,
    fix_command,
    not_cached,
    token,
)
from tli_recipe.source.revisions import COMMIT

#: The first request for a safetensors header; most headers are smaller (huggingface_hub does the same).
FIRST_RANGE = 100_000
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_KEPT_HEADER = 16 * 2**20  # a kept header file (JSON) larger than this is not read
LOGIN = "log in (`hf auth login`, or set HF_TOKEN)"


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """Network and transfer failures of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {show(text[0] if text else '', 160)}" if text else type(exc).__name__


@contextlib.contextmanager
def hub_errors(ref: str, repo: str, revision: str, doing: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into one line naming the model, the hub and the fix."""
    from huggingface_hub import utils as hf

    hub = endpoint()
    try:
        yield
    except hf.GatedRepoError as exc:
        raise CheckpointError(
            f"{repo} is a gated model on {hub} (HTTP {_status(exc)}): accept its conditions at "
            f"{hub}/{repo}, then {LOGIN}"
        ) from None
    except hf.RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{repo} was not found on {hub} (HTTP {_status(exc)}); check the id, or if it is private, "
            f"{LOGIN} with a token that can read it"
        ) from None
    except hf.RevisionNotFoundError:
        raise not_cached(
            ref,
            repo,
            revision,
            f"; {hub} has no revision '{revision}' of {repo} either (expected a branch, tag or commit of it)",
        ) from None
    except hf.EntryNotFoundError:
        raise CheckpointError(
            f"{repo}@{revision}: a file it lists is missing on {hub} while {doing}; "
            "expected a complete safetensors model"
        ) from None
    except hf.HfHubHTTPError as exc:
        raise CheckpointError(
            f"{hub} answered HTTP {_status(exc)} while {doing} {repo}; try again later, or "
            f"download it with `{fix_command(repo, revision)}`"
        ) from None
    except _transfer_errors() as exc:
        if any("Connect" in cls.__name__ for cls in type(exc).__mro__):
            raise CheckpointError(
                f"cannot reach {hub} ({_reason(exc)}) while {doing} {repo}; check the network and "
                "HF_ENDPOINT, or use a local copy (--set base_model=/path/to/model)"
            ) from None
        raise CheckpointError(
            f"{doing} {repo} from {hub} was interrupted ({_reason(exc)}); nothing was written: run "
            "the same command again to resume (the cache keeps what arrived)"
        ) from None


def _status(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "status_code", "?"))


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token())


def _model_info(repo: str, revision: str, blobs: bool = False):
    """The hub's model info for ``revision``: its commit (checked), and its files (``siblings``)."""
    info = _api().model_info(repo, revision=revision, files_metadata=blobs)
    commit = getattr(info, "sha", None)
    if not isinstance(commit, str) or not COMMIT.match(commit):
        raise CheckpointError(f"{endpoint()} gave no valid commit for {repo}@{revision}; expected 40 hex characters")
    siblings = [s for s in (getattr(info, "siblings", None) or []) if isinstance(getattr(s, "rfilename", None), str)]
    return commit, siblings


def resolve_commit(repo: str, revision: str) -> tuple[str, list[str]]:
    """The commit ``revision`` names on the hub now, and the repository's file names."""
    commit, siblings = _model_info(repo, revision)
    return commit, [s.rfilename for s in siblings]


def _lfs_sha256(sibling) -> Optional[str]:
    digest = getattr(getattr(sibling, "lfs", None), "sha256", None)
    return digest if isinstance(digest, str) and _HEX64.match(digest) else None


def _fetch(repo: str, commit: str, name: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(repo, name, revision=commit, cache_dir=cache_root(), endpoint=endpoint(), token=token())
    )


def _write_ref(repo: str, revision: str, commit: str) -> None:
    """``refs/<revision>`` -> commit, as huggingface_hub writes it, so the next run finds the snapshot offline."""
    if revision == commit:
        return
    ref = cache_root() / ("models--" + repo.replace("/", "--")) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text() != commit:
        tmp = ref.with_name(ref.name + ".tli-tmp")
        tmp.write_text(commit)
        tmp.replace(ref)


def _weights(names: list[str], snapshot: Path) -> list[str]:
    """The safetensors files a plan reads: the index's shards, else model.safetensors, else every top-level one."""
    if INDEX_FILE in names:
        return sorted(set(read_index(snapshot / INDEX_FILE).values()))
    if SINGLE_FILE in names:
        return [SINGLE_FILE]
    return sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)


def _small_files(repo: str, commit: str, names: list[str]) -> Path:
    """config.json (and the index when the repository has one) in the cache; the snapshot folder."""
    if "config.json" not in names:
        raise CheckpointError(f"{repo}@{commit} has no config.json on {endpoint()}; expected a transformers model")
    snapshot = _fetch(repo, commit, "config.json").parent
    if INDEX_FILE in names:
        _fetch(repo, commit, INDEX_FILE)
    return snapshot


class _Headers:
    """Reads safetensors headers by HTTP range requests (as huggingface_hub's get_safetensors_metadata does)."""

    def __init__(self, repo: str, commit: str) -> None:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import (
            build_hf_headers,
            get_session,
            hf_raise_for_status,
        )

        self.repo, self.commit, self.url = repo, commit, hf_hub_url
        self.session, self.headers, self.check = get_session(), build_hf_headers(token=token()), hf_raise_for_status
        self.requests = self.bytes = self.cached = 0

    def _range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        url = self.url(self.repo, name, revision=self.commit, endpoint=endpoint())
        response = self.session.get(url, headers={**self.headers, "Range": f"bytes={start}-{end}"})
        self.check(response)
        found = _RANGE.match(response.headers.get("Content-Range", ""))
        if response.status_code != 206 or found is None or int(found[1]) != start:
            raise CheckpointError(
                f"{endpoint()} did not answer the range request for {self.repo}/{name} "
                f"(HTTP {response.status_code}); download the model with `{fix_command(self.repo, self.commit)}`"
            )
        self.requests += 1
        self.bytes += len(response.content)
        return response.content, int(found[3])

    def __call__(self, path: Path):
        cached = _cached_header(self.repo, self.commit, path.name)
        if cached is not None:
            try:  # validated again as it is parsed; a damaged one is read from the hub instead
                tensors = header_tensors(path, parse_header(path, cached[0]), 8 + len(cached[0]), cached[1])
                self.cached += 1
                return tensors
            except CheckpointError:
                pass
        first, size = self._range(path.name, 0, FIRST_RANGE - 1)
        length = header_length(path, first[:8], size)
        raw = first[8 : 8 + length] if 8 + length <= len(first) else self._range(path.name, 8, 7 + length)[0]
        if len(raw) != length:
            raise CheckpointError(f"{path}: the hub sent {len(raw)} header bytes of {length}; try again")
        tensors = header_tensors(path, parse_header(path, raw), 8 + length, size)
        _keep_header(self.repo, self.commit, path.name, raw, size)
        return tensors


def _header_file(repo: str, commit: str, name: str) -> Path:
    """Where the header of ``name`` at ``commit`` is kept: beside the digest cache, under a hash of its key."""
    from tli_recipe.source.hashes import default_cache_file

    key = hashlib.sha256(json.dumps([endpoint(), repo, commit, name]).encode()).hexdigest()
    return default_cache_file().parent / "headers" / f"{key}.json"


def _read_kept(path: Path) -> Optional[bytes]:
    """The bytes of a kept file: a regular file (not a link, FIFO or device) of at most
    ``_MAX_KEPT_HEADER`` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_KEPT_HEADER:
            return None
        data = f.read(_MAX_KEPT_HEADER + 1)
    return data if len(data) <= _MAX_KEPT_HEADER else None


def _cached_header(repo: str, commit: str, name: str) -> Optional[tuple[bytes, int]]:
    """A header read before (a commit's files never change): its bytes and the file's size, or None
    when there is none or it is not exactly what was written (it is validated again as it is parsed)."""
    try:
        data = _read_kept(_header_file(repo, commit, name))
        if data is None:
            return None
        record = json.loads(data.decode("utf-8"))
        if (
            not isinstance(record, dict)
            or record.get("version") != 1
            or record.get("key") != [endpoint(), repo, commit, name]
        ):
            return None
        raw, size = record.get("header"), record.get("size")
        if not isinstance(raw, str) or type(size) is not int:
            return None
        raw = raw.encode("utf-8")
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or UTF-8, lone surrogates
        return None
    return (raw, size) if 8 + len(raw) <= size else None


def _keep_header(repo: str, commit: str, name: str, raw: bytes, size: int) -> None:
    """Best effort: a full disk or a read-only home costs a range request next time, nothing more."""
    try:
        record = {"version": 1, "key": [endpoint(), repo, commit, name], "size": size, "header": raw.decode("utf-8")}
        text = json.dumps(record, ensure_ascii=False)
        if len(text.encode("utf-8")) <= _MAX_KEPT_HEADER:
            write_text_atomic(_header_file(repo, commit, name), text, mode=0o600)
    except (OSError, ValueError):
        pass


def remote_headers(repo: str, revision: str, access: Access) -> Checkpoint:
    """config.json and the index into the cache, the safetensors headers by range requests: what ``plan`` needs,
    without the weights."""
    ref = f"{repo}@{revision}"
    with hub_errors(ref, repo, revision, "reading"):
        commit, names = resolve_commit(repo, revision)
        snapshot = _small_files(repo, commit, names)
        _write_ref(repo, revision, commit)
        reader = _Headers(repo, commit)
        files = _weights(names, snapshot)
        ckpt = open_checkpoint(snapshot, read=reader, files=files)
    small = " and ".join(n for n in ("config.json", INDEX_FILE) if (snapshot / n).is_file())
    kept = f", {reader.cached} known from an earlier read" if reader.cached else ""
    access.say(
        f"hub: {repo}@{revision} is commit {commit}; fetched {small} into {snapshot} and read "
        f"{len(files)} safetensors header(s) ({reader.bytes} bytes in {reader.requests} range requests{kept}); "
        f"the weights were not downloaded (`run` downloads them, or `{fix_command(repo, commit)}`)"
    )
    return ckpt


def pin_sources(repo: str, revision: str, access: Access) -> tuple[Checkpoint, dict[str, str]]:
    """What ``pin`` needs of a hub model that is not in the cache, without its weights: config.json, the
    index and the tokenizer and generation files into the cache (small; they are hashed there), the
    safetensors headers by range requests, and each weight file's sha256 as the hub lists it for its
    Git LFS object. A weight file not stored in LFS has no sha256 on the hub: it is downloaded."""
    ref = f"{repo}@{revision}"
    with hub_errors(ref, repo, revision, "reading"):
        commit, siblings = _model_info(repo, revision, blobs=True)
        by_name = {s.rfilename: s for s in siblings}
        names = list(by_name)
        snapshot = _small_files(repo, commit, names)
        for name in SIDE_FILES:
            if name in by_name:
                _fetch(repo, commit, name)
        _write_ref(repo, revision, commit)
        files = _weights(names, snapshot)
        digests = {name: d for name in files if (d := _lfs_sha256(by_name.get(name)))}
        for name in files:
            if name not in digests:
                _fetch(repo, commit, name)
        ckpt = open_checkpoint(snapshot, read=_Headers(repo, commit), files=files)
    access.say(
        f"hub: {repo}@{revision} is commit {commit}; the sha256 of {len(digests)} of {len(files)} safetensors "
        f"file(s) from the hub's LFS records (not downloaded), the other files fetched into {snapshot} and hashed"
    )
    return ckpt, digests


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def download(repo: str, revision: str, access: Access) -> Path:
    """The snapshot of ``repo`` at ``revision`` with the files a plan reads (config.json, the index, its
    shards, tokenizer and generation files), downloaded into the cache; progress on stderr."""
    from huggingface_hub import snapshot_download

    ref = f"{repo}@{revision}"
    with hub_errors(ref, repo, revision, "downloading"):
        commit, names = resolve_commit(repo, revision)
        snapshot = _small_files(repo, commit, names)
        wanted = ["config.json", *(n for n in (INDEX_FILE, *SIDE_FILES) if n in names), *_weights(names, snapshot)]
        access.say(
            f"hub: downloading {repo}@{revision} (commit {commit}, {len(wanted)} files) from {endpoint()} "
            f"into {cache_root()}"
        )
        path = snapshot_download(
            repo,
            revision=commit,
            cache_dir=cache_root(),
            endpoint=endpoint(),
            token=token(),
            allow_patterns=wanted,
            tqdm_class=None if access.progress else _quiet_tqdm(),
        )
        _write_ref(repo, revision, commit)
    return Path(path)
