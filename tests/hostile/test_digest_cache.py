"""The local caches a pin leans on, attacked: a flipped byte in a cached hub blob that keeps its
sha256 name, a digest cache with entries this tool did not write (poisoned), and
TLI_RECIPE_HASH_CACHE pointed at something that is not a digest cache (misdirected).

The broken implementations these catch: a blob's name taken as its digest (the flipped byte
passes its pin and `verify`); cache entries accepted whoever wrote them; a user's notes, a link's
target or a FIFO replaced by a JSON file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from fake_hub import FakeHub, serve

from tli_recipe.source import hashes

C1 = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def settled(monkeypatch):
    monkeypatch.setattr(hashes, "_SETTLED_NS", -1)  # files written by the test count as settled at once


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def pinned(base, digest: str) -> str:
    return f'base_model:\n  path: {base}\n  checksums:\n    model.safetensors: "{digest}"\ninject: {{every: 2}}\n'


@pytest.mark.slow
def test_a_flipped_byte_in_a_cached_blob_is_caught_without_rehash(tmp_path, tiny, hostile_cli, refused, monkeypatch):
    import huggingface_hub.constants as constants

    hub = FakeHub()
    server = serve(hub)
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(tmp_path / "digests.json"))
        folder = tiny(layers=4)
        true = sha((folder / "model.safetensors").read_bytes())
        hub.add("org/tiny", folder, C1)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(pinned("org/tiny", true))
        first = hostile_cli("run", recipe, "-o", tmp_path / "one", "--no-progress")
        assert first.exit_code == 0, first.stderr
        blob = tmp_path / "hf" / "hub" / "models--org--tiny" / "blobs" / true
        flip_last_byte(blob)  # the name stays the true sha256
        again = hostile_cli("run", recipe, "-o", tmp_path / "two", "--no-progress", "--offline")
        refused(again, f"{true}", target=tmp_path / "two")
        assert not (tmp_path / "two").exists()
        recipe.write_text("base_model: org/tiny\ninject: {every: 2}\n")  # unpinned: the blob's own name is checked
        unpinned = hostile_cli("run", recipe, "-o", tmp_path / "three", "--no-progress", "--offline")
        refused(unpinned, f"is named sha256 {true}, but its bytes have sha256", target=tmp_path / "three")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("form", ["old", "forged"])
def test_a_poisoned_digest_cache_entry_is_not_trusted(tmp_path, tiny, hostile_cli, refused, monkeypatch, settled, form):
    cache = tmp_path / "digests.json"
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(cache))
    base = tmp_path / "base"
    shutil.copytree(tiny(layers=4), base)
    true = sha((base / "model.safetensors").read_bytes())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(pinned(base, true))
    assert hostile_cli("run", recipe, "-o", tmp_path / "one", "--no-progress").exit_code == 0
    flip_last_byte(base / "model.safetensors")
    st = os.stat(base / "model.safetensors")
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    if form == "old":  # the earlier format: identity -> digest, no MAC
        cache.write_text(json.dumps({"version": 1, "entries": {identity: true}}))
    else:  # this format, but a MAC made without this cache's key
        record = json.loads(cache.read_text())
        record["entries"][identity] = f"{true}:{'0' * 32}"
        cache.write_text(json.dumps(record))
    result = hostile_cli("run", recipe, "-o", tmp_path / "two", "--no-progress")
    refused(result, f"the recipe expects {true}", target=tmp_path / "two")


@pytest.mark.parametrize("kind", ["notes", "link", "fifo", "folder"])
def test_a_misdirected_hash_cache_is_left_as_it_is(tmp_path, tiny, hostile_cli, monkeypatch, settled, kind):
    target = tmp_path / "notes.txt"
    target.write_text("my thesis notes\n")
    place = tmp_path / "cache-path"
    if kind == "notes":
        place = target
    elif kind == "link":
        place.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(place)
    else:
        place.mkdir()
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(place))
    base = tiny(layers=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {base}\ninject: {{every: 2}}\n")
    hashes._warned.clear()
    result = hostile_cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert target.read_text() == "my thesis notes\n"
    assert {"notes": target.is_file, "link": place.is_symlink, "fifo": lambda: place.is_fifo(), "folder": place.is_dir}[
        kind
    ]()
    lines = [line for line in result.stderr.splitlines() if "TLI_RECIPE_HASH_CACHE" in line]
    assert len(lines) == 1 and "left it as it is" in lines[0], result.stderr
    assert not list(tmp_path.glob("*.key")) and not list(tmp_path.glob(".notes.txt.*"))
