"""The requests to the hub: a revision's commit and file list (model info), config.json and the
index, safetensors headers by HTTP range requests, and the files a plan reads, each hashed as it
lands and checked against the hub's claim and the recipe's pin. huggingface_hub gives the HTTP
client, the headers and its typed errors; every request has a timeout (``timeouts``).

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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import quote, urljoin, urlsplit

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
from tli_recipe.source.hashes import remember
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
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_HEX40 = re.compile(r"^[0-9a-f]{40}\Z")
_CHUNK = 8 * 2**20
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
            "the same command again (the files that arrived whole stay in the cache)"
        ) from None


def _status(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "status_code", "?"))


# --- timeouts ------------------------------------------------------------------------
#
# huggingface_hub's shared client waits forever (timeout=None in its client factory, 2.5.0); each
# request here has a bound. A request for metadata (model info, a header range) waits at most
# HF_HUB_ETAG_TIMEOUT seconds for each answer, a transfer HF_HUB_DOWNLOAD_TIMEOUT seconds for each
# piece of the body (huggingface_hub's own settings, default 10 s); TLI_RECIPE_HUB_TIMEOUT sets both.

TIMEOUT_ENV = "TLI_RECIPE_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0


def _seconds(name: str, strict: bool) -> Optional[float]:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        if strict:
            raise CheckpointError(f"{name}={show(text)}: not a number of seconds; expected a number in (0, 86400]")
        return None  # huggingface_hub ignores a value it cannot read too
    return value


def timeouts() -> tuple[float, float, str]:
    """Seconds to wait for a metadata answer and for each piece of a transfer, and the setting that says so."""
    own = _seconds(TIMEOUT_ENV, strict=True)
    if own is not None:
        return own, own, TIMEOUT_ENV
    meta = _seconds("HF_HUB_ETAG_TIMEOUT", strict=False) or DEFAULT_TIMEOUT
    transfer = _seconds("HF_HUB_DOWNLOAD_TIMEOUT", strict=False) or DEFAULT_TIMEOUT
    return meta, transfer, f"HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT or {TIMEOUT_ENV}"


# --- requests --------------------------------------------------------------------------

_MAX_REDIRECTS = 5
_MAX_INFO = 64 * 2**20  # a model info answer larger than this is not read


def _shown_url(url: str) -> str:
    parts = urlsplit(url)
    return show(f"{parts.scheme}://{parts.netloc}{parts.path}", 160)


@contextlib.contextmanager
def _get(url: str, timeout: float, what: str, setting: str, extra: Optional[dict] = None):
    """GET ``url`` (streamed) with ``timeout`` seconds per answer and per piece of the body; redirects
    are followed by hand, to http and https only (the token only to the hub's own host). Yields the
    final response and the headers of the first one (where the hub puts X-Linked-Etag and
    X-Repo-Commit before redirecting to its storage)."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session

    session = get_session()
    home = urlsplit(endpoint()).netloc
    first: Optional[dict] = None
    try:
        for _ in range(_MAX_REDIRECTS + 1):
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise CheckpointError(
                    f"{endpoint()} redirected {what} to {_shown_url(url)}, a {show(scheme, 20)}: address; only http "
                    "and https are followed (check HF_ENDPOINT: the hub is not answering as a hub does)"
                )
            secret = token() if urlsplit(url).netloc == home else False
            headers = {**build_hf_headers(token=secret), **(extra or {})}
            with session.stream(
                "GET", url, headers=headers, timeout=httpx2.Timeout(timeout), follow_redirects=False
            ) as response:
                if first is None:
                    first = {k.lower(): v for k, v in response.headers.items()}
                location = response.headers.get("location")
                if response.status_code in (301, 302, 303, 307, 308) and location:
                    url = urljoin(url, location)
                    continue
                yield response, first
                return
        raise CheckpointError(f"{endpoint()} redirected {what} more than {_MAX_REDIRECTS} times; try again later")
    except httpx2.TimeoutException:
        raise CheckpointError(
            f"no answer from {_shown_url(url)} within {timeout:g} s while {what}; check the network and "
            f"HF_ENDPOINT, or wait longer ({setting} sets the seconds)"
        ) from None


def _check_status(response, what: str) -> None:
    """A server error is said as one (not as a missing file); the hub's typed errors (missing repo,
    revision or file, gated repo) are raised as huggingface_hub raises them, for hub_errors."""
    from huggingface_hub.utils import hf_raise_for_status

    if response.status_code < 400:
        return
    response.read()
    if response.status_code >= 500:
        raise CheckpointError(
            f"{endpoint()} answered HTTP {response.status_code} (a server error) while {what}; try again later"
        )
    hf_raise_for_status(response)
    raise CheckpointError(f"{endpoint()} answered HTTP {response.status_code} while {what}")


@dataclass(frozen=True)
class HubFile:
    """One file of a hub commit as the model info lists it; every value that becomes a path is checked."""

    name: str
    lfs_sha256: Optional[str]  # Git LFS: the sha256 of its bytes, the name of its blob
    blob_id: Optional[str]  # git's blob id (sha1 of "blob <size>\0" + bytes): the blob name of other files
    size: Optional[int]


def _hub_file(record: dict, where: str) -> HubFile:
    name = record["rfilename"]
    lfs = record.get("lfs")
    digest = lfs.get("sha256") if isinstance(lfs, dict) else None
    blob_id, size = record.get("blobId"), record.get("size")
    if digest is not None and (not isinstance(digest, str) or not _HEX64.match(digest)):
        raise CheckpointError(
            f"{where} lists '{show(digest)}' as the LFS sha256 of {show(name)}; expected 64 lowercase hex "
            "characters (it would name a file of the cache): nothing was downloaded"
        )
    if blob_id is not None and (not isinstance(blob_id, str) or not _HEX40.match(blob_id)):
        raise CheckpointError(
            f"{where} lists '{show(blob_id)}' as the git blob id of {show(name)}; expected 40 lowercase hex "
            "characters (it would name a file of the cache): nothing was downloaded"
        )
    if size is not None and (type(size) is not int or size < 0):
        size = None
    return HubFile(name, digest, blob_id, size)


def _model_info(repo: str, revision: str) -> tuple[str, dict[str, HubFile]]:
    """The hub's model info for ``revision`` with its files' blob ids, sizes and LFS sha256: its commit
    and its files, both checked before anything is downloaded."""
    url = f"{endpoint()}/api/models/{repo}/revision/{quote(revision, safe='')}?blobs=true"
    meta, _, setting = timeouts()
    what = f"reading the model info of {repo}@{revision}"
    with _get(url, meta, what, setting) as (response, _):
        _check_status(response, what)
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > _MAX_INFO:
                raise CheckpointError(f"{_shown_url(url)}: the model info is larger than {_MAX_INFO // 2**20} MiB")
    try:
        info = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise CheckpointError(
            f"{_shown_url(url)}: the model info is not JSON ({show(reason, 80)}); expected a Hugging Face hub's "
            "answer (check HF_ENDPOINT)"
        ) from None
    where = f"{endpoint()} (model info of {repo}@{revision})"
    commit = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(commit, str) or not COMMIT.match(commit):
        raise CheckpointError(f"{where} gave no valid commit; expected 40 lowercase hex characters")
    siblings = info.get("siblings")
    records = [s for s in siblings if isinstance(s, dict)] if isinstance(siblings, list) else []
    files = {s["rfilename"]: s for s in records if isinstance(s.get("rfilename"), str)}
    # Only top-level files are read; their names become paths, so each must be one plain segment.
    return commit, {name: _hub_file(record, where) for name, record in files.items() if _plain_name(name)}


def _plain_name(name: str) -> bool:
    return (
        0 < len(name) <= 255 and name not in (".", "..") and not any(c in name for c in "/\\\0") and name.isprintable()
    )


def resolve_commit(repo: str, revision: str) -> tuple[str, list[str]]:
    """The commit ``revision`` names on the hub now, and the repository's (top-level) file names."""
    commit, files = _model_info(repo, revision)
    return commit, list(files)


# --- downloads -------------------------------------------------------------------------
#
# Why not snapshot_download / hf_hub_download (huggingface_hub 2.5.0): they store a file as
# blobs/<ETag> (file_download.py: os.path.join(storage_folder, "blobs", etag)) and lock it as
# locks/<repo>/<ETag>.lock with the ETag or the tree's LFS oid unchecked, so a hub answering
# "../../../x" writes outside the cache; and they keep the bytes under the name the hub claims
# without hashing them. Here every name is checked first (a file name is one plain segment, a
# blob name 40 or 64 hex), the bytes land in a temporary file of blobs/ while they are hashed,
# and only bytes whose digest equals the hub's claim and the recipe's pin get the blob name.


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _link(snapshot: Path, name: str, blob: str) -> Path:
    """``snapshots/<commit>/<name>`` -> ``../../blobs/<blob>``, as huggingface_hub lays out its cache."""
    snapshot.mkdir(parents=True, exist_ok=True)
    link = snapshot / name
    tmp = snapshot / f".tli-{os.getpid()}-{name}.link"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.join("..", "..", "blobs", blob), tmp)
    os.replace(tmp, link)
    return link


