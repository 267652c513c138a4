"""Nothing read from outside the inputs reaches any output: the `.git/HEAD` leak and its kin.

A model directory someone shared may carry a ``.git`` whose HEAD says
``ref: /home/u/.ssh/id_ed25519``, a ref file that is a symlink to a secret, download
metadata or a hub ``refs/main`` that hold a secret. tli-recipe must take a revision only
as 40 or 64 hex characters read from a small regular file inside the model directory,
ignore everything else with a warning, and echo nothing of it: not on stdout/stderr of
``plan --json``, ``pin``, ``run`` and ``verify``, not in any file of the output.

Two secrets sit outside the model folder: a text one, and one that *looks* like a commit
(40 hex characters), which only a containment check (not a format check) keeps out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import write_recipe

TEXT_SECRET = "LEAK-MARKER-7f3a9c-do-not-publish"
HEX_SECRET = "5ec2e7" * 6 + "abcd"  # 40 lowercase hex characters: a valid-looking commit
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRETS = [TEXT_SECRET.encode(), HEX_SECRET.encode()]


def plant(tmp_path: Path, tiny, how: str) -> Path:
    """A copy of a tiny model whose revision files point at the secrets outside it in one way."""
    (tmp_path / "secret").write_text(f"{TEXT_SECRET}\n")
    (tmp_path / "secret-hex").write_text(f"{HEX_SECRET}\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "HEAD").write_text(f"{HEX_SECRET}\n")
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny(layers=4), model)
    git = model / ".git"
    if how == "git-link":  # .git itself leaves the model directory
        git.symlink_to(tmp_path / "outside", target_is_directory=True)
        return model
    if how.startswith("metadata"):
        meta = model / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True)
        if how == "metadata-link":
            (meta / "config.json.metadata").symlink_to(tmp_path / "secret-hex")
        else:
            (meta / "config.json.metadata").write_text(f'{TEXT_SECRET}\n"etag"\n1700000000.0\n')
        return model
    (git / "refs" / "heads").mkdir(parents=True)
    head = {
        "absolute": f"ref: {tmp_path / 'secret-hex'}\n",
        "absolute-text": f"ref: {tmp_path / 'secret'}\n",
        "dotdot": "ref: ../../../secret-hex\n",
        "refs-dotdot": "ref: refs/heads/../../../../../secret-hex\n",
        "head-is-secret": f"{TEXT_SECRET}\n",
    }.get(how, "ref: refs/heads/main\n")
    if how == "head-link":
        (git / "HEAD").symlink_to(tmp_path / "secret-hex")
    elif how == "head-fifo":
        os.mkfifo(git / "HEAD")
    elif how == "head-huge":
        (git / "HEAD").write_text(f"{COMMIT}\n" + TEXT_SECRET * 200_000)
    else:
        (git / "HEAD").write_text(head)
    ref = git / "refs" / "heads" / "main"
    if how == "ref-link":
        ref.symlink_to(tmp_path / "secret-hex")
    elif how == "ref-content":
        ref.write_text(f"{TEXT_SECRET}\n")
    elif how == "packed-junk":
        (git / "packed-refs").write_text(
            f"# pack-refs with: peeled\n{TEXT_SECRET} refs/heads/main\n^{HEX_SECRET}\njunk\n"
        )
    return model


HOW = [
    "absolute",
    "absolute-text",
    "dotdot",
    "refs-dotdot",
    "head-is-secret",
    "head-link",
    "head-fifo",
    "head-huge",
    "ref-link",
    "ref-content",
    "packed-junk",
    "git-link",
    "metadata-link",
    "metadata-text",
]


def assert_clean(result, *folders: Path) -> None:
    """Exit 0, no traceback, a warning that the revision file was ignored, no secret anywhere."""
    output = (result.stdout or "") + (result.stderr or "")
    assert result.exit_code == 0, output
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret.decode() not in output, f"a secret read from outside the model is printed:\n{output}"
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not [s for s in SECRETS if s in data], f"{path} holds a secret read from outside the model"


def warned(text: str) -> bool:
    return "ignored it (a revision is 40 or 64 lowercase hex characters" in text or "the revision is unknown" in text


@pytest.mark.parametrize("how", HOW)
def test_plan_and_pin_ignore_a_hostile_revision_file_and_say_so(tmp_path, tiny, hostile_cli, snapshot, how):
    model = plant(tmp_path, tiny, how)
    inputs = snapshot(model)
    recipe = write_recipe(tmp_path, f"base_model: {model}\ninject: {{every: 2}}\n")
    planned = hostile_cli("plan", "--json", recipe)
    assert_clean(planned)
    plan = json.loads(planned.stdout)
    assert plan["sources"][str(model)]["revision"] is None
    assert [w for w in plan["warnings"] if warned(w)], plan["warnings"]
    pinned = hostile_cli("pin", model)
    assert_clean(pinned)
    assert warned(pinned.stderr) and "revision:" not in pinned.stdout
    inputs.unchanged()


@pytest.mark.parametrize("how", ["absolute", "ref-link", "packed-junk", "metadata-text"])
def test_run_and_verify_publish_nothing_from_outside(tmp_path, tiny, hostile_cli, snapshot, leftovers, how):
    model = plant(tmp_path, tiny, how)
    inputs = snapshot(model)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"base_model: {model}\ninject: {{every: 2}}\n")
    written = hostile_cli("run", recipe, "--output", out, "--device", "cpu", "--no-progress")
    assert_clean(written, out)
    assert warned(written.stderr)
    assert json.loads((out / "plan.json").read_text())["sources"][str(model)]["revision"] is None
    assert {"plan.json", "README.md", "model.safetensors"} <= {p.name for p in out.iterdir()} or (
        out / "model.safetensors.index.json"
    ).is_file()
    assert_clean(hostile_cli("verify", out, "--no-logits"), out)
    inputs.unchanged()
    assert leftovers(out) == []


def test_a_sharded_output_carries_no_secret_in_index_or_shard_metadata(tmp_path, tiny, hostile_cli):
    model = plant(tmp_path, tiny, "absolute")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"base_model: {model}\ninject: {{every: 2}}\nshard_size: 20000\n")
    written = hostile_cli("run", recipe, "--output", out, "--device", "cpu", "--no-progress")
    assert_clean(written, out)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    from safetensors import safe_open

    for shard in out.glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert json.loads(f.metadata()["sources"])[str(model)]["revision"] is None


@pytest.mark.parametrize("how", ["absolute", "dotdot", "ref-link", "ref-content", "git-link", "metadata-link"])
def test_a_pinned_revision_that_cannot_be_told_is_refused_without_echo(
    tmp_path, tiny, hostile_cli, snapshot, refused, how
):
    model = plant(tmp_path, tiny, how)
    inputs = snapshot(model)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"base_model:\n  path: {model}\n  revision: {HEX_SECRET}\n")
    # the recipe pins the very token the secret holds: following the link would "match" it
    result = hostile_cli("run", recipe, "--output", out, "--device", "cpu", "--no-progress")
    refused(
        result,
        f"base_model.revision: cannot tell which revision {model} holds",
        inputs=inputs,
        target=out,
        secrets=[TEXT_SECRET.encode()],
    )
    assert TEXT_SECRET not in result.stdout + result.stderr
    assert not out.exists()


def test_a_good_revision_beside_junk_still_counts(tmp_path, tiny, hostile_cli):
    model = plant(tmp_path, tiny, "packed-junk")
    (model / ".git" / "packed-refs").write_text(
        f"# pack-refs with: peeled\n{TEXT_SECRET} refs/tags/x\n{COMMIT} refs/heads/main\n"
    )
    recipe = write_recipe(tmp_path, f"base_model:\n  path: {model}\n  revision: {COMMIT}\n")
    planned = hostile_cli("plan", "--json", recipe)
    assert_clean(planned)
    assert json.loads(planned.stdout)["sources"][str(model)]["revision"] == COMMIT
    assert f"revision: {COMMIT}   # from its git HEAD" in hostile_cli("pin", model).stdout


# --- the hub cache -------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, tiny, monkeypatch):
    """A hub cache with org/tiny at COMMIT; the test decides what refs/main holds."""
    (tmp_path / "secret").write_text(f"{TEXT_SECRET}\n")
    (tmp_path / "secret-hex").write_text(f"{HEX_SECRET}\n")
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny(layers=4), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


@pytest.mark.parametrize("how", ["text", "link", "fifo"])
def test_a_hostile_hub_ref_is_refused_without_echo(tmp_path, hub, hostile_cli, snapshot, refused, how):
    main = hub / "refs" / "main"
    if how == "text":
        main.write_text(f"{TEXT_SECRET}\n")
    elif how == "link":
        main.symlink_to(tmp_path / "secret-hex")
    else:
        os.mkfifo(main)
    inputs = snapshot(hub)
    recipe = write_recipe(tmp_path, "base_model: org/tiny\ninject: {every: 2}\n")
    expected = "holds no commit" if how == "text" else "is a link leaving" if how == "link" else "is not a regular file"
    for args in (("plan", "--json", recipe), ("pin", "org/tiny")):
        result = hostile_cli(*args)
        refused(result, f"{main}: {expected}", inputs=inputs, secrets=SECRETS)
        assert not [s for s in SECRETS if s.decode() in result.stdout + result.stderr]


def test_a_hub_revision_cannot_climb_out_of_the_cache(tmp_path, hub, hostile_cli, refused, tiny):
    shutil.copytree(tiny(layers=4), tmp_path / "elsewhere")  # a model directory outside the cache
    (hub / "refs" / "main").write_text(COMMIT)
    recipe = write_recipe(tmp_path, "base_model: org/tiny@../../../elsewhere\ninject: {every: 2}\n")
    refused(
        hostile_cli("plan", "--json", recipe),
        "is neither a local directory nor a model in the local Hugging Face cache",
    )


@pytest.mark.parametrize("where", ["outside", "other-repo", "blobs-is-a-link"])
def test_a_pinned_snapshot_link_out_of_its_repos_blobs_is_not_hashed(
    tmp_path, hub, hostile_cli, snapshot, refused, where
):
    """A snapshot's files may link into their own repo's blobs/ (as the cache stores them), nowhere else."""
    (hub / "refs" / "main").write_text(COMMIT)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / ("e" * 64)).write_text(f"{TEXT_SECRET}\n")
    target = {"outside": tmp_path / "secret", "other-repo": other / ("e" * 64)}.get(where)
    if where == "blobs-is-a-link":  # blobs/ itself pointing at a folder outside the cache
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / ("e" * 64)).write_text(f"{TEXT_SECRET}\n")
        (hub / "blobs").symlink_to(tmp_path / "outside", target_is_directory=True)
        target = hub / "blobs" / ("e" * 64)
    (hub / "snapshots" / COMMIT / "tokenizer.json").symlink_to(target)
    inputs = snapshot(tmp_path / "hub")
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path,
        f'base_model:\n  path: org/tiny\n  checksums:\n    tokenizer.json: "{"0" * 64}"\ninject: {{every: 2}}\n',
    )
    result = hostile_cli("run", recipe, "--output", out, "--device", "cpu", "--no-progress")
    refused(
        result,
        "tokenizer.json is a link leaving its Hugging Face cache repo",
        inputs=inputs,
        target=out,
        secrets=SECRETS,
    )


def test_an_unpinned_side_file_linking_out_of_the_cache_is_neither_copied_nor_hashed(tmp_path, hub, hostile_cli):
    (hub / "refs" / "main").write_text(COMMIT)
    (hub / "snapshots" / COMMIT / "tokenizer.json").symlink_to(tmp_path / "secret")
    out = tmp_path / "out"
    result = hostile_cli(
        "run",
        write_recipe(tmp_path, "base_model: org/tiny\ninject: {every: 2}\n"),
        "--output",
        out,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.stderr
    assert not (out / "tokenizer.json").exists()
    assert not [p.name for p in out.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in SECRETS)]
    pin = hostile_cli("pin", "org/tiny")
    assert pin.exit_code == 0 and "tokenizer.json" not in pin.stdout


def test_a_pinned_file_outside_the_model_is_not_hashed(tmp_path, tiny, hostile_cli, snapshot, refused):
    model = tmp_path / "m"
    shutil.copytree(tiny(layers=4), model)
    (tmp_path / "secret").write_text(f"{TEXT_SECRET}\n")
    inputs = snapshot(model)
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path, f'base_model:\n  path: {model}\n  checksums:\n    ../secret: "{"0" * 64}"\ninject: {{every: 2}}\n'
    )
    result = hostile_cli("run", recipe, "--output", out, "--device", "cpu", "--no-progress")
    # refused by the schema, or (a plan made another way) by hash_sources: either way nothing outside is read
    message = re.compile(r"'\.\./secret' is not a file of the model directory|has no file '\.\./secret'")
    refused(result, message, inputs=inputs, target=out, secrets=SECRETS)
    import hashlib

    assert hashlib.sha256(f"{TEXT_SECRET}\n".encode()).hexdigest() not in result.stdout + result.stderr
