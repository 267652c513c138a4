"""Hub ids against a local hub (tests/fake_hub.py): download, cache hits, pins, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe
from fake_hub import FakeHub, serve

C1 = "0123456789abcdef0123456789abcdef01234567"
C2 = "89abcdef0123456789abcdef0123456789abcdef"
RECIPE = "base_model: org/tiny\ninject: {every: 2}\n"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    fake = FakeHub()
    server = serve(fake)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # frozen when huggingface_hub was first imported
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield fake
    server.shutdown()
    server.server_close()


def snapshots(tmp_path) -> Path:
    return tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots"


def with_index(tiny, tmp_path) -> Path:
    """The tiny model with a model.safetensors.index.json naming its one file."""
    from safetensors import safe_open

    folder = tmp_path / "indexed"
    shutil.copytree(tiny(layers=4), folder)
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}})
    )
    return folder


@pytest.mark.slow
def test_run_downloads_then_the_cache_answers(tmp_path, hub, tiny, cli):
    hub.add("org/tiny", tiny(layers=4), C1)
    recipe = write_recipe(tmp_path, RECIPE)
    result = cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert f"hub: downloading org/tiny@main (commit {C1}" in result.stderr
    snapshot = snapshots(tmp_path) / C1
    assert (snapshot / "model.safetensors").read_bytes() == (tiny(layers=4) / "model.safetensors").read_bytes()
    assert (snapshot.parent.parent / "refs" / "main").read_text() == C1
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["sources"]["org/tiny"]["revision"] == C1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    assert {n for n in os.listdir(snapshot)} <= {"config.json", "model.safetensors", "generation_config.json"}
    hub.log.clear()
    again = cli("run", recipe, "-o", tmp_path / "again", "--no-progress")
    assert again.exit_code == 0, again.stderr
    assert hub.log == []  # a complete snapshot: not one request
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert shards and all((tmp_path / "again" / n).read_bytes() == (tmp_path / "out" / n).read_bytes() for n in shards)


@pytest.mark.slow
def test_a_pinned_revision_is_downloaded_not_the_branch(tmp_path, hub, tiny, cli):
    hub.add("org/tiny", tiny(layers=4, seed=1), C1, branch="v1")
    hub.add("org/tiny", tiny(layers=4), C2)
    recipe = write_recipe(tmp_path, f"base_model: org/tiny@{C1}\ninject: {{every: 2}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert os.listdir(snapshots(tmp_path)) == [C1]
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["sources"][f"org/tiny@{C1}"]["revision"] == C1
    branch = cli("plan", write_recipe(tmp_path, "base_model: org/tiny@v1\n", "v1.yaml"))
    assert branch.exit_code == 0, branch.stderr
    assert f"revision 'v1' is a branch or tag name, now commit {C1}" in branch.stdout + branch.stderr


def test_plan_fetches_config_and_index_and_reads_headers_only(tmp_path, hub, tiny, cli):
    model = with_index(tiny, tmp_path)
    hub.add("org/tiny", model, C1)
    result = cli("plan", write_recipe(tmp_path, RECIPE))
    assert result.exit_code == 0, result.stderr
    assert "the weights were not downloaded" in result.stderr and "1 safetensors header(s)" in result.stderr
    assert "6" in result.stdout
    fetched = {(method, path.rsplit("/", 1)[1], rng) for method, path, rng in hub.file_requests()}
    weights = {f for f in fetched if f[1] == "model.safetensors"}
    assert weights == {("GET", "model.safetensors", "bytes=0-99999")}  # one range request, not the file
    assert {f[1] for f in fetched} == {"config.json", "model.safetensors.index.json", "model.safetensors"}
    assert sorted(os.listdir(snapshots(tmp_path) / C1)) == ["config.json", "model.safetensors.index.json"]
    # the same plan from the downloaded files is the same plan
    from tli_recipe import compile_plan, load_recipe

    remote = json.loads(cli("plan", "--json", tmp_path / "recipe.yaml").stdout)
    local = json.loads(
        compile_plan(
            load_recipe(write_recipe(tmp_path, f"base_model: {model}\ninject: {{every: 2}}\n", "local.yaml"))
        ).model_dump_json()
    )

    def ops(plan):
        return [{k: v for k, v in op.items() if k != "source"} for op in plan["tensors"]]

    assert ops(remote) == ops(local)
    # run after plan downloads the rest
    hub.log.clear()
    ran = cli("run", tmp_path / "recipe.yaml", "-o", tmp_path / "out", "--no-progress")
    assert ran.exit_code == 0, ran.stderr
    assert ("GET", "model.safetensors", "") in {(m, p.rsplit("/", 1)[1], r) for m, p, r in hub.file_requests()}


@pytest.mark.parametrize("case", ["gated", "missing", "revision"])
def test_hub_refusals_are_one_line(tmp_path, hub, tiny, cli, case):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.repos["org/tiny"].gated = case == "gated"
    text = {"gated": RECIPE, "missing": "base_model: org/nope\n", "revision": "base_model: org/tiny@nope\n"}[case]
    for command in ("plan", "run"):
        result = cli(
            command,
            write_recipe(tmp_path, text),
            "-o" if command == "run" else "--json",
            *([tmp_path / "out"] if command == "run" else []),
        )
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        expected = {
            "gated": f"org/tiny is a gated model on {hub.url} (HTTP 401): accept its conditions at {hub.url}/org/tiny, "
            "then log in (`hf auth login`, or set HF_TOKEN)",
            "missing": f"org/nope was not found on {hub.url} (HTTP 401); check the id, or if it is private",
            "revision": f"{hub.url} has no revision 'nope' of org/tiny either",
        }[case]
        assert expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_gated_repo_with_a_token_is_403(tmp_path, hub, tiny, cli, monkeypatch):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.repos["org/tiny"].gated = True
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = cli("plan", write_recipe(tmp_path, RECIPE))
    assert result.exit_code == 2 and "is a gated model" in result.stderr and "(HTTP 403)" in result.stderr


@pytest.mark.slow
def test_an_interrupted_download_leaves_nothing_and_resumes(tmp_path, hub, tiny, cli):
    hub.add("org/tiny", tiny(layers=4), C1)
    hub.cut = True
    recipe = write_recipe(tmp_path, RECIPE)
    result = cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code == 2, result.stderr
    assert (
        "was interrupted" in result.stderr
        and "run the same command again (the files that arrived whole" in result.stderr
    )
    assert result.stderr.count("\n") <= 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not (snapshots(tmp_path) / C1 / "model.safetensors").exists()
    hub.cut = False
    again = cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    assert again.exit_code == 0, again.stderr
    assert (snapshots(tmp_path) / C1 / "model.safetensors").read_bytes() == (
        tiny(layers=4) / "model.safetensors"
    ).read_bytes()


def test_offline_refuses_to_download(tmp_path, hub, tiny, cli, monkeypatch):
    hub.add("org/tiny", tiny(layers=4), C1)
    recipe = write_recipe(tmp_path, RECIPE)
    result = cli("run", recipe, "-o", tmp_path / "out", "--offline")
    assert result.exit_code == 2
    assert "'org/tiny' is neither a local directory nor a model in the local Hugging Face cache" in result.stderr
    assert "--offline forbids downloading" in result.stderr and "hf download org/tiny" in result.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in cli("run", recipe, "-o", tmp_path / "out").stderr
    assert "HF_HUB_OFFLINE is set" in cli("plan", recipe).stderr
    assert hub.log == []


def test_pin_resolves_a_branch_on_the_hub(tmp_path, hub, tiny, cli):
    hub.add("org/tiny", tiny(layers=4), C1)
    # a stale cache: refs/main still names an older commit
    stale = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(tiny(layers=4, seed=1), stale / "snapshots" / C2)
    (stale / "refs").mkdir()
    (stale / "refs" / "main").write_text(C2)
    result = cli("pin", "org/tiny")
    assert result.exit_code == 0, result.stderr
    assert f"hub: org/tiny@main is commit {C1}" in result.stderr
    assert f"revision: {C1}" in result.stdout and '"org/tiny"' in result.stdout
    offline = cli("pin", "org/tiny", "--offline")
    assert offline.exit_code == 0 and f"revision: {C2}" in offline.stdout


def header_requests(hub) -> list:
    return [r for r in hub.file_requests() if r[1].endswith(".safetensors")]


def test_a_second_plan_reads_the_headers_it_kept_and_makes_no_range_request(tmp_path, hub, tiny, cli, monkeypatch):
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(tmp_path / "cache" / "sha256.json"))
    hub.add("org/tiny", with_index(tiny, tmp_path), C1)
    recipe = write_recipe(tmp_path, RECIPE)
    first = cli("plan", "--json", recipe)
    assert first.exit_code == 0, first.stderr
    assert len(header_requests(hub)) == 1
    hub.log.clear()
    again = cli("plan", "--json", recipe)
    assert again.exit_code == 0, again.stderr
    assert header_requests(hub) == [] and "1 known from an earlier read" in again.stderr
    assert json.loads(again.stdout)["tensors"] == json.loads(first.stdout)["tensors"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", ["garbage", "other-key", "bad-header", "short-size", "symlink", "lone-surrogate", "deep-nesting", "fifo"]
)
def test_a_damaged_or_foreign_kept_header_is_read_from_the_hub_again(tmp_path, hub, tiny, cli, damage, monkeypatch):
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(tmp_path / "cache" / "sha256.json"))
    hub.add("org/tiny", with_index(tiny, tmp_path), C1)
    recipe = write_recipe(tmp_path, RECIPE)
    first = cli("plan", "--json", recipe)
    assert first.exit_code == 0, first.stderr
    kept = list((tmp_path / "cache" / "headers").glob("*.json"))
    assert len(kept) == 1 and all(oct(k.stat().st_mode & 0o777) == "0o600" for k in kept)
    record = json.loads(kept[0].read_text())
    if damage == "garbage":
        kept[0].write_text("{not json")
    elif damage == "other-key":
        record["key"][2] = C2
        kept[0].write_text(json.dumps(record))
    elif damage == "bad-header":  # validated like the hub's bytes; failing, it is read from the hub again
        record["header"] = record["header"].replace('"data_offsets":[0,', '"data_offsets":[1,', 1)
        kept[0].write_text(json.dumps(record))
    elif damage == "short-size":
        record["size"] = 8
        kept[0].write_text(json.dumps(record))
    elif damage == "lone-surrogate":  # valid JSON whose string cannot be encoded back to UTF-8
        kept[0].write_text(json.dumps(record).replace('"header": "{', '"header": "\\ud800{', 1))
    elif damage == "deep-nesting":
        kept[0].write_text(json.dumps(record)[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    elif damage == "fifo":
        kept[0].unlink()
        os.mkfifo(kept[0])
    else:
        (tmp_path / "elsewhere.json").write_text(kept[0].read_text())
        kept[0].unlink()
        kept[0].symlink_to(tmp_path / "elsewhere.json")
    hub.log.clear()
    again = cli("plan", "--json", recipe)
    assert again.exit_code == 0, again.stderr
    assert len(header_requests(hub)) == 1
    assert json.loads(again.stdout)["tensors"] == json.loads(first.stdout)["tensors"]


def pinned_checksums(stdout: str) -> dict[str, str]:
    import yaml

    return yaml.safe_load(stdout)["base_model"]["checksums"]


@pytest.mark.slow
def test_pin_of_an_uncached_model_takes_the_weights_sha256_from_the_hub_without_downloading(tmp_path, hub, tiny, cli):
    import hashlib

    folder = with_index(tiny, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    hub.add("org/tiny", folder, C1)
    result = cli("pin", "org/tiny")
    assert result.exit_code == 0, result.stderr
    expected = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"} <= set(expected)
    assert pinned_checksums(result.stdout) == expected
    assert f"revision: {C1}" in result.stdout
    assert "the sha256 of 1 of 1 safetensors file(s) from the hub's LFS records (not downloaded)" in result.stderr
    weights = [r for r in hub.file_requests() if r[1].endswith("/model.safetensors")]
    assert weights and all(r[0] == "GET" and r[2].startswith("bytes=0-") for r in weights)  # headers only
    assert not (snapshots(tmp_path) / C1 / "model.safetensors").exists()
    # the pin holds for the run that downloads the weights
    recipe = write_recipe(tmp_path, result.stdout + "inject: {every: 2}\n")
    run = cli("run", recipe, "-o", tmp_path / "out", "--no-progress")
    assert run.exit_code == 0, run.stderr
    assert (snapshots(tmp_path) / C1 / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_pin_downloads_a_weight_file_the_hub_has_no_sha256_for(tmp_path, hub, tiny, cli, monkeypatch):
    import hashlib

    import fake_hub

    monkeypatch.setattr(fake_hub, "_lfs", lambda name, data: {})  # stored in git, not LFS: no sha256 listed
    hub.add("org/tiny", tiny(layers=4), C1)
    result = cli("pin", "org/tiny")
    assert result.exit_code == 0, result.stderr
    assert "the sha256 of 0 of 1 safetensors file(s)" in result.stderr
    weights = tiny(layers=4) / "model.safetensors"
    assert pinned_checksums(result.stdout)["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (snapshots(tmp_path) / C1 / "model.safetensors").read_bytes() == weights.read_bytes()


@pytest.mark.slow
def test_pin_of_a_cached_model_reads_no_blob_this_tool_hashed_unless_asked(tmp_path, hub, tiny, cli, monkeypatch):
    hub.add("org/tiny", tiny(layers=4), C1)
    assert cli("run", write_recipe(tmp_path, RECIPE), "-o", tmp_path / "out", "--no-progress").exit_code == 0
    from tli_recipe.source import hashes

    read: list[str] = []
    real = hashes.sha256_file
    monkeypatch.setattr(hashes, "sha256_file", lambda path, stop=None: read.append(Path(path).name) or real(path, stop))
    first = cli("pin", f"org/tiny@{C1}")
    assert first.exit_code == 0, first.stderr
    assert read == []  # every file was hashed as it landed, by this tool: its digest cache knows them
    monkeypatch.setenv("TLI_RECIPE_HASH_CACHE", str(tmp_path / "digests.json"))
    elsewhere = cli("pin", f"org/tiny@{C1}")  # a digest cache without them: the blob's name is not trusted
    assert elsewhere.exit_code == 0 and "model.safetensors" in read
    read.clear()
    again = cli("pin", f"org/tiny@{C1}", "--rehash")
    assert again.exit_code == 0 and "model.safetensors" in read
    assert pinned_checksums(again.stdout) == pinned_checksums(first.stdout)


# --- the cache alone (no hub) --------------------------------------------------------


@pytest.fixture
def cache(tmp_path, tiny, monkeypatch):
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(tiny(layers=4), repo / "snapshots" / C1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(C1)
    (repo / "refs" / "v2").write_text("not a commit")  # never listed
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return repo


def test_a_missing_revision_lists_the_cached_ones(tmp_path, cache, cli):
    result = cli("plan", write_recipe(tmp_path, f"base_model: org/tiny@{C2}\n"))
    assert result.exit_code == 2
    assert f"the cache holds org/tiny at: main ({C1}); HF_HUB_OFFLINE is set" in result.stderr
    assert "not a commit" not in result.stderr and "v2" not in result.stderr


def test_a_dangling_blob_is_an_incomplete_download(tmp_path, cache, cli):
    weights = cache / "snapshots" / C1 / "model.safetensors"
    weights.unlink()
    weights.symlink_to(cache / "blobs" / ("0" * 64))
    result = cli("plan", write_recipe(tmp_path, RECIPE))
    assert result.exit_code == 2
    assert (
        f"{weights.parent}: an incomplete download: model.safetensors point(s) at blobs that are not in the cache; "
        f"complete it with `hf download org/tiny --revision {C1}`"
    ) in result.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HOME": "~/hf-home"},
        {"HF_HOME": "/x", "HUGGINGFACE_HUB_CACHE": "/legacy"},
        {"HF_HUB_CACHE": "~/c", "HUGGINGFACE_HUB_CACHE": "/legacy"},
        {"XDG_CACHE_HOME": "/xdg"},
    ],
)
def test_the_cache_folder_is_huggingface_hubs(env, monkeypatch):
    from tli_recipe.source.hub import cache_root

    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    theirs = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout.strip()
    assert str(cache_root()) == theirs and "~" not in theirs


def test_plan_of_a_cached_model_imports_no_huggingface_hub(tmp_path, cache):
    code = (
        "import sys; from tli_recipe import compile_plan, load_recipe; "
        f"compile_plan(load_recipe({str(write_recipe(tmp_path, RECIPE))!r})); print('huggingface_hub' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip() == "False", out.stderr