def _write_ref(repo: str, revision: str, commit: str) -> None:
    """``refs/<revision>`` -> commit, as huggingface_hub writes it, so the next run finds the snapshot offline
    (``revision`` passed hub.check_revision: a plain relative name)."""
    if revision == commit:
        return
    ref = cache_root() / ("models--" + repo.replace("/", "--")) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file() or ref.read_text() != commit:
        tmp = ref.with_name(ref.name + ".tli-tmp")
        tmp.write_text(commit)
        tmp.replace(ref)


class MismatchError(CheckpointError):
    """Bytes from the hub whose digest differs from the hub's claim or the recipe's pin."""


def fetch_file(repo: str, commit: str, file: HubFile, pin: Optional[str], access: Access) -> Path:
    """``file`` of ``repo`` at ``commit`` in the cache, downloaded unless its blob is there; the bytes
    that arrive are hashed as they land and must match the hub's claim (LFS sha256, blob id, ETag)
    and ``pin`` (a sha256), else nothing is kept and a MismatchError names the file and both digests."""
    folder = cache_root() / ("models--" + repo.replace("/", "--"))
    blobs, snapshot = folder / "blobs", folder / "snapshots" / commit
    claim = file.lfs_sha256 or file.blob_id
    if claim is not None and (blobs / claim).is_file() and not (blobs / claim).is_symlink():
        return _link(snapshot, file.name, claim)  # already here: what the cache guarantees, see docs/pins.md
    for folder_in_cache in (blobs, snapshot.parent, snapshot):
        if folder_in_cache.is_symlink():  # a write through it could land anywhere
            raise CheckpointError(
                f"{folder_in_cache}: is a link in the Hugging Face cache; nothing was downloaded into it (the cache "
                "is damaged: remove the link, or the model's folder, and run again)"
            )
    _, transfer, setting = timeouts()
    url = f"{endpoint()}/{repo}/resolve/{commit}/{quote(file.name)}"
    what = f"downloading {repo}@{commit}/{file.name}"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".tli-", suffix=".incomplete")
    tmp = Path(tmp_name)
    try:
        sha256 = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _get(url, transfer, what, setting) as (response, first):
            _check_status(response, what)
            _check_headers(first, repo, commit, file)
            bar = _bar(access, file)
            written = 0
            for chunk in response.iter_bytes(_CHUNK):
                written += len(chunk)
                if file.size is not None and written > file.size:
                    raise MismatchError(
                        f"{repo}@{commit}/{file.name} from {endpoint()}: the hub sent more than the {file.size} "
                        "bytes it lists; nothing was kept"
                    )
                sha256.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
            bar.close()
        digest = sha256.hexdigest()
        arrived = digest if file.lfs_sha256 else _git_blob_id(tmp)
        hub_says = claim or _etag(first)
        where = f"{repo}@{commit}/{file.name} from {endpoint()}"
        if hub_says is not None and arrived != hub_says:
            kind = "sha256" if file.lfs_sha256 else "git blob id"
            raise MismatchError(
                f"{where}: the bytes that arrived have {kind} {arrived}, the hub lists {hub_says}; the hub "
                "sent other bytes than it lists: nothing was kept (try again later; if it persists the hub "
                "or something between is tampering with the file)"
            )
        if pin is not None and digest != pin:
            raise MismatchError(
                f"{where}: the bytes that arrived have sha256 {digest}, the recipe pins {pin}; nothing was kept "
                "(the hub serves other bytes at this revision: check the pin and the revision)"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, blobs / arrived)
        remember(blobs / arrived, digest)  # its sha256, taken as it landed: the run reads it no second time
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return _link(snapshot, file.name, arrived)


