"""Source digests without a second read: hub blob names, the stat-keyed cache, the background thread."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import write_recipe

from tli_recipe.source import hashes
from tli_recipe.source.hashes import HashCache, SourceHasher, hub_blob_digest


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def settled(monkeypatch):
    """Files written by the test count as settled at once (the 2 s "racy" window is for real use)."""
    monkeypatch.setattr(hashes, "_SETTLED_NS", -1)


def hub_layout(tmp_path, files: dict[str, bytes], lfs=("model.safetensors",)):
    """A Hugging Face cache repo: blobs named by sha256 (LFS) or by a 40-hex git id, linked from a snapshot."""
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest() if name in lfs else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(repo / "blobs" / blob, snap))
    return repo, snap


def test_a_hub_blob_this_tool_did_not_hash_is_hashed_once_then_remembered(tmp_path, settled):
    """A blob's name is the hub's word, not this tool's: it is hashed (and checked against its name)
    the first time, then its digest is known from this tool's own cache entry."""
    repo, snap = hub_layout(tmp_path, {"model.safetensors": b"w" * 5000, "config.json": b"{}"})
    assert hub_blob_digest(snap / "model.safetensors") == hashlib.sha256(b"w" * 5000).hexdigest()
    assert hub_blob_digest(snap / "config.json") is None  # a git blob id, not a sha256
    files = [snap / "model.safetensors", snap / "config.json"]
    hasher = SourceHasher(files, cache=HashCache(tmp_path / "cache.json")).start()
    assert hasher.result() == {f: sha(f) for f in files}
    assert hasher.hashed == 5002
    again = SourceHasher(files, cache=HashCache(tmp_path / "cache.json")).start()
    assert again.result() == {f: sha(f) for f in files} and again.hashed == 0


def test_a_blob_whose_bytes_differ_from_its_name_stops_the_hashing(tmp_path):
    from tli_recipe.source.checkpoint import CheckpointError

    repo, snap = hub_layout(tmp_path, {"model.safetensors": b"w" * 5000})
    blob = (snap / "model.safetensors").resolve()
    blob.write_bytes(b"w" * 4999 + b"x")  # one byte flipped, the name kept
    with pytest.raises(CheckpointError, match=f"is named sha256 {blob.name}, but its bytes have sha256"):
        SourceHasher([snap / "model.safetensors"], cache=HashCache(None)).start().result()


def test_a_link_that_only_looks_like_a_blob_is_hashed(tmp_path):
    """A 64-hex file name outside its repo's blobs folder (or a plain file) proves nothing."""
    elsewhere = tmp_path / "other" / "blobs"
    elsewhere.mkdir(parents=True)
    fake = elsewhere / ("0" * 64)
    fake.write_bytes(b"not what the name says")
    snap = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(fake)
    assert hub_blob_digest(snap / "model.safetensors") is None
    plain = tmp_path / ("0" * 64)
    plain.write_bytes(b"x")
    assert hub_blob_digest(plain) is None
    hasher = SourceHasher([snap / "model.safetensors"], cache=HashCache(None)).start()
    assert hasher.result()[snap / "model.safetensors"] == sha(fake)


def test_a_rerun_hashes_nothing_and_a_changed_file_is_hashed_again(tmp_path, settled):
    cache_file = tmp_path / "cache" / "sha256.json"
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 3000)
    first = SourceHasher([a, b], cache=HashCache(cache_file)).start()
    assert first.result() == {a: sha(a), b: sha(b)} and first.hashed == 4000
    again = SourceHasher([a, b], cache=HashCache(cache_file)).start()
    assert again.result() == {a: sha(a), b: sha(b)} and again.hashed == 0
    b.write_bytes(b"c" * 3000)  # same size, new content: the file's ctime/mtime change its key
    third = SourceHasher([a, b], cache=HashCache(cache_file)).start()
    assert third.result() == {a: sha(a), b: sha(b)} and third.hashed == 3000
    rehash = SourceHasher([a, b], trust_cache=False).start()
    assert rehash.result() == {a: sha(a), b: sha(b)} and rehash.hashed == 4000


