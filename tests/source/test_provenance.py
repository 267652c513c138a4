"""Provenance: byte-identical reruns, recorded checksums and revisions, pins that `run` enforces."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tree_digest, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.source.revisions import source_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cli, recipe: Path, output: Path, *extra):
    return cli("run", recipe, "--output", output, "--device", "cpu", "--no-progress", *extra)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SEEDED = """base_model: {base}
dtype: bfloat16
seed: {seed}
inject:
  every: 4
  init:
    q_proj: {{scale: 0.5}}
    k_proj: {{interpolate: 0.25}}
    o_proj: {{noise: 0.02}}
    down_proj: {{random: 0.02}}
stages:
  - name: new
    trainable: [injected]
"""


def test_reruns_are_byte_identical_with_seeded_random_policies(tmp_path, tiny, cli):
    base = tiny()
    recipe = write_recipe(tmp_path, SEEDED.format(base=base, seed=7))
    out = tmp_path / "out"  # the output path is an input too (training configs name it)
    assert run(cli, recipe, out).exit_code == 0
    a = files_of(out)
    assert run(cli, recipe, out, "--force").exit_code == 0
    b = files_of(out)
    assert sorted(a) == sorted(b) and "model-00001-of-00001.safetensors" in a and "plan.json" in a and "README.md" in a
    # training/ (emitted trainer configs) is checked on its own below.
    assert [name for name in a if a[name] != b[name] and not name.startswith("training/")] == []
    plan = json.loads(a["plan.json"])
    assert {op["op"] for op in plan["tensors"]} >= {"noise", "random", "scale", "interpolate"}
    # The seed is what makes the draws: another seed gives other bytes.
    other = tmp_path / "other"
    assert run(cli, write_recipe(tmp_path, SEEDED.format(base=base, seed=8), "seed8.yaml"), other).exit_code == 0
    assert files_of(other)["model-00001-of-00001.safetensors"] != a["model-00001-of-00001.safetensors"]


def test_reruns_give_byte_identical_training_configs(tmp_path, tiny, cli):
    recipe = write_recipe(tmp_path, SEEDED.format(base=tiny(), seed=7))
    out = tmp_path / "out"
    assert run(cli, recipe, out).exit_code == 0
    a = files_of(out)
    assert run(cli, recipe, out, "--force").exit_code == 0
    b = files_of(out)
    assert [name for name in a if a[name] != b[name]] == []
    assert any(name.startswith("training/") for name in a)
    assert not [name for name in a if ".tmp-" in (out / name).read_text(errors="replace")]


def test_output_records_source_checksums_everywhere(tmp_path, tiny, cli):
    base = tiny()
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 4}}\n")
    out = tmp_path / "out"
    assert run(cli, recipe, out).exit_code == 0
    expected = {name: sha(base / name) for name in ("config.json", "generation_config.json", "model.safetensors")}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source_files"] == {str(base): expected}
    assert plan["sources"][str(base)]["revision"] is None
    card = (out / "README.md").read_text()
    assert "## Provenance" in card and f"recipe with sha256 `{plan['recipe_sha256']}`" in card
    for name, digest in expected.items():
        assert f"| `{base.name}` | {name} | `{digest}` |" in card  # the folder's name: no path of this machine
    from safetensors import safe_open

    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sources"]) == {str(base): {"revision": None, "sha256": expected}}
    assert meta["recipe_sha256"] == plan["recipe_sha256"] and meta["tli_recipe_version"] == plan["tli_recipe_version"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["sources"] == meta["sources"]


def pinned(tmp_path, base: Path, checksums: dict[str, str], name: str = "pinned.yaml") -> Path:
    lines = "".join(f'    {k}: "{v}"\n' for k, v in checksums.items())
    return write_recipe(tmp_path, f"base_model:\n  path: {base}\n  checksums:\n{lines}inject: {{every: 4}}\n", name)


def test_run_checks_pinned_checksums(tmp_path, tiny, cli):
    base = tiny()
    good = {"config.json": sha(base / "config.json"), "model.safetensors": sha(base / "model.safetensors")}
    recipe = pinned(tmp_path, base, good)
    out = tmp_path / "out"
    assert run(cli, recipe, out).exit_code == 0
    assert "checksums:" in (out / "recipe.yaml").read_text()  # the pin travels with the output
    before = tree_digest(base)
    wrong = pinned(tmp_path, base, {**good, "model.safetensors": "0" * 63 + "1"}, "wrong.yaml")
    result = run(cli, wrong, tmp_path / "refused")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        f"output: {tmp_path / 'refused'}\n"  # run says where it would write, then refuses
        f"{wrong}:5:24: base_model.checksums.model.safetensors: {base / 'model.safetensors'} has sha256 "
        f"{good['model.safetensors']}, the recipe expects {'0' * 63 + '1'}; the file changed: download the "
        "pinned revision again, or update the checksum if the change is intended\n"
    )
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    assert tree_digest(base) == before


def test_a_pin_that_differs_only_in_its_last_character_is_refused(tmp_path, tiny, cli):
    base = tiny()
    digest = sha(base / "model.safetensors")
    near = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    result = run(cli, pinned(tmp_path, base, {"model.safetensors": near}), tmp_path / "out")
    assert result.exit_code == 2 and f"has sha256 {digest}, the recipe expects {near}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_pinned_file_that_is_missing_is_named(tmp_path, tiny, cli):
    base = tiny()
    recipe = pinned(tmp_path, base, {"tokenizer.json": "a" * 64})
    result = run(cli, recipe, tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr == (
        f"output: {tmp_path / 'out'}\n"
        f"{recipe}:4:5: base_model.checksums.tokenizer.json: {base} has no file 'tokenizer.json'; "
        "expected one of: config.json, generation_config.json, model.safetensors\n"
    )


def test_pin_prints_a_block_that_run_accepts(tmp_path, tiny, cli):
    base = tiny()
    block = cli("pin", base)
    assert block.exit_code == 0, block.stderr
    assert f'"model.safetensors": "{sha(base / "model.safetensors")}"' in block.stdout
    recipe = write_recipe(tmp_path, block.stdout + "inject: {every: 4}\n")
    assert load_recipe(recipe).recipe.base_model.checksums["config.json"] == sha(base / "config.json")
    assert run(cli, recipe, tmp_path / "out").exit_code == 0


@pytest.fixture
def hub_cache(tmp_path, tiny, monkeypatch):
    """A Hugging Face cache holding org/tiny at COMMIT, with refs/main pointing at it."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny(), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / COMMIT


