"""Broken recipes and their exact messages: tests/bad_recipes/<name>.yaml -> <name>.err.

Refresh the .err files with ``pytest tests/recipe/test_bad_recipes.py --update-golden`` and review the diff.
"""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

BAD = ROOT / "tests" / "bad_recipes"
CASES = sorted(BAD.glob("*.yaml"))
LINE = re.compile(r"^[^:]+:\d+:\d+: \S+: .+$")  # file:line:col: field.path: message
SET_LINE = re.compile(r"^--set \S+=\S*: \S+: .+$")  # an error located in a --set override: the option, whole


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths print relative to the repo root


def rel(path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_there_are_enough_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("recipe", CASES, ids=lambda p: p.stem)
def test_bad_recipe_message(cli, update_golden, recipe):
    result = cli("plan", rel(recipe))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    golden = recipe.with_suffix(".err")
    if update_golden:
        golden.write_text(result.stderr)
    assert result.stderr == golden.read_text()


@pytest.mark.parametrize("golden", sorted(BAD.glob("*.err")), ids=lambda p: p.stem)
def test_every_line_is_located(golden):
    lines = golden.read_text().splitlines()
    assert lines
    assert [line for line in lines if not LINE.match(line)] == []


def test_validate_reports_all_problems_at_once(cli):
    recipe = BAD / "multiple_errors.yaml"
    result = cli("validate", rel(recipe))
    assert result.exit_code == 2
    assert result.stderr == recipe.with_suffix(".err").read_text()
    lines = [int(line.split(":")[1]) for line in result.stderr.splitlines()]
    assert len(lines) >= 4 and lines == sorted(lines)


def test_set_fixes_a_broken_recipe(cli):
    result = cli("plan", rel(BAD / "every_zero.yaml"), "--set", "inject.every=4")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_set_error_is_located_in_the_override(cli):
    result = cli("plan", rel(BAD / "every_zero.yaml"), "--set", "inject.every=4", "--set", "inject.copies=0")
    assert result.exit_code == 2
    assert result.stderr == "--set inject.copies=0: inject.copies: must be >= 1, got 0\n"
    assert all(SET_LINE.match(line) for line in result.stderr.splitlines())


def test_a_missing_set_model_is_located_at_the_option_not_glued_to_it(cli, tmp_path):
    """`--set base_model=/x:1:18:` read as a path `/x:1:18`; the option is now shown whole."""
    missing = tmp_path / "no-such-model"
    result = cli("plan", rel(BAD / "every_zero.yaml"), "--set", "inject.every=4", "--set", f"base_model={missing}")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"--set base_model={missing}: base_model: '{missing}' is not a directory")
    assert f"{missing}:1:" not in result.stderr


def test_var_and_grid_options_are_shown_whole_too():
    from tli_recipe.errors import Problem

    assert str(Problem(("every",), "bad", "--grid every=2,x", 1, 15)) == "--grid every=2,x: every: bad"
    assert str(Problem(("every",), "bad", "recipes/x.yaml", 4, 10)) == "recipes/x.yaml:4:10: every: bad"
