"""What every command shares about its output: a reader that stops early, and the files written with -o."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tli_recipe.recipe.schema import recipe_schema

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "recipes/llama3-8b-k4.yaml", "recipes/llama3.2-1b-k4.yaml"],  # wrapped in `reported`
        ["schema"],  # a long output
        ["architectures"],  # not wrapped: click's own handling
    ],
)
def test_a_reader_that_stops_early_ends_the_command_quietly(args):
    # `tli-recipe ... | head -2`: the reader is gone before the command writes; no "error: Broken pipe".
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tli_recipe", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the only reader: every write now fails with EPIPE
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "", err
    assert proc.returncode == 1  # as click exits on a closed pipe; a shell pipeline reports the last command's


def test_schema_o_creates_missing_folders_like_render(tmp_path, cli):
    target = tmp_path / "a" / "b" / "recipe.schema.json"
    result = cli("schema", "-o", target)
    assert result.exit_code == 0, result.stderr
    assert json.loads(target.read_text()) == recipe_schema()
    assert f"wrote {target} (created the folder {tmp_path / 'a'})" in result.stderr
    again = cli("schema", "-o", target)
    assert again.exit_code == 0 and f"unchanged {target}" in again.stderr
    target.write_text("{}\n")  # stale: a generated file is refreshed without --force
    assert cli("schema", "-o", target).exit_code == 0 and json.loads(target.read_text()) == recipe_schema()


def test_render_o_creates_missing_folders_and_says_so(tmp_path, cli):
    template = tmp_path / "t.yaml.j2"
    template.write_text("---\nvariables: {}\n---\nbase_model: /nonexistent/model\ninject: {every: 4}\n")
    target = tmp_path / "new" / "deeper" / "mine.yaml"
    result = cli("render", template, "-o", target)
    assert result.exit_code == 0, result.stderr
    assert "inject: {every: 4}" in target.read_text()
    assert f"wrote {target} (created the folder {tmp_path / 'new'})" in result.stderr


@pytest.mark.parametrize("command", ["schema", "render"])
def test_o_refuses_a_link_the_same_way(tmp_path, cli, command):
    template = tmp_path / "t.yaml.j2"
    template.write_text("---\nvariables: {}\n---\nbase_model: /nonexistent/model\ninject: {every: 4}\n")
    args = ["schema"] if command == "schema" else ["render", template]
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")  # dangling: writing through it would create a file elsewhere
    result = cli(*args, "-o", link)
    assert result.exit_code == 2
    assert f"{link} exists and is not a regular file; nothing was written" in result.stderr
    assert not (tmp_path / "elsewhere.json").exists()