def test_hub_revision_pin_is_resolved_and_recorded(tmp_path, hub_cache):
    for text in (f"base_model: org/tiny@{COMMIT}\n", f"base_model: {{path: org/tiny, revision: {COMMIT}}}\n"):
        loaded = load_recipe(write_recipe(tmp_path, text + "inject: {every: 4}\n"))
        assert loaded.recipe.base_model.path == "org/tiny" and loaded.recipe.base_model.revision == COMMIT
        plan = compile_plan(loaded)
        assert plan.sources[f"org/tiny@{COMMIT}"].revision == COMMIT
        assert not [w for w in plan.warnings if "branch" in w]
    assert (
        load_recipe(write_recipe(tmp_path, f"base_model: org/tiny@{COMMIT}\n")).resolved()["base_model"]
        == f"org/tiny@{COMMIT}"
    )
    unpinned = compile_plan(load_recipe(write_recipe(tmp_path, "base_model: org/tiny\n")))
    assert unpinned.sources["org/tiny"].revision == COMMIT  # recorded even without a pin


def test_a_branch_is_not_a_pin(tmp_path, hub_cache):
    plan = compile_plan(load_recipe(write_recipe(tmp_path, "base_model: org/tiny@main\ninject: {every: 4}\n")))
    assert (
        f"org/tiny@main: revision 'main' is a branch or tag name, now commit {COMMIT}; it moves, so pin the commit "
        f"for a reproducible recipe (revision: {COMMIT})" in plan.warnings
    )


def test_a_hub_revision_not_in_the_cache_is_refused(tmp_path, hub_cache, cli):
    recipe = write_recipe(tmp_path, f"base_model: org/tiny@{OTHER}\n")
    result = cli("plan", recipe)
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"{recipe}:1:13: base_model: 'org/tiny@{OTHER}' is neither a local directory nor a model "
        "in the local Hugging Face cache"
    )


