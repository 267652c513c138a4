"""The library by name from any folder: the working directory's recipes/ first, then the library that
comes with tli-recipe (a wheel's copy, or the checkout the package runs from); and rendered recipes
whose $schema link resolves from where they are written."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from conftest import ROOT

from tli_recipe.library import catalog


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the checkout, without a recipes/ folder."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def schema_target(recipe: Path) -> Path:
    """The file a recipe's `# yaml-language-server: $schema=` line points at."""
    line = next(x for x in recipe.read_text().splitlines() if x.startswith("# yaml-language-server: $schema="))
    link = line.split("=", 1)[1]
    if link.startswith("file://"):
        return Path(unquote(urlparse(link).path))
    return (recipe.parent / link).resolve()


def test_names_resolve_to_the_installed_library_outside_a_checkout(elsewhere, cli):
    assert catalog.installed_library() == ROOT  # this test session runs the package from its checkout
    result = cli("render", "tli", "--var", "base=Qwen/Qwen3-4B", "--var", "every=2", "-o", "out/qwen3-4b-k2.yaml")
    assert result.exit_code == 0, result.stderr
    assert (
        f"note: tli: from the library installed with tli-recipe ({ROOT / 'recipes' / 'templates' / 'tli.yaml.j2'})"
        in result.stderr
    )
    written = elsewhere / "out" / "qwen3-4b-k2.yaml"
    assert "inject:\n  every: 2" in written.read_text()
    assert schema_target(written) == ROOT / "schemas" / "recipe.schema.json"
    # The README's paths work too, from another folder.
    same = cli("render", "recipes/templates/tli.yaml.j2", "--var", "base=Qwen/Qwen3-4B", "--var", "every=2")
    assert same.exit_code == 0 and "every: 2" in same.stdout
    listed = cli("list")
    assert listed.exit_code == 0 and "qwen3-4b-k4" in listed.stdout and "llama3.2-1b-k8" in listed.stdout
    assert "note: no recipes/ folder here; the library installed with tli-recipe" in listed.stderr
    planned = cli("plan", "qwen3-4b-k4")
    assert planned.exit_code == 0 and "36 -> 45" in planned.stdout  # from the stored config (offline)
    assert cli("validate", "llama3.2-1b-k4").exit_code == 0
    diffed = cli("diff", "llama3.2-1b-k4", "llama3.2-1b-k8")
    assert diffed.exit_code == 0 and "inject.every: 4 -> 8" in diffed.stdout
    assert cli("variants", "llama", "--check").exit_code == 0


def test_the_working_directorys_recipes_win(elsewhere, cli):
    (elsewhere / "recipes" / "templates").mkdir(parents=True)
    mine = elsewhere / "recipes" / "templates" / "tli.yaml.j2"
    mine.write_text("---\nvariables: {}\n---\nbase_model: /my/model\ninject: {every: 3}\n")
    (elsewhere / "recipes" / "mine.yaml").write_text("base_model: /my/model\ninject: {every: 5}\n")
    result = cli("render", "tli")
    assert result.exit_code == 0 and "every: 3" in result.stdout and "note:" not in result.stderr
    listed = cli("list")
    assert "mine" in listed.stdout and "qwen3-4b-k4" not in listed.stdout
    # A name this folder lacks still comes from the installed library.
    other = cli("render", "dus")
    assert other.exit_code == 0 and "note: dus: from the library installed with tli-recipe" in other.stderr


def test_a_name_that_is_nowhere_is_reported_as_the_missing_file(elsewhere, cli):
    result = cli("render", "no-such-template")
    assert result.exit_code == 2 and "no-such-template" in result.stderr and "Traceback" not in result.stderr
    assert catalog.find_in_library("../recipes/tli", "template") == "../recipes/tli"  # never a path that climbs


def test_a_matrix_of_the_installed_wheel_writes_only_with_out_dir(elsewhere, cli, monkeypatch):
    monkeypatch.setattr(catalog, "INSTALLED_LIBRARY", ROOT)  # as if the checkout were a wheel's copy
    result = cli("variants", "llama")
    assert result.exit_code == 2 and "is the library installed with tli-recipe" in result.stderr
    assert "give --out-dir DIR" in result.stderr
    written = cli("variants", "llama", "--out-dir", "mine")
    assert written.exit_code == 0, written.stderr
    recipe = elsewhere / "mine" / "llama3.2-1b-k4.yaml"
    assert recipe.is_file() and schema_target(recipe) == ROOT / "schemas" / "recipe.schema.json"


@pytest.mark.parametrize("where", ["out/recipes", "deep/er/still"])
def test_rendered_schema_links_resolve_from_where_the_recipe_is_written(where, cli, tmp_path):
    target = tmp_path / where / "qwen3-4b-k2.yaml"
    template = ROOT / "recipes" / "templates" / "tli.yaml.j2"
    result = cli("render", template, "--var", "base=Qwen/Qwen3-4B", "--var", "every=2", "-o", target)
    assert result.exit_code == 0, result.stderr
    assert schema_target(target) == ROOT / "schemas" / "recipe.schema.json"
    # Standard output: linked from the working directory.
    printed = cli("render", template, "--var", "base=Qwen/Qwen3-4B")
    link = ROOT / "schemas" / "recipe.schema.json"
    assert f"$schema={os.path.relpath(link)}\n" in printed.stdout or f"$schema={link.as_uri()}\n" in printed.stdout


# Rendering into the checkout's recipes/ keeps the committed link (../schemas/recipe.schema.json): every
# committed recipe is re-rendered and compared by test_library.py::test_committed_recipes_match_their_templates.
