"""A local Hugging Face hub for the tests: the endpoints huggingface_hub calls, served by http.server.

- ``GET /api/models/{repo}/revision/{rev}``: model info (id, sha, siblings; with ``?blobs=true`` their
  sizes, git blob ids and LFS sha256);
- ``GET /api/models/{repo}/tree/{rev}``: the file listing snapshot_download reads (oid, size, lfs);
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: the file, with ETag, X-Repo-Commit, Content-Length
  (and ranges: ``Range: bytes=a-b`` gets 206 with Content-Range), as the hub answers.
Errors carry the X-Error-Code huggingface_hub maps to its exceptions (RepoNotFound, GatedRepo,
RevisionNotFound, EntryNotFound). Every request is logged.

Hostile modes (a compromised or broken hub), each keyed by file name where it concerns a file:
``claim`` lists another LFS sha256 (model info, tree and ETag agree on the lie), ``etag`` sends
another ETag only, ``zero`` serves the data bytes zeroed under the true ETag and sha256, ``pad``
sends that many bytes more than the file has, ``status`` answers a file with that HTTP status,
``redirect`` answers a file with a redirect to that address, ``info_body`` replaces the model
info's body, ``stall`` makes the model info (``"info"``) or every file transfer (``"transfer"``,
after half the body) wait that many seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, dict[str, bytes]]  # commit -> name -> bytes
    refs: dict[str, str]  # branch -> commit
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, range)
    cut: bool = False  # send half of each .safetensors body, then close the connection
    url: str = ""
    claim: dict[str, str] = field(default_factory=dict)
    etag: dict[str, str] = field(default_factory=dict)
    zero: set[str] = field(default_factory=set)
    status: dict[str, int] = field(default_factory=dict)
    redirect: dict[str, str] = field(default_factory=dict)
    info_body: bytes | None = None
    pad: dict[str, int] = field(default_factory=dict)
    stall: tuple[str, float] | None = None

    def add(self, repo: str, folder: Path, commit: str, branch: str = "main") -> None:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        entry = self.repos.setdefault(repo, Repo({}, {}))
        entry.files[commit] = files
        entry.refs[branch] = commit

    def file_requests(self) -> list[tuple[str, str, str]]:
        return [r for r in self.log if "/resolve/" in r[1]]


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs(name: str, data: bytes) -> dict:
    """The model info's LFS record of a file (safetensors files are stored in LFS here)."""
    if not name.endswith(".safetensors"):
        return {}
    return {"lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}


def _claimed(hub: "FakeHub", name: str, data: bytes) -> dict:
    """The LFS record the hub lists: the true one, or its ``claim``."""
    record = _lfs(name, data)
    if record and name in hub.claim:
        record = {"lfs": {**record["lfs"], "sha256": hub.claim[name]}}
    return record


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _repo(self, repo: str, rev: str):
            entry = hub.repos.get(repo)
            if entry is None:
                return self._error(401, "RepoNotFound")  # the hub answers 401 for a missing (or private) repo
            if entry.gated and not self.headers.get("authorization"):
                return self._error(401, "GatedRepo")
            if entry.gated:
                return self._error(403, "GatedRepo")
            commit = entry.refs.get(rev, rev)
            if commit not in entry.files:
                return self._error(404, "RevisionNotFound")
            return commit, entry.files[commit]

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.log.append((self.command, path, self.headers.get("range", "")))
            api = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)$", path)
            resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if api and api[2] == "revision" and hub.stall and hub.stall[0] == "info":
                time.sleep(hub.stall[1])
            if api and api[2] == "revision" and hub.info_body is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(hub.info_body)))
                self.end_headers()
                return self.wfile.write(hub.info_body)
            if api:
                found = self._repo(api[1], api[3])
                if found is None:
                    return
                commit, files = found
                if api[2] == "revision":  # with ?blobs=true: sizes, git blob ids and LFS sha256 (files_metadata)
                    blobs = re.search(r"(^|&)blobs=(true|True|1)($|&)", url.query) is not None
                    return self._json(
                        {
                            "id": api[1],
                            "sha": commit,
                            "siblings": [
                                {
                                    "rfilename": n,
                                    **({"blobId": _oid(b), "size": len(b), **_claimed(hub, n, b)} if blobs else {}),
                                }
                                for n, b in files.items()
                            ],
                        }
                    )
                return self._json(
                    [
                        {
                            "type": "file",
                            "path": n,
                            "size": len(b),
                            "oid": _oid(b),
                            **(
                                {
                                    "lfs": {
                                        "oid": _claimed(hub, n, b)["lfs"]["sha256"],
                                        "size": len(b),
                                        "pointerSize": 134,
                                    }
                                }
                                if n.endswith(".safetensors")
                                else {}
                            ),
                        }
                        for n, b in files.items()
                    ]
                )
            if resolve:
                found = self._repo(resolve[1], resolve[2])
                if found is None:
                    return
                commit, files = found
                if resolve[3] not in files:
                    return self._error(404, "EntryNotFound")
                return self._file(commit, resolve[3], files[resolve[3]])
            self._error(404, "NotFound")

        def _file(self, commit: str, name: str, data: bytes) -> None:
            if name in hub.status:
                return self._error(hub.status[name], "")
            if name in hub.redirect:
                self.send_response(302)
                self.send_header("Location", hub.redirect[name])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            record = _claimed(hub, name, data)
            lfs = bool(record)
            etag = hub.etag.get(name) or (record["lfs"]["sha256"] if lfs else _oid(data))
            if name in hub.zero:  # the data bytes (after the safetensors header) zeroed, same length
                length = 8 + int.from_bytes(data[:8], "little")
                data = data[:length] + bytes(len(data) - length)
            data += b"\0" * hub.pad.get(name, 0)
            start, end = 0, len(data) - 1
            ranged = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("range", ""))
            if ranged:
                start = int(ranged[1])
                end = min(int(ranged[2]) if ranged[2] else len(data) - 1, len(data) - 1)
            self.send_response(206 if ranged else 200)
            self.send_header("ETag", '"%s"' % etag)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            body = data[start : end + 1]
            if hub.cut and lfs and not ranged or hub.cut and lfs and start > 0:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if hub.stall and hub.stall[0] == "transfer" and not ranged:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(hub.stall[1])
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up early (a refused answer, a timeout) is normal here: no traceback on
        stderr, where it would land in whichever test's captured output runs next."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def serve(hub: FakeHub):
    """Start ``hub`` on a free local port; returns the server (call .shutdown())."""
    server = _Server(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server
