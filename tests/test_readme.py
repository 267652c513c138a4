"""The README's shell examples run on a fresh clone: every ```bash block not marked ``no-test``.

Blocks marked ```bash no-test need a download or a GPU (`make demo`, `run` on real weights,
training). The others run in a copy of the repository (so `schema -o` and `render -o` write
into the copy), with the command `tli-recipe` of this tree on PATH and an empty Hugging Face cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


README = (ROOT / "README.md").read_text()
BLOCKS = runnable(README)


def test_the_readme_has_runnable_and_marked_blocks():
    assert len(BLOCKS) >= 2
    marked = [body for _, info, body in shell_blocks(README) if "no-test" in info.split()]
    assert any("make demo" in b for b in marked) and any(".demo/" in b for b in marked)
    every = "".join(body for _, body in BLOCKS)
    for command in ("validate", "plan", "schema", "render", "variants", "list", "diff"):
        assert f"tli-recipe {command} " in every or f"tli-recipe {command}\n" in every, command


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
@pytest.mark.parametrize("line,body", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, body, clone, tmp_path):
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
    assert result.returncode == 0, f"README.md:{line}: a block failed:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
