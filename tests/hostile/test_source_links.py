"""One link rule for every file read from a source (config.json, the index, the weights, side
files, the snapshot folder itself), the same in `plan`, `run`, `pin` and `verify`: a file resolves
inside its folder, or in a Hugging Face cache snapshot into its own repo's blobs/.

The broken implementations these catch: a snapshot's config.json (or the whole snapshot folder)
linking outside the cache, whose secret field was copied into the output's config.json and
plan.json; weights linking into another repo's blobs/ or outside the cache accepted by `run`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "LINK-SECRET-5b1e-do-not-publish"
RECIPE = "base_model: org/tiny\ninject: {every: 2}\n"


@pytest.fixture
def repo(tmp_path, tiny, monkeypatch):
    """org/tiny in a hub cache laid out as huggingface_hub lays it out: snapshot links into blobs/."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for path in sorted(tiny(layers=4).iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / path.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def secret_config(tmp_path, tiny) -> os.PathLike:
    config = json.loads((tiny(layers=4) / "config.json").read_text())
    config["secret_field"] = SECRET
    path = tmp_path / "elsewhere" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def relink(link, target) -> None:
    link.unlink()
    link.symlink_to(target)


def commands(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return {
        "plan": ["plan", recipe],
        "run": ["run", recipe, "-o", tmp_path / "out", "--no-progress"],
        "pin": ["pin", "org/tiny", "--offline"],
    }


def check_refused(result, refused, tmp_path, what: str) -> None:
    refused(result, what, target=tmp_path / "out", secrets=[SECRET.encode()])
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["plan", "run", "pin"])
@pytest.mark.parametrize("case", ["config-outside", "snapshot-folder", "weights-other-repo", "weights-outside"])
def test_a_snapshot_file_linking_out_of_its_repo_is_refused(
    tmp_path, tiny, repo, hostile_cli, refused, snapshot, command, case
):
    snap = repo / "snapshots" / COMMIT
    if case == "config-outside":
        relink(snap / "config.json", secret_config(tmp_path, tiny))
    elif case == "snapshot-folder":  # the whole snapshot is a link to a folder outside the cache
        outside = tmp_path / "outside-snapshot"
        shutil.copytree(tiny(layers=4), outside)
        (outside / "config.json").write_text(secret_config(tmp_path, tiny).read_text())
        shutil.rmtree(snap)
        snap.symlink_to(outside, target_is_directory=True)
    else:
        weights = (tiny(layers=4) / "model.safetensors").read_bytes()
        if case == "weights-other-repo":
            other = tmp_path / "hub" / "models--org--other" / "blobs"
            other.mkdir(parents=True)
            target = other / hashlib.sha256(weights).hexdigest()
        else:
            target = tmp_path / "weights.safetensors"
        target.write_bytes(weights)
        relink(snap / "model.safetensors", target)
    inputs = snapshot(tmp_path / "hub")
    result = hostile_cli(*commands(tmp_path)[command])
    what = "a link leaving its repo" if case == "snapshot-folder" else "is a link leaving its Hugging Face cache repo"
    check_refused(result, refused, tmp_path, what)
    inputs.unchanged()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_local_folder_file_linking_out_of_the_folder_is_refused(tmp_path, tiny, hostile_cli, refused, name):
    base = tmp_path / "base"
    shutil.copytree(tiny(layers=4), base)
    target = secret_config(tmp_path, tiny) if name == "config.json" else tmp_path / "weights.safetensors"
    if name != "config.json":
        shutil.copy(base / name, target)
    relink(base / name, target)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {base}\ninject: {{every: 2}}\n")
    for args in (["plan", recipe], ["run", recipe, "-o", tmp_path / "out", "--no-progress"], ["pin", base]):
        check_refused(hostile_cli(*args), refused, tmp_path, f"{name}: is a link leaving the model folder")


def test_verify_applies_the_same_rule_to_the_base_it_compares_with(tmp_path, tiny, hostile_cli, refused):
    base = tmp_path / "base"
    shutil.copytree(tiny(layers=4), base)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {base}\ninject: {{every: 2}}\n")
    assert hostile_cli("run", recipe, "-o", tmp_path / "grown", "--no-progress").exit_code == 0
    shutil.move(base / "model.safetensors", tmp_path / "moved.safetensors")
    (base / "model.safetensors").symlink_to(tmp_path / "moved.safetensors")
    result = hostile_cli("verify", tmp_path / "grown")
    refused(result, "model.safetensors: is a link leaving the model folder")


def test_links_inside_the_folder_and_into_the_own_blobs_are_fine(tmp_path, tiny, repo, hostile_cli):
    assert hostile_cli("plan", commands(tmp_path)["plan"][1]).exit_code == 0
    base = tmp_path / "base"
    shutil.copytree(tiny(layers=4), base)
    (base / "weights").mkdir()
    shutil.move(base / "model.safetensors", base / "weights" / "model.safetensors")
    (base / "model.safetensors").symlink_to(os.path.join("weights", "model.safetensors"))
    recipe = tmp_path / "local.yaml"
    recipe.write_text(f"base_model: {base}\ninject: {{every: 2}}\n")
    result = hostile_cli("plan", recipe)
    assert result.exit_code == 0, result.stderr
