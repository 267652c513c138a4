"""A malicious or broken hub (tests/fake_hub.py on 127.0.0.1): what it says that becomes a path is
checked before any download, the bytes that arrive are hashed as they land and compared with its
claim and the recipe's pin, every request has a timeout, and each failure says what happened.

The broken implementations these catch: snapshot_download storing a file as blobs/<ETag or LFS
oid> unchecked (a write outside the cache); a blob kept under the sha256 the hub claims whatever
its bytes; a pinned run accepting bytes that differ from the pin; a model-info request or a
transfer waited on forever; a JSONDecodeError traceback; an HTTP 500 or a redirect to file://
reported as a missing file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fake_hub import FakeHub, serve

C1 = "0123456789abcdef0123456789abcdef01234567"
RECIPE = "base_model: org/tiny\ninject: {every: 2}\n"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    fake = FakeHub()
    server = serve(fake)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TLI_RECIPE_HUB_TIMEOUT", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home" / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(tmp_path / "home" / "sha256.json"))
    yield fake
    server.shutdown()
    server.server_close()


def repo_folder(tmp_path) -> Path:
    return tmp_path / "home" / "hf" / "hub" / "models--org--tiny"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zeroed(data: bytes) -> bytes:
    length = 8 + int.from_bytes(data[:8], "little")
    return data[:length] + bytes(len(data) - length)


def outside(tmp_path) -> list[str]:
    """Files the run left outside the cache and the home folder (the output, the recipe aside)."""
    home = tmp_path / "home"
    return sorted(
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if not p.is_dir() and not p.is_relative_to(home) and p.name != "recipe.yaml"
    )


def blob_names(tmp_path) -> list[str]:
    blobs = repo_folder(tmp_path) / "blobs"
    return sorted(p.name for p in blobs.iterdir()) if blobs.is_dir() else []


@pytest.mark.parametrize("field", ["claim", "etag"])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_traversal_in_an_lfs_oid_or_etag_writes_nothing_anywhere(
    tmp_path, hub, tiny, hostile_cli, refused, command, field
):
    hub.add("org/tiny", tiny(layers=4), C1)
    name = "model.safetensors" if field == "claim" else "config.json"
    getattr(hub, field)[name] = "../../../../../lfs-escaped"
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    args = [command, tmp_path / "recipe.yaml"] + (["-o", tmp_path / "out", "--no-progress"] if command == "run" else [])
    result = hostile_cli(*args)
    refused(result, "'../../../../../lfs-escaped'", target=tmp_path / "out")
    assert "nothing was downloaded" in result.stderr
    assert outside(tmp_path) == [] and not list(tmp_path.parent.rglob("lfs-escaped*"))
    assert not [p for p in (tmp_path / "home").rglob("*") if "lfs-escaped" in p.name or p.suffix == ".lock"]
    if field == "claim":  # the model info is checked before any file is asked for
        assert hub.file_requests() == []


@pytest.mark.slow
def test_bytes_zeroed_under_the_true_etag_are_refused_and_not_kept(tmp_path, hub, tiny, hostile_cli, refused):
    folder = tiny(layers=4)
    true = sha((folder / "model.safetensors").read_bytes())
    hub.add("org/tiny", folder, C1)
    hub.zero.add("model.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base_model:\n  path: org/tiny\n  checksums:\n    model.safetensors: {true}\ninject: {{every: 2}}\n"
    )
    result = hostile_cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    arrived = sha(zeroed((folder / "model.safetensors").read_bytes()))
    refused(result, f"have sha256 {arrived}, the hub lists {true}", target=tmp_path / "out")
    assert "model.safetensors" in result.stderr and not (tmp_path / "out").exists()
    assert true not in blob_names(tmp_path) and arrived not in blob_names(tmp_path)
    assert not [n for n in blob_names(tmp_path) if n.endswith(".incomplete")]
    assert not (repo_folder(tmp_path) / "snapshots" / C1 / "model.safetensors").exists()


@pytest.mark.slow
def test_a_hub_that_lies_consistently_is_caught_by_the_pin(tmp_path, hub, tiny, hostile_cli, refused):
    """The hub lists (model info, tree, ETag) the sha256 of the zeroed bytes it sends: its own claim
    holds, the recipe's pin does not."""
    folder = tiny(layers=4)
    data = (folder / "model.safetensors").read_bytes()
    true, lie = sha(data), sha(zeroed(data))
    hub.add("org/tiny", folder, C1)
    hub.zero.add("model.safetensors")
    hub.claim["model.safetensors"] = lie
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base_model:\n  path: org/tiny\n  checksums:\n    model.safetensors: {true}\ninject: {{every: 2}}\n"
    )
    result = hostile_cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    refused(result, f"have sha256 {lie}, the recipe pins {true}", target=tmp_path / "out")
    assert lie not in blob_names(tmp_path) and true not in blob_names(tmp_path)
    # unpinned, the same hub's bytes match its own claim: they are kept under their true digest
    recipe.write_text(RECIPE)
    assert hostile_cli("plan", recipe).exit_code == 0