def _etag(headers: dict) -> Optional[str]:
    raw = headers.get("x-linked-etag") or headers.get("etag")
    return raw.removeprefix("W/").strip('"') if isinstance(raw, str) else None


def _check_headers(headers: dict, repo: str, commit: str, file: HubFile) -> None:
    """The commit and the ETag the hub sends with a file must agree with its model info."""
    where = f"{repo}@{commit}/{file.name} on {endpoint()}"
    said = headers.get("x-repo-commit")
    if said is not None and said != commit:
        raise CheckpointError(f"{where}: the hub sent the file of commit {show(said)}, not {commit}; try again")
    etag = _etag(headers)
    if etag is None:
        return
    if not (_HEX64.match(etag) or _HEX40.match(etag)):
        raise CheckpointError(
            f"{where}: the hub's ETag '{show(etag)}' is not a digest (40 or 64 lowercase hex characters); "
            "nothing was downloaded"
        )
    claim = file.lfs_sha256 or file.blob_id
    if claim is not None and etag != claim:
        raise MismatchError(
            f"{where}: the hub's ETag {etag} differs from the digest its model info lists, {claim}; the hub "
            "contradicts itself: nothing was downloaded"
        )


def _bar(access: Access, file: HubFile):
    from tqdm.auto import tqdm

    shown = access.progress and file.name.endswith(".safetensors")  # small side files need no bar
    return tqdm(total=file.size, unit="B", unit_scale=True, desc=file.name[:40], disable=not shown, file=sys.stderr)


