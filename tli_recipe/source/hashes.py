"""sha256 of source files without a second read before the first write.

``run`` records the sha256 of every source file it depends on and checks the recipe's pins.
Reading every source byte for that before writing doubled the work of a copy-speed run, so
digests come from, in order:

1. the Hugging Face cache: a file of a snapshot is a link to ``blobs/<sha256>`` when it is
   stored with Git LFS (every safetensors shard), so its name is its digest;
2. a small cache of earlier digests keyed by the file's identity and state (device, inode,
   size, mtime and ctime in ns): a rerun on the same files hashes nothing;
3. hashing, in a background thread that runs while the executor writes (hashlib releases the
   GIL), so the two overlap on a multi-core machine.

The caller checks the digests (pins) before the output becomes visible. ``trust_cache=False``
(``run --rehash``) skips 1 and 2 and reads every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Optional

from tli_recipe.files import write_text_atomic

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 * 2**20
CACHE_ENV = "TLI_RECIPE_HASH_CACHE"
#: entries kept (most recent last); a few thousand shards of many models
MAX_ENTRIES = 20_000
_MAX_CACHE_BYTES = 8 * 2**20
_SETTLED_NS = 2 * 10**9


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


class HashCache:
    """Digests of files seen before, keyed by :func:`_identity`. A damaged or foreign cache file is
    ignored (starts empty); saving is best effort and never raises."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self._dirty = False
        if path is None:
            return
        try:
            if path.is_file() and path.stat().st_size <= _MAX_CACHE_BYTES:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("entries"), dict):
                    self.entries = {
                        k: v
                        for k, v in data["entries"].items()
                        if isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
                    }
        except (OSError, ValueError, RecursionError):  # damaged, foreign, or nested to blow the stack
            self.entries = {}

    def get(self, path: Path) -> Optional[str]:
        try:
            return self.entries.get(_identity(os.stat(path)))
        except OSError:
            return None

    def put(self, st: os.stat_result, digest: str) -> None:
        key = _identity(st)
        self.entries.pop(key, None)
        self.entries[key] = digest
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        kept = dict(list(self.entries.items())[-MAX_ENTRIES:])
        try:
            write_text_atomic(self.path, json.dumps({"version": 1, "entries": kept}), mode=0o600)
        except OSError:
            pass  # a read-only home or a full disk costs a rehash next time, nothing more


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
            known = (hub_blob_digest(path) or self.cache.get(path)) if self.trust_cache else None
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
