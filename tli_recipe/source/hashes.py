"""sha256 of source files without a second read before the first write.

``run`` records the sha256 of every source file it depends on and checks the recipe's pins.
Reading every source byte for that before writing doubled the work of a copy-speed run, so
digests come from, in order:

1. a small cache of digests this tool computed (it read the bytes: while hashing a source, or
   as a download landed), keyed by the file's identity and state (device, inode, size, mtime
   and ctime in ns): a rerun on the same files hashes nothing. Each entry carries a MAC keyed by
   a secret of this user's cache (``<cache>.key``, 0600), so an entry that this tool did not
   write (a poisoned or copied cache) is ignored and the file is hashed;
2. hashing, in a background thread that runs while the executor writes (hashlib releases the
   GIL), so the two overlap on a multi-core machine. A file of a Hugging Face cache snapshot
   that links to ``blobs/<sha256>`` must have the bytes its name says; a blob whose bytes differ
   stops the run.

What this guarantees and what it does not (a byte changed without changing the file's ctime: a
disk fault, a raw write to the device) is in docs/pins.md. ``trust_cache=False`` (``run
--rehash``) skips 1 and reads every byte.

The cache file (``TLI_RECIPE_HASH_CACHE``, default ``~/.cache/tli-recipe/sha256.json``) is only
replaced when it is missing or is a regular file holding this tool's marker; anything else (a
user's notes, a link, a device) is left as it is, with one warning, and nothing is remembered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from tli_recipe.files import write_text_atomic
from tli_recipe.source.checkpoint import CheckpointError

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_ENTRY = re.compile(r"^([0-9a-f]{64}):([0-9a-f]{32})\Z")
_CHUNK = 8 * 2**20
CACHE_ENV = "TLI_RECIPE_HASH_CACHE"
#: written into the cache file: a file without it is not replaced
MARKER = "tli-recipe digest cache"
_VERSION = 2
#: entries kept (most recent last); a few thousand shards of many models
MAX_ENTRIES = 20_000
_MAX_CACHE_BYTES = 8 * 2**20
_SETTLED_NS = 2 * 10**9
_warned: set[str] = set()


def hub_blob_digest(path: Path) -> Optional[str]:
    """The sha256 a Hugging Face cache stores ``path`` under, if it is an LFS blob of a snapshot.

    ``<repo>/snapshots/<rev>/<name>`` links to ``<repo>/blobs/<sha256>`` for LFS files; other
    files (config.json) are stored under their git blob id (40 hex), which is not a sha256.
    """
    if not path.is_symlink():
        return None
    snapshot = next((p for p in path.parents if p.parent.name == "snapshots"), None)
    if snapshot is None:
        return None
    try:
        target = path.resolve(strict=True)
        repo = snapshot.parent.parent.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if target.parent != repo / "blobs" or not _HEX64.match(target.name) or not target.is_file():
        return None
    return target.name


def default_cache_file() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "tli-recipe" / "sha256.json"


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _read_own(path: Path, limit: int) -> Optional[bytes]:
    """The bytes of ``path`` if it is a regular file (not a link, FIFO or device) of at most ``limit``
    bytes; None when it does not exist. Raises ValueError saying why it is not one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise ValueError("is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("is not a regular file")
    if info.st_size > limit:
        raise ValueError(f"is larger than {limit // 2**20} MiB")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("is not a regular file")
        return f.read(limit + 1)


def _key(cache: Path) -> bytes:
    """The secret of this cache (``<cache>.key``): read, or made when missing (0600)."""
    path = cache.with_name(cache.name + ".key")
    data = _read_own(path, 4096)
    if data is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        data = _read_own(path, 4096) or b""
    text = data.decode("ascii", "replace").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"has a key file {path.name} that this tool did not write")
    return bytes.fromhex(text)