def _weights(names: list[str], snapshot: Path) -> list[str]:
    """The safetensors files a plan reads: the index's shards, else model.safetensors, else every top-level one."""
    if INDEX_FILE in names:
        return sorted(set(read_index(snapshot / INDEX_FILE).values()))
    if SINGLE_FILE in names:
        return [SINGLE_FILE]
    return sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)


def _listed(repo: str, commit: str, files: dict[str, HubFile], name: str) -> HubFile:
    if name not in files:
        raise CheckpointError(
            f"{repo}@{commit}: {show(name)} is not among the files {endpoint()} lists; expected a complete "
            "safetensors model (config.json, and the shards its index names)"
        )
    return files[name]


def _small_files(
    repo: str, commit: str, files: dict[str, HubFile], pins: dict[str, str], access: Access, side: bool = False
) -> Path:
    """config.json (and the index when the repository has one; ``side``: the tokenizer and generation
    files too) in the cache; the snapshot folder."""
    if "config.json" not in files:
        raise CheckpointError(f"{repo}@{commit} has no config.json on {endpoint()}; expected a transformers model")
    names = ["config.json", *(n for n in (INDEX_FILE, *(SIDE_FILES if side else ())) if n in files)]
    for name in names:
        snapshot = fetch_file(repo, commit, files[name], pins.get(name), access).parent
    return snapshot


class _Headers:
    """Reads safetensors headers by HTTP range requests (as huggingface_hub's get_safetensors_metadata does)."""

    def __init__(self, repo: str, commit: str) -> None:
        self.repo, self.commit = repo, commit
        self.requests = self.bytes = self.cached = 0

    def _range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        url = f"{endpoint()}/{self.repo}/resolve/{self.commit}/{quote(name)}"
        meta, _, setting = timeouts()
        what = f"reading the safetensors header of {self.repo}@{self.commit}/{name}"
        with _get(url, meta, what, setting, {"Range": f"bytes={start}-{end}"}) as (response, _):
            _check_status(response, what)
            found = _RANGE.match(response.headers.get("Content-Range", ""))
            if response.status_code != 206 or found is None or int(found[1]) != start:
                raise CheckpointError(
                    f"{endpoint()} did not answer the range request for {self.repo}/{name} "
                    f"(HTTP {response.status_code}); download the model with `{fix_command(self.repo, self.commit)}`"
                )
            content = b""
            for chunk in response.iter_bytes():
                content += chunk
                if len(content) > end - start + 1:
                    raise CheckpointError(f"{endpoint()} sent more bytes than asked for {self.repo}/{name}; try again")
        self.requests += 1
        self.bytes += len(content)
        return content, int(found[3])

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


