"""Loading a recipe: recipe-relative paths, the input guards of recipe/read.py, one non-finite check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tli_recipe import load_recipe
from tli_recipe.errors import RecipeError
from tli_recipe.recipe import read
from tli_recipe.recipe.validate import non_finite

RECIPE = """base_model: org/x
output: {output}
stages:
  - name: s
    trainable: [all]
    datasets: [{{path: {data}}}]
"""


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The recipe lives in tmp_path/shared/recipes; the command runs from tmp_path/cwd."""
    folder = tmp_path / "shared" / "recipes"
    folder.mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return folder


def test_recipe_paths_resolve_against_the_recipe_folder_not_the_cwd(elsewhere):
    path = elsewhere / "r.yaml"
    path.write_text(RECIPE.format(output="../grown", data="data/train.jsonl"))
    recipe = load_recipe(path).recipe
    assert recipe.output == str(elsewhere.parent / "grown")
    assert recipe.stages[0].datasets[0].path == str(elsewhere / "data" / "train.jsonl")


def test_a_relative_recipe_path_still_resolves_against_its_folder(elsewhere):
    (elsewhere / "r.yaml").write_text(RECIPE.format(output="out/a", data="d.txt"))
    os.chdir(elsewhere.parent)
    recipe = load_recipe(Path("recipes/r.yaml")).recipe
    assert recipe.output == str(elsewhere / "out" / "a")


def test_absolute_and_home_paths_are_kept(elsewhere):
    path = elsewhere / "r.yaml"
    path.write_text(RECIPE.format(output="/srv/grown", data="~/corpus.txt"))
    recipe = load_recipe(path).recipe
    assert recipe.output == "/srv/grown"
    assert recipe.stages[0].datasets[0].path == os.path.expanduser("~/corpus.txt")


def test_set_values_stay_relative_to_the_working_directory(elsewhere):
    path = elsewhere / "r.yaml"
    path.write_text(RECIPE.format(output="../grown", data="d.txt"))
    recipe = load_recipe(path, ["output=mine", "stages[0].datasets[0].path=here.txt"]).recipe
    assert recipe.output == str(Path.cwd() / "mine")
    assert recipe.stages[0].datasets[0].path == str(Path.cwd() / "here.txt")


def test_no_output_keeps_the_default(elsewhere):
    path = elsewhere / "r.yaml"
    path.write_text("base_model: org/x\n")
    assert load_recipe(path).recipe.output is None  # the plan's default out/<name>, in the working directory


def test_a_rendered_recipe_resolves_against_the_folder_of_its_label(elsewhere):
    label = elsewhere / "made" / "v.yaml"
    recipe = load_recipe(label, text=RECIPE.format(output="out", data="d.txt")).recipe
    assert recipe.output == str(elsewhere / "made" / "out")


def test_at_most_the_cap_plus_one_byte_is_read(tmp_path, monkeypatch):
    """A file that grows after its stat (or lies about its size) is still read only up to the cap + 1."""
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (3 * read.MAX_BYTES))
    real_stat, real_read, got = os.stat, os.read, []

    class Small:
        def __init__(self, info):
            self.st_mode, self.st_size = info.st_mode, 10

    monkeypatch.setattr(read.os, "stat", lambda p: Small(real_stat(p)))
    monkeypatch.setattr(read.os, "read", lambda fd, n: got.append(n) or real_read(fd, n))
    with pytest.raises(RecipeError, match="larger than 1048576 bytes"):
        read.read_bytes(big, "recipe file", "a recipe")
    assert got and sum(got) <= read.MAX_BYTES + 1


def test_a_file_of_exactly_the_cap_is_read(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"base_model: org/x\n" + b"#" * (read.MAX_BYTES - 19) + b"\n")
    assert len(read.read_bytes(path, "recipe file", "a recipe")) == read.MAX_BYTES


def test_non_finite_walks_every_value_without_recursion():
    deep: object = 1.0
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    assert non_finite({"a": deep}) == []
    assert non_finite({"a": [1, {"b": float("nan")}], "c": float("-inf")}) == [
        (("a", 1, "b"), ".nan is not a finite number; expected a finite number"),
        (("c",), "-.inf is not a finite number; expected a finite number"),
    ]


def test_aliases_are_refused_in_every_yaml_reader():
    with pytest.raises(RecipeError, match=r"YAML aliases \(\*a\)"):
        read.load_data("x: &a [1]\ny: *a\n", "<text>")
    assert read.load_data("x: &a [1]\n", "<text>") == {"x": [1]}  # an anchor alone expands nothing
