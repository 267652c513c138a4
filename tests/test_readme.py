"""The README and the docs/ pages: their shell examples run on a fresh clone, their links resolve.

Every ```bash block not marked ``no-test`` of README.md and docs/*.md runs. Blocks marked
```bash no-test need a download or a GPU (`make demo`, `run` on real weights, training). The
others run in a copy of the repository (so `schema -o` and `render -o` write into the copy),
with the command `tli-recipe` of this tree on PATH and an empty Hugging Face cache.
Every ```yaml block that is a whole recipe (it has `base_model`) must pass `tli-recipe validate`,
and every relative link of those pages (and its #anchor) must name a file of the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```$", re.M | re.S)
SKIPPED = ("no-test",)


def shell_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, info string, body) of every fenced block whose language is bash or sh."""
    out = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        if words and words[0] in ("bash", "sh", "shell", "console"):
            out.append((text.count("\n", 0, match.start()) + 1, match["info"], match["body"]))
    return out


def runnable(text: str) -> list[tuple[int, str]]:
    return [(line, body) for line, info, body in shell_blocks(text) if not set(info.split()[1:]) & set(SKIPPED)]


def test_the_extractor_sees_the_markers():
    text = "a\n```bash\necho one\n```\n```bash no-test\nmake demo\n```\n```python\nx = 1\n```\n```bash\necho two\n```\n"
    assert [(info, body) for _, info, body in shell_blocks(text)] == [
        ("bash", "echo one\n"),
        ("bash no-test", "make demo\n"),
        ("bash", "echo two\n"),
    ]
    assert runnable(text) == [(2, "echo one\n"), (11, "echo two\n")]


# The front page and the reference pages: their shell blocks, recipes and links.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()
BLOCKS = [(f"{page.relative_to(ROOT)}:{line}", body) for page in PAGES for line, body in runnable(page.read_text())]


def test_the_readme_has_runnable_and_marked_blocks():
    assert len(runnable(README)) >= 2
    marked = [body for _, info, body in shell_blocks(README) if "no-test" in info.split()]
    assert any("make demo" in b for b in marked) and any(".demo/" in b for b in marked)
    assert any("make test" in b for b in marked)  # the front page's two commands


def test_the_pages_run_every_command_that_needs_no_model():
    """The blocks of README.md and docs/ together run each command that works on a fresh clone."""
    pages_with_blocks = {where.rsplit(":", 1)[0] for where, _ in BLOCKS}
    assert {"README.md", "docs/library.md", "docs/upcycling.md"} <= pages_with_blocks, pages_with_blocks
    every = "".join(body for _, body in BLOCKS)
    for command in ("validate", "plan", "schema", "render", "variants", "list", "diff"):
        assert f"tli-recipe {command} " in every or f"tli-recipe {command}\n" in every, command


def test_the_tour_shows_the_demo_recipe():
    """The front page's recipe is the committed one the demo grows, key for key (comments aside)."""
    blocks = [m["body"] for m in FENCE.finditer(README) if m["info"].split()[:1] == ["yaml"]]
    shown = [yaml.safe_load(b) for b in blocks if "name: smollm2-135m-k4\n" in b]
    assert len(shown) == 1
    assert shown[0] == yaml.safe_load((ROOT / "recipes" / "smollm2-135m-k4.yaml").read_text())


def recipe_blocks(text: str) -> list[tuple[int, str]]:
    """(line, body) of every ```yaml block that is a whole recipe (a mapping with `base_model`), not marked no-test."""
    out = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        if words[:1] == ["yaml"] and not set(words[1:]) & set(SKIPPED):
            try:
                data = yaml.safe_load(match["body"])
            except yaml.YAMLError:  # a template's front matter and body: not a recipe
                continue
            if isinstance(data, dict) and "base_model" in data:
                out.append((text.count("\n", 0, match.start()) + 1, match["body"]))
    return out


RECIPE_BLOCKS = [
    (f"{page.relative_to(ROOT)}:{line}", body) for page in PAGES for line, body in recipe_blocks(page.read_text())
]


def test_the_recipe_blocks_are_found():
    text = "```yaml\nbase_model: a/b\n```\n```yaml no-test\nbase_model: {path: a/b}\n```\n```yaml\nstages: []\n```\n"
    assert recipe_blocks(text) == [(1, "base_model: a/b\n")]
    pages = {where.rsplit(":", 1)[0] for where, _ in RECIPE_BLOCKS}
    assert {"README.md", "docs/recipes.md", "docs/upcycling.md"} <= pages, pages