def local_copy(tmp_path, tiny, how: str | None) -> Path:
    folder = tmp_path / f"local-{how}"
    shutil.copytree(tiny(), folder)
    if how == "download":
        meta = folder / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True)
        (meta / "config.json.metadata").write_text(f'{COMMIT}\n"etag"\n1700000000.0\n')
    elif how == "git":
        (folder / ".git" / "refs" / "heads").mkdir(parents=True)
        (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (folder / ".git" / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    return folder


@pytest.mark.parametrize("how", ["download", "git"])
def test_local_directory_revision_is_checked(tmp_path, tiny, cli, how):
    folder = local_copy(tmp_path, tiny, how)
    ok = write_recipe(tmp_path, f"base_model:\n  path: {folder}\n  revision: {COMMIT}\n", "ok.yaml")
    assert compile_plan(load_recipe(ok)).sources[str(folder)].revision == COMMIT
    short = write_recipe(tmp_path, f"base_model:\n  path: {folder}\n  revision: {COMMIT[:10]}\n", "short.yaml")
    assert compile_plan(load_recipe(short)).sources[str(folder)].revision == COMMIT
    bad = write_recipe(tmp_path, f"base_model:\n  path: {folder}\n  revision: {OTHER}\n", "bad.yaml")
    result = cli("plan", bad)
    assert result.exit_code == 2
    source = ".cache/huggingface/download/config.json.metadata" if how == "download" else "its git HEAD"
    assert result.stderr == (
        f"{bad}:3:13: base_model.revision: {folder} is at revision {COMMIT} (from {source}), the recipe "
        f"pins {OTHER}; expected the pinned revision: download it again (hf download ORG/NAME "
        f"--revision {OTHER} --local-dir DIR), or change the pin\n"
    )


def test_a_revision_that_cannot_be_told_is_an_error(tmp_path, tiny, cli):
    folder = local_copy(tmp_path, tiny, None)
    recipe = write_recipe(tmp_path, f"base_model: {{path: {folder}, revision: {COMMIT}}}\n")
    result = cli("plan", recipe)
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"{recipe}:1:{len('base_model: {path: ') + len(str(folder)) + 13}: base_model.revision: "
        f"cannot tell which revision {folder} holds"
    )
    assert "pin its files with checksums instead of a revision" in result.stderr


def test_model_reference_forms(tmp_path):
    def base(text):
        return load_recipe("x.yaml", text=f"base_model: {text}\n").recipe.base_model

    assert (base("org/name").path, base("org/name").revision) == ("org/name", None)
    assert (base("org/name@v1.0").path, base("org/name@v1.0").revision) == ("org/name", "v1.0")
    assert (base("/models/x@2").path, base("/models/x@2").revision) == ("/models/x@2", None)  # a directory, not a pin
    assert str(base("{path: /models/x, revision: abc1234}")) == "/models/x"
    assert str(base("{path: org/name, revision: abc1234}")) == "org/name@abc1234"


# --- revisions are validated tokens read from inside the directory -----------------

SHA256 = "ab" * 32


def git_dir(tmp_path, head: str, **files: str) -> Path:
    """A folder with a .git holding HEAD and the given files (``refs__heads__main`` -> refs/heads/main)."""
    folder = tmp_path / "model"
    git = folder / ".git"
    git.mkdir(parents=True)
    (git / "HEAD").write_text(head)
    for name, text in files.items():
        path = git / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


@pytest.mark.parametrize(
    "head, files, commit",
    [
        (f"{COMMIT}\n", {}, COMMIT),  # detached
        (f"{SHA256}\n", {}, SHA256),  # a sha256 repository
        ("ref: refs/heads/main\n", {"refs__heads__main": f"{COMMIT}\n"}, COMMIT),
        (
            "ref: refs/heads/main\n",
            {"packed-refs": f"# pack-refs with: peeled\n{OTHER} refs/tags/v1\n{COMMIT} refs/heads/main\n"},
            COMMIT,
        ),
    ],
)
def test_git_revisions_that_count(tmp_path, head, files, commit):
    from tli_recipe.source.revisions import source_revision

    warnings: list[str] = []
    assert source_revision(git_dir(tmp_path, head, **files), warnings) == (commit, "its git HEAD")
    assert warnings == []


def test_a_ref_file_linked_inside_git_counts(tmp_path):
    from tli_recipe.source.revisions import source_revision

    folder = git_dir(tmp_path, "ref: refs/heads/main\n", refs__heads__dev=f"{COMMIT}\n")
    (folder / ".git" / "refs" / "heads" / "main").symlink_to("dev")
    assert source_revision(folder) == (COMMIT, "its git HEAD")


@pytest.mark.parametrize(
    "head, files",
    [
        ("ref: {secret}\n", {}),  # absolute ref
        ("ref: ../../secret\n", {}),  # climbs out of .git
        ("ref: refs/heads/../../../secret\n", {}),  # climbs out from under refs/
        ("ref: heads/main\n", {"heads__main": f"{COMMIT}\n"}),  # not under refs/
        ("{COMMIT}x\n", {}),  # not exactly a commit
        (f"{COMMIT.upper()}\n", {}),  # upper case is not how git writes it
        ("ref: refs/heads/main\n", {"refs__heads__main": "SECRET-TEXT\n"}),
        ("ref: refs/heads/main\n", {"packed-refs": "SECRET-TEXT refs/heads/main\n"}),
        ("ref: refs/heads/main\n", {}),  # a ref that is nowhere
    ],
)
def test_git_revisions_that_are_ignored_with_a_warning_quoting_nothing(tmp_path, head, files):
    from tli_recipe.source.revisions import source_revision

    secret = tmp_path / "secret"
    secret.write_text(f"{OTHER}\n")  # looks like a commit: only staying inside .git keeps it out
    folder = git_dir(tmp_path, head.format(secret=secret, COMMIT=COMMIT), **files)
    warnings: list[str] = []
    assert source_revision(folder, warnings) is None
    assert len(warnings) == 1 and warnings[0].startswith(f"{folder}: "), warnings
    assert not [w for w in warnings if OTHER in w or "SECRET" in w or "secret" in w or COMMIT in w]


@pytest.mark.parametrize("kind", ["fifo", "huge", "link-out", "binary"])
def test_a_head_that_is_no_small_regular_file_inside_git_is_not_read(tmp_path, kind):
    import os

    from tli_recipe.source.revisions import source_revision

    folder = git_dir(tmp_path, "")
    head = folder / ".git" / "HEAD"
    head.unlink()
    if kind == "fifo":
        os.mkfifo(head)  # reading it would block for ever
    elif kind == "huge":
        head.write_text(COMMIT + "\n" * 10_000)
    elif kind == "link-out":
        (tmp_path / "outside").write_text(f"{COMMIT}\n")
        head.symlink_to(tmp_path / "outside")
    else:
        head.write_bytes(COMMIT.encode() + b"\xff\n")
    warnings: list[str] = []
    assert source_revision(folder, warnings) is None
    why = {
        "fifo": "is not a regular file",
        "huge": "is larger than 4096 bytes",
        "link-out": "is a link leaving the directory",
        "binary": "is not plain text",
    }[kind]
    assert warnings == [
        f"{folder}: .git/HEAD {why}; ignored it (a revision is 40 or 64 lowercase hex characters read "
        "from a small regular file inside the model directory)"
    ]


def test_download_metadata_is_validated_too(tmp_path):
    from tli_recipe.source.revisions import source_revision

    folder = tmp_path / "model"
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("SECRET-TEXT\netag\n")
    (meta / "model.safetensors.metadata").write_text(f"{COMMIT}\netag\n")
    warnings: list[str] = []
    assert source_revision(folder, warnings) == (COMMIT, ".cache/huggingface/download/model.safetensors.metadata")
    assert warnings == [
        f"{folder}: .cache/huggingface/download/config.json.metadata does not start with a commit; "
        "ignored it (a revision is 40 or 64 lowercase hex characters read from a small regular file "
        "inside the model directory)"
    ]


def test_a_hub_ref_must_hold_a_commit(tmp_path):
    from tli_recipe.source.checkpoint import CheckpointError
    from tli_recipe.source.revisions import hub_commit

    cache = tmp_path / "models--org--x"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(f"{COMMIT}\n")
    assert hub_commit(cache, "main") == COMMIT
    assert hub_commit(cache, COMMIT) == COMMIT  # a commit names its snapshot directly
    assert hub_commit(cache, "v1.0") == "v1.0"  # no such ref: the caller looks for snapshots/v1.0
    for climbing in ("../../x", "/abs", "a//b", "refs/../../x", "."):
        assert hub_commit(cache, climbing) is None
    (cache / "refs" / "dev").write_text("SECRET-TEXT\n")
    with pytest.raises(CheckpointError, match="holds no commit") as caught:
        hub_commit(cache, "dev")
    assert "SECRET" not in str(caught.value)


# --- pins are located where the plan says they were written ------------------------

WRONG = "0" * 63 + "1"


def test_a_checksum_from_a_set_override_is_located_at_the_override(tmp_path, tiny, cli):
    base = tiny()
    recipe = write_recipe(tmp_path, "# grown elsewhere\nname: x\nbase_model: /nowhere\ninject: {every: 4}\n")
    override = f'base_model={{path: {base}, checksums: {{model.safetensors: "{WRONG}"}}}}'
    result = run(cli, recipe, tmp_path / "out", "--set", override)
    assert result.exit_code == 2
    # the recipe file's lines say nothing about this pin: the override is the place
    assert (
        f"--set {override}: base_model.checksums.model.safetensors: {base / 'model.safetensors'} has sha256 "
        in result.stderr
    )
    assert f"{recipe}:" not in result.stderr and not (tmp_path / "out").exists()


def test_a_checksum_of_a_rendered_recipe_is_located_in_the_rendered_text(tmp_path, tiny):
    from tli_recipe import execute_plan
    from tli_recipe.errors import RecipeError
    from tli_recipe.library.templates import read_template, render_recipe

    base = tiny()
    template = tmp_path / "grow.yaml.j2"
    template.write_text(
        "---\ndescription: grow\nvariables:\n  every: {type: int, default: 4}\n---\n"
        f'base_model:\n  path: {base}\n  checksums:\n    model.safetensors: "{WRONG}"\n'
        "inject: {every: {{ every }}}\n"
    )
    rendered = render_recipe(read_template(template), {"every": 4}, "grow[every=4]")
    plan = compile_plan(rendered.loaded)
    assert plan.pins[str(base)].checksums == {"model.safetensors": WRONG}
    # the template file itself is readable, but its lines are not the rendered recipe's: re-reading
    # plan.recipe_file (or the template) would point at the wrong line, or at 1:1
    with pytest.raises(RecipeError) as caught:
        execute_plan(plan, tmp_path / "out", progress=False, training_configs=False)
    assert [str(p).split(" has sha256")[0] for p in caught.value.problems] == [
        f"grow[every=4]:4:24: base_model.checksums.model.safetensors: {base / 'model.safetensors'}"
    ]


def test_hash_sources_reads_the_plan_not_the_recipe(tmp_path, tiny):
    """The plan alone decides: a plan whose recipe copy says nothing about pins is still checked."""
    from tli_recipe.errors import RecipeError
    from tli_recipe.plan.model import RecipeSpot, SourcePin
    from tli_recipe.source.checkpoint import open_checkpoint
    from tli_recipe.source.checksums import hash_sources

    base = tiny()
    plan = compile_plan(load_recipe(write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 4}}\n")))
    pin = SourcePin(
        checksums={"config.json": WRONG},
        checksums_at={
            "config.json": RecipeSpot(
                path=("base_model", "checksums", "config.json"),
                file="elsewhere.yaml",
                line=7,
                column=9,
                key_line=7,
                key_column=5,
            )
        },
    )
    plan = plan.model_copy(update={"pins": {str(base): pin}, "recipe": {}, "recipe_file": str(tmp_path / "gone.yaml")})
    with pytest.raises(RecipeError) as caught:
        hash_sources(plan, {str(base): open_checkpoint(base)})
    assert str(caught.value).startswith(
        f"elsewhere.yaml:7:9: base_model.checksums.config.json: {base / 'config.json'} has sha256"
    )
    digests = hash_sources(plan.model_copy(update={"pins": {}}), {str(base): open_checkpoint(base)})
    assert digests[str(base)]["config.json"] == sha(base / "config.json")


def _git(*args, cwd):
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_SYSTEM": os.devnull,
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_git_worktree_gives_its_revision(tmp_path, tiny):
    main = tmp_path / "main"
    shutil.copytree(tiny(layers=4), main)
    _git("init", "-q", "-b", "main", cwd=main)
    _git("add", "-A", cwd=main)
    _git("commit", "-qm", "m", cwd=main)
    _git("worktree", "add", "-q", "-b", "other", str(tmp_path / "wt"), cwd=main)
    commit = _git("rev-parse", "HEAD", cwd=tmp_path / "wt")
    assert (tmp_path / "wt" / ".git").is_file()
    warnings: list[str] = []
    assert source_revision(tmp_path / "wt", warnings) == (commit, "its git HEAD (a git worktree)") and not warnings
    _git("pack-refs", "--all", cwd=main)  # the branch now only in the main .git's packed-refs
    assert source_revision(tmp_path / "wt")[0] == commit


def test_a_git_file_pointing_elsewhere_is_ignored_without_echo(tmp_path, tiny):
    folder = tmp_path / "m"
    shutil.copytree(tiny(layers=4), folder)
    elsewhere = tmp_path / "secret-git"
    elsewhere.mkdir()
    (elsewhere / "HEAD").write_text(OTHER + "\n")  # a hex token that is no revision of this folder
    (elsewhere / "commondir").write_text(".\n")
    for text in (f"gitdir: {elsewhere}\n", f"{OTHER}\n"):
        (folder / ".git").write_text(text)
        warnings: list[str] = []
        assert source_revision(folder, warnings) is None
        assert len(warnings) == 1 and OTHER not in warnings[0] and str(elsewhere) not in warnings[0]