def test_a_hub_that_sends_other_bytes_than_it_lists_is_refused_without_a_pin(tmp_path, hub, tiny, hostile_cli, refused):
    folder = tiny(layers=4)
    hub.add("org/tiny", folder, C1)
    hub.claim["model.safetensors"] = "ab" * 32
    hub.etag["model.safetensors"] = "ab" * 32
    config = hashlib.sha1(b"blob %d\0" % len((folder / "config.json").read_bytes())).hexdigest()
    hub.etag["config.json"] = "cd" * 20  # the model info lists the true git blob id, the ETag another
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("run", tmp_path / "recipe.yaml", "-o", tmp_path / "out", "--no-progress")
    refused(result, f"the hub's ETag {'cd' * 20} differs from the digest its model info lists", target=tmp_path / "out")
    del hub.etag["config.json"]
    result = hostile_cli("run", tmp_path / "recipe.yaml", "-o", tmp_path / "out", "--no-progress")
    refused(result, f"the hub lists {'ab' * 32}", target=tmp_path / "out")
    assert "ab" * 32 not in blob_names(tmp_path) and config not in {"cd" * 20}


def test_a_pinned_config_is_checked_as_it_lands(tmp_path, hub, tiny, hostile_cli, refused):
    hub.add("org/tiny", tiny(layers=4), C1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f'base_model:\n  path: org/tiny\n  checksums:\n    config.json: "{"0" * 64}"\ninject: {{every: 2}}\n'
    )
    result = hostile_cli("plan", recipe)
    refused(result, f"the recipe pins {'0' * 64}; nothing was kept")
    assert result.stderr.startswith(f"{recipe}:2:3: base_model: ")  # located at the model it pins
    assert not (repo_folder(tmp_path) / "snapshots" / C1 / "config.json").exists()


@pytest.mark.parametrize("stall", ["info", "transfer"])
def test_a_hub_that_stops_answering_is_given_up_on_naming_the_endpoint(
    tmp_path, hub, tiny, hostile_cli, refused, monkeypatch, stall
):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.stall = (stall, 6.0)
    monkeypatch.setenv("TLI_RECIPE_HUB_TIMEOUT", "0.5")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("plan", tmp_path / "recipe.yaml")
    where = "/api/models/org/tiny/revision/main" if stall == "info" else "/org/tiny/resolve/"
    refused(result, f"no answer from {hub.url}{where}")
    assert "within 0.5 s" in result.stderr and "TLI_RECIPE_HUB_TIMEOUT" in result.stderr


def test_a_timeout_setting_that_is_no_number_is_one_line(tmp_path, hub, tiny, hostile_cli, refused, monkeypatch):
    hub.add("org/tiny", tiny(layers=4), C1)
    monkeypatch.setenv("TLI_RECIPE_HUB_TIMEOUT", "soon")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    refused(hostile_cli("plan", tmp_path / "recipe.yaml"), "TLI_RECIPE_HUB_TIMEOUT=soon: not a number of seconds")


@pytest.mark.parametrize(
    "body", [b"<html>502 Bad Gateway</html>", b'{"sha": ', json.dumps([1, 2]).encode(), b"[" * 100_000]
)
def test_a_model_info_that_is_not_json_says_so(tmp_path, hub, tiny, hostile_cli, refused, body):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.info_body = body
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("plan", tmp_path / "recipe.yaml")
    refused(result, "the model info is not JSON" if body[:1] != b"[" or body[1:2] != b"1" else "gave no valid commit")
    assert "<html>" not in result.stderr


def test_a_server_error_on_a_shard_is_not_a_missing_file(tmp_path, hub, tiny, hostile_cli, refused):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.status["model.safetensors"] = 500
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("run", tmp_path / "recipe.yaml", "-o", tmp_path / "out", "--no-progress")
    refused(result, "answered HTTP 500 (a server error) while downloading org/tiny@", target=tmp_path / "out")
    assert "missing" not in result.stderr


@pytest.mark.parametrize("where", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
def test_a_redirect_to_another_scheme_is_not_followed(tmp_path, hub, tiny, hostile_cli, refused, where):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.redirect["config.json"] = where
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("plan", tmp_path / "recipe.yaml")
    refused(result, "only http and https are followed")
    assert "missing" not in result.stderr and "root:" not in result.stderr


def test_a_hub_that_sends_more_bytes_than_it_lists_is_cut_off(tmp_path, hub, tiny, hostile_cli, refused):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.pad["model.safetensors"] = 9 * 2**20  # an endless body would fill the disk: it stops at the listed size
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("run", tmp_path / "recipe.yaml", "-o", tmp_path / "out", "--no-progress")
    refused(result, "the hub sent more than the", target=tmp_path / "out")
    assert not [n for n in blob_names(tmp_path) if n.endswith(".incomplete")]
    assert not (repo_folder(tmp_path) / "snapshots" / C1 / "model.safetensors").exists()


def test_a_cache_folder_that_is_a_link_is_not_downloaded_into(tmp_path, hub, tiny, hostile_cli, refused):
    hub.add("org/tiny", tiny(layers=4), C1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    repo_folder(tmp_path).mkdir(parents=True)
    (repo_folder(tmp_path) / "blobs").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = hostile_cli("plan", tmp_path / "recipe.yaml")
    refused(result, "blobs: is a link in the Hugging Face cache")
    assert list(elsewhere.iterdir()) == []