def _pins(access: Access) -> dict[str, str]:
    return dict(access.pins)


def remote_headers(repo: str, revision: str, access: Access) -> Checkpoint:
    """config.json and the index into the cache, the safetensors headers by range requests: what ``plan`` needs,
    without the weights."""
    ref = f"{repo}@{revision}"
    with hub_errors(ref, repo, revision, "reading"):
        commit, files = _model_info(repo, revision)
        snapshot = _small_files(repo, commit, files, _pins(access), access)
        _write_ref(repo, revision, commit)
        reader = _Headers(repo, commit)
        weights = _weights(list(files), snapshot)
        ckpt = open_checkpoint(snapshot, read=reader, files=weights)
    small = " and ".join(n for n in ("config.json", INDEX_FILE) if (snapshot / n).is_file())
    kept = f", {reader.cached} known from an earlier read" if reader.cached else ""
    access.say(
        f"hub: {repo}@{revision} is commit {commit}; fetched {small} into {snapshot} and read "
        f"{len(weights)} safetensors header(s) ({reader.bytes} bytes in {reader.requests} range requests{kept}); "
        f"the weights were not downloaded (`run` downloads them, or `{fix_command(repo, commit)}`)"
    )
    return ckpt


def pin_sources(repo: str, revision: str, access: Access) -> tuple[Checkpoint, dict[str, str]]:
    """What ``pin`` needs of a hub model that is not in the cache, without its weights: config.json, the
    index and the tokenizer and generation files into the cache (small; they are hashed there), the
    safetensors headers by range requests, and each weight file's sha256 as the hub lists it for its
    Git LFS object (the hub's claim: a run that downloads the file checks its bytes against it). A
    weight file not stored in LFS has no sha256 on the hub: it is downloaded."""
    ref = f"{repo}@{revision}"
    with hub_errors(ref, repo, revision, "reading"):
        commit, files = _model_info(repo, revision)
        snapshot = _small_files(repo, commit, files, {}, access, side=True)
        _write_ref(repo, revision, commit)
        weights = _weights(list(files), snapshot)
        digests = {name: d for name in weights if (d := _listed(repo, commit, files, name).lfs_sha256)}
        for name in weights:
            if name not in digests:
                fetch_file(repo, commit, files[name], None, access)
        ckpt = open_checkpoint(snapshot, read=_Headers(repo, commit), files=weights)
    access.say(
        f"hub: {repo}@{revision} is commit {commit}; the sha256 of {len(digests)} of {len(weights)} safetensors "
        f"file(s) from the hub's LFS records (not downloaded), the other files fetched into {snapshot} and hashed"
    )
    return ckpt, digests


def download(repo: str, revision: str, access: Access) -> Path:
    """The snapshot of ``repo`` at ``revision`` with the files a plan reads (config.json, the index, its
    shards, tokenizer and generation files), downloaded into the cache, each checked against the hub's
    claim and the recipe's pin as it lands; progress on stderr."""
    ref = f"{repo}@{revision}"
    pins = _pins(access)
    with hub_errors(ref, repo, revision, "downloading"):
        commit, files = _model_info(repo, revision)
        snapshot = _small_files(repo, commit, files, pins, access, side=True)
        weights = [_listed(repo, commit, files, name) for name in _weights(list(files), snapshot)]
        access.say(
            f"hub: downloading {repo}@{revision} (commit {commit}, {len(weights)} weight file(s)) from {endpoint()} "
            f"into {cache_root()}"
        )
        for file in weights:
            fetch_file(repo, commit, file, pins.get(file.name), access)
        _write_ref(repo, revision, commit)
    return snapshot