def test_a_file_written_just_now_is_not_remembered(tmp_path):
    """Git's "racy" rule: a change inside one timestamp tick would keep the key, so recent files are not cached."""
    cache_file = tmp_path / "sha256.json"
    a = tmp_path / "a.bin"
    a.write_bytes(b"a" * 100)
    SourceHasher([a], cache=HashCache(cache_file)).start().result()
    again = SourceHasher([a], cache=HashCache(cache_file)).start()
    again.result()
    assert again.hashed == 100


@pytest.mark.parametrize(
    "content",
    [b'{"tool": "tli-recipe digest cache", "version": 2, "entries": [', b'{"version": 1, "entries": {"k": "not-hex"}}'],
)
def test_a_damaged_cache_of_ours_is_ignored_and_replaced(tmp_path, content, settled):
    cache_file = tmp_path / "sha256.json"
    cache_file.write_bytes(content)
    a = tmp_path / "a.bin"
    a.write_bytes(b"a" * 10)
    hasher = SourceHasher([a], cache=HashCache(cache_file)).start()
    assert hasher.result() == {a: sha(a)} and hasher.hashed == 10
    record = json.loads(cache_file.read_text())  # rewritten whole, with the marker
    assert record["version"] == 2 and record["tool"] == "tli-recipe digest cache" and len(record["entries"]) == 1


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[]", b'{"version": 2, "entries": {}}', b"my thesis notes\n"])
def test_a_foreign_file_at_the_cache_path_is_neither_read_nor_replaced(tmp_path, content, settled, capsys):
    cache_file = tmp_path / "notes.txt"
    cache_file.write_bytes(content)
    a = tmp_path / "a.bin"
    a.write_bytes(b"a" * 10)
    hasher = SourceHasher([a], cache=HashCache(cache_file)).start()
    assert hasher.result() == {a: sha(a)}
    assert cache_file.read_bytes() == content and not (tmp_path / "notes.txt.key").exists()
    assert "it is not a file this tool wrote); left it as it is" in capsys.readouterr().err


def test_an_unwritable_cache_costs_a_rehash_not_the_run(tmp_path, settled):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    a = tmp_path / "a.bin"
    a.write_bytes(b"a" * 10)
    assert SourceHasher([a], cache=HashCache(blocked / "sha256.json")).start().result() == {a: sha(a)}


def test_run_twice_hashes_the_sources_once_and_records_the_same_digests(tmp_path, tiny, cli, settled, monkeypatch):
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(tmp_path / "own-cache.json"))  # no digest from other tests
    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\n")
    first = cli("run", recipe, "--output", tmp_path / "one", "--no-progress")
    assert first.exit_code == 0, first.stderr
    second = cli("run", recipe, "--output", tmp_path / "two", "--no-progress")
    assert second.exit_code == 0, second.stderr
    files = len(json.loads((tmp_path / "one" / "plan.json").read_text())["source_files"][str(base)])
    assert f"hashed {files} of {files} source files" in first.stderr
    assert f"hashed 0 of {files} source files" in second.stderr
    one, two = (json.loads((tmp_path / d / "plan.json").read_text())["source_files"] for d in ("one", "two"))
    assert one == two == {str(base): {n: sha(base / n) for n in one[str(base)]}}
    forced = cli("run", recipe, "--output", tmp_path / "three", "--no-progress", "--rehash")
    assert forced.exit_code == 0 and f"hashed {files} of {files} source files" in forced.stderr
    assert json.loads((tmp_path / "three" / "plan.json").read_text())["source_files"] == one


def test_a_pin_mismatch_found_while_writing_leaves_no_output(tmp_path, tiny, cli):
    base = tiny(layers=4)
    recipe = write_recipe(
        tmp_path,
        f'base_model:\n  path: {base}\n  checksums:\n    model.safetensors: "{"0" * 64}"\ninject: {{every: 2}}\n',
    )
    result = cli("run", recipe, "--output", tmp_path / "out", "--no-progress")
    assert result.exit_code == 2 and "the recipe expects 0000" in result.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