@pytest.mark.parametrize("where,body", RECIPE_BLOCKS, ids=[where for where, _ in RECIPE_BLOCKS])
def test_a_recipe_shown_in_the_docs_validates(where, body, tmp_path, cli):
    """A recipe on a page is a recipe `tli-recipe validate` accepts (validate reads no model)."""
    recipe = tmp_path / "shown.yaml"
    recipe.write_text(body)
    result = cli("validate", recipe)
    assert result.exit_code == 0, f"{where}: the recipe shown there does not validate:\n{result.stderr}"


# Links: [text](target) and ![alt](target) outside code; the target ends at the first space or ")".
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, with the line breaks kept (for line numbers)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link of a Markdown page."""
    body = prose(text)
    return [(body.count("\n", 0, m.start()) + 1, m[1]) for m in LINK.finditer(body)]


def anchors(text: str) -> set[str]:
    """The #anchors GitHub gives the headings of a page: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered (-1, -2...)."""
    seen: dict[str, int] = {}
    out = set()
    outside_fences = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", outside_fences, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path, root: Path) -> list[str]:
    """`page:line: target: why` for every relative link of `page` that names no file of `root`."""
    problems = []
    for line, target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... (not checked offline)
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{line}: {target}"
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: no such file or folder")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            problems.append(f"{where}: no heading #{anchor} in {resolved.name}")
    return problems


def test_the_link_checker_sees_links_and_anchors():
    text = (
        '# Hub ids\n\nSee [a](docs/a.md), ![b](img/b.png "title") and [c](https://x.org/c).\n'
        "`[not](a link)`\n```\n[nor](this)\n```\n## What `verify` checks (exactly)\n## Hub ids\n"
    )
    assert links(text) == [(3, "docs/a.md"), (3, "img/b.png"), (3, "https://x.org/c")]
    assert anchors(text) == {"hub-ids", "what-verify-checks-exactly", "hub-ids-1"}


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Top\n[ok](docs/a.md#a-page) [gone](docs/gone.md)\n")
    (tmp_path / "docs" / "a.md").write_text("# A page\n[up](../README.md#top) [bad](../README.md#nothing)\n")
    (tmp_path / "docs" / "b.md").write_text("[out](../../elsewhere.md) [self](#no-such)\n")
    found = [p for page in ("README.md", "docs/a.md", "docs/b.md") for p in broken_links(tmp_path / page, tmp_path)]
    assert found == [
        "README.md:2: docs/gone.md: no such file or folder",
        "docs/a.md:2: ../README.md#nothing: no heading #nothing in README.md",
        "docs/b.md:1: ../../elsewhere.md: points outside the repository",
        "docs/b.md:1: #no-such: no heading #no-such in b.md",
    ]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert broken_links(page, ROOT) == []


@pytest.mark.parametrize("index", ["docs/README.md", "README.md"])
def test_the_docs_index_and_the_front_page_list_every_page(index):
    index = ROOT / index
    listed = {(index.parent / target.partition("#")[0]).resolve() for _, target in links(index.read_text())}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")} - {(ROOT / "docs" / "README.md").resolve()}
    assert len(pages) >= 10
    assert sorted(p.name for p in pages - listed) == [], f"add a row for each page to {index.relative_to(ROOT)}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's tracked files as a fresh clone has them (no .venv, .demo or out/)."""
    target = tmp_path_factory.mktemp("clone") / "tli-recipe"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.split("\0")):
            if (ROOT / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, target / name)
    else:  # not a git checkout (an sdist): copy what is there, without local state
        shutil.copytree(
            ROOT,
            target,
            ignore=shutil.ignore_patterns(".git", ".venv*", ".demo", "out", "__pycache__", ".pytest_cache"),
        )
    # A clone is a git work tree: matrices may name templates anywhere in it (library/variants.py).
    if subprocess.run(["git", "init", "-q"], cwd=target, capture_output=True).returncode != 0:
        (target / ".git").mkdir()
    return target


@pytest.mark.slow
@pytest.mark.parametrize("where,body", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_readme_block_runs(where, body, clone, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "tli-recipe"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m tli_recipe "$@"\n')
    launcher.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(clone),
        "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("TLI_RECIPE_CONFIGS", None)
    script = "set -eux\n" + body
    result = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{where}: a block failed:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