class HashCache:
    """Digests this tool computed, keyed by :func:`_identity`, each with a MAC of this cache's key. A
    damaged cache of ours starts empty; a file that is not ours is neither read nor replaced (one
    warning); saving is best effort and never raises."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self._dirty = False
        self._key = b""
        if path is None:
            return
        try:
            data = _read_own(path, _MAX_CACHE_BYTES)
            if data is not None and MARKER.encode() not in data and not _old_cache(data):
                raise ValueError(f"holds no '{MARKER}' marker (it is not a file this tool wrote)")
            self._key = _key(path)
        except ValueError as exc:
            self.path = None
            _warn(f"{CACHE_ENV}: {path} {exc}; left it as it is (no digest is remembered; point {CACHE_ENV} elsewhere)")
            return
        except OSError:  # unreadable, or no key can be made (a read-only home): nothing is remembered
            self.path = None
            return
        try:
            record = json.loads(data.decode("utf-8")) if data else None
        except (ValueError, RecursionError):  # damaged: ours, so replaced whole
            record = None
        if isinstance(record, dict) and record.get("version") == _VERSION and isinstance(record.get("entries"), dict):
            self.entries = {k: v for k, v in record["entries"].items() if isinstance(k, str) and isinstance(v, str)}

    def _mac(self, identity: str, digest: str) -> str:
        return hmac.new(self._key, f"{identity} {digest}".encode(), hashlib.sha256).hexdigest()[:32]

    def get(self, path: Path) -> Optional[str]:
        """The digest this tool recorded for ``path`` in its present state, or None."""
        try:
            identity = _identity(os.stat(path))
        except OSError:
            return None
        found = _ENTRY.match(self.entries.get(identity, ""))
        if found is None or not self._key or not hmac.compare_digest(found[2], self._mac(identity, found[1])):
            return None  # none, or not written by this tool with this cache's key
        return found[1]

    def put(self, st: os.stat_result, digest: str) -> None:
        if self.path is None:
            return
        key = _identity(st)
        self.entries.pop(key, None)
        self.entries[key] = f"{digest}:{self._mac(key, digest)}"
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        kept = dict(list(self.entries.items())[-MAX_ENTRIES:])
        try:
            data = _read_own(self.path, _MAX_CACHE_BYTES)  # still ours (or gone) right before it is replaced
            if data is not None and MARKER.encode() not in data and not _old_cache(data):
                return
            record = {"tool": MARKER, "version": _VERSION, "entries": kept}
            write_text_atomic(self.path, json.dumps(record), mode=0o600)
        except (OSError, ValueError):
            pass  # a read-only home or a full disk costs a rehash next time, nothing more


def _old_cache(data: bytes) -> bool:
    """A cache written by an earlier version (no marker): exactly {"version": 1, "entries": {...}}."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and set(record) == {"version", "entries"} and record["version"] == 1


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def remember(path: Path, digest: str) -> None:
    """Record ``digest`` for ``path`` (a blob this tool just downloaded and hashed as it landed)."""
    cache = HashCache(default_cache_file())
    try:
        cache.put(os.stat(path), digest)
    except OSError:
        return
    cache.save()


def sha256_file(path: Path, stop: Optional[threading.Event] = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} was stopped")
            digest.update(chunk)
    return digest.hexdigest()


class SourceHasher:
    """Digests of ``files``: known ones at once, the rest hashed in a background thread.

    ``start()`` returns immediately; ``result()`` waits and returns ``{path: sha256}`` (or raises
    what the thread raised); ``stop()`` ends the thread early (a failed run). ``hashed`` counts
    the bytes that were really read, ``hashed_files`` the files.
    """

    def __init__(self, files: list[Path], *, trust_cache: bool = True, cache: Optional[HashCache] = None) -> None:
        self.files = list(dict.fromkeys(files))
        self.trust_cache = trust_cache
        self.cache = cache if cache is not None else HashCache(default_cache_file() if trust_cache else None)
        self.digests: dict[Path, str] = {}
        self.hashed = 0
        self.hashed_files = 0
        self._todo: list[Path] = []
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "SourceHasher":
        for path in self.files:
            known = self.cache.get(path) if self.trust_cache else None
            if known:
                self.digests[path] = known
            else:
                self._todo.append(path)
        if self._todo:
            self._thread = threading.Thread(target=self._run, name="tli-recipe-sha256", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for path in self._todo:
                before = os.stat(path)
                digest = sha256_file(path, self._stop)
                self.hashed += before.st_size
                self.hashed_files += 1
                named = hub_blob_digest(path)
                if named is not None and named != digest:
                    raise CheckpointError(
                        f"{path}: its Hugging Face cache blob is named sha256 {named}, but its bytes have sha256 "
                        f"{digest}; the cache is damaged or was tampered with: delete {path.resolve()} and "
                        "download the model again"
                    )
                self.digests[path] = digest
                # Remember it only if unchanged while read and not "racy" (git's word): a file written
                # within the last seconds could change again inside one timestamp tick, unseen.
                settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > _SETTLED_NS
                if settled and _identity(os.stat(path)) == _identity(before):
                    self.cache.put(before, digest)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def result(self) -> dict[Path, str]:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self.trust_cache:
            self.cache.save()
        return dict(self.digests)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
