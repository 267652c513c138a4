"""Templates (library/templates.py, library/values.py): the sandbox, typed variables, located errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import CONFIGS, RECIPES, ROOT
from small_template import SMALL, template_file

from tli_recipe.errors import RecipeError
from tli_recipe.library.templates import read_template, render_recipe

TEMPLATES = sorted((RECIPES / "templates").glob("*.yaml.j2"))



def test_templates_exist():
    assert {p.name for p in TEMPLATES} >= {"tli.yaml.j2", "dus.yaml.j2", "llama-pro.yaml.j2"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_template_renders_with_its_defaults(template, cli):
    result = cli("render", template, "--configs", CONFIGS)
    assert result.exit_code == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["base_model"] and data["name"]
    # The header's numbers come from the plan of what was rendered.
    rendered = render_recipe(read_template(template), {k: v.default for k, v in read_template(template).variables.items()},
                             "x.yaml", [CONFIGS])
    t = rendered.plan.totals
    assert f"{t.layers_before} -> {t.layers_after} layers" in result.stdout
    assert f"{t.parameters_before:,} -> {t.parameters_after:,} parameters" in result.stdout


def test_render_typed_vars_and_plan_numbers(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    out = tmp_path / "r.yaml"
    result = cli("render", t, "--var", "every=2", "--var", "dtype=float32", "-o", out, "--configs", CONFIGS)
    assert result.exit_code == 0, result.stderr
    text = out.read_text()
    assert "# 16 -> 24 layers" in text and "inject: {every: 2}" in text and "dtype: float32" in text
    assert cli("validate", out).exit_code == 0


def test_var_values_are_typed_and_checked_and_typos_listed(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    result = cli("render", t, "--var", "every=x", "--var", "evry=2", "--var", "dtype=bf16", "--var", "every=0")
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "--var every=x: every: 'x' is not an int; expected an integer such as 4 (K)",
        "--var evry=2: evry: unknown variable 'evry' (did you mean 'every'?); expected one of: every, dtype, base",
        "--var dtype=bf16: dtype: 'bf16' is not allowed (did you mean 'bfloat16'?); expected one of: 'float32', 'bfloat16'",
        "--var every=0: every: must be >= 1, got 0 (K)",
    ]


def test_required_variable_without_value_points_at_its_declaration(tmp_path, cli):
    t = template_file(tmp_path, "---\nvariables:\n  base: {type: str, help: hub id}\n---\nbase_model: {{ base }}\n")
    result = cli("render", t)
    assert result.exit_code == 2
    assert result.stderr == f"{t}:3:3: base: has no default and no value; expected --var base=VALUE (hub id)\n"


def test_front_matter_errors_are_located(tmp_path, cli):
    t = template_file(tmp_path, "---\nvariables:\n  every: {type: integer}\n  k: {type: int, default: two}\n  plan: {type: str, default: x}\n---\nbase_model: x\n")
    result = cli("render", t)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == (f"{t}:3:17: variables.every.type: 'integer' is not a valid type (did you mean 'int'?); "
                        "expected one of: str, int, float, bool, list, mapping")
    t2 = template_file(tmp_path, "---\nvariables:\n  k: {type: int, default: two}\n  plan: {type: str, default: x}\n---\nbase_model: x\n", "t2.yaml.j2")
    lines = cli("render", t2).stderr.splitlines()
    assert lines == [f"{t2}:3:27: variables.k.default: 'two' is not an int; expected a value of type int",
                     f"{t2}:4:3: variables.plan: 'plan' is reserved (the rendered recipe's plan); expected letters, digits and '_', not starting with a digit"]


def test_min_and_max_on_a_non_numeric_variable_is_a_located_error(tmp_path, cli):
    t = template_file(tmp_path, "---\nvariables:\n  base: {type: str, default: x, min: 1}\n---\nbase_model: x\n")
    result = cli("render", t)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith(f"{t}:3:")
    assert "min and max apply to int and float variables" in result.stderr


def test_template_errors_are_located_in_the_template_file(tmp_path, cli):
    front = "---\nvariables:\n  every: {type: int, default: 4}\n---\n"
    syntax = template_file(tmp_path, front + "base_model: x\ninject: {every: {{ every }\n", "syntax.yaml.j2")
    result = cli("render", syntax)
    assert result.exit_code == 2 and result.stderr.startswith(f"{syntax}:6:1: template: unexpected '}}'")
    undeclared = template_file(tmp_path, front + "base_model: x\n\ninject: {every: {{ evry }}}\n", "undeclared.yaml.j2")
    result = cli("render", undeclared)
    assert result.stderr == (f"{undeclared}:7:1: template: 'evry' is not a declared variable (did you mean 'every'?); "
                             "expected one of: every, or declare it in the front matter\n")


def test_rendered_recipe_errors_are_located_in_the_rendered_text(tmp_path, cli):
    t = template_file(tmp_path, "---\nvariables:\n  every: {type: int, default: 0}\n---\nbase_model: x\ninject: {every: {{ every }}}\n")
    result = cli("render", t, "-o", tmp_path / "out.yaml")
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'out.yaml'}:2:17: inject.every: must be >= 1, got 0\n"
    assert not (tmp_path / "out.yaml").exists()


@pytest.mark.parametrize("body, refused", [
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ cycler.__init__.__globals__ }}", "access to attribute '__init__'"),
    ("{{ ''|attr('__class__') }}", "access to attribute '__class__'"),
    ("{{ '{0.__class__}'.format(1) }}", "access to attribute '__class__'"),
    ("{{ [1].append(2) }}", "access to attribute 'append' of 'list' object is unsafe"),
    ("{{ 'x' * 100000000 }}", "larger than the sandbox allows"),
])
def test_sandbox_refuses_python_internals(tmp_path, cli, body, refused):
    t = template_file(tmp_path, f"base_model: x\n# line 2\nname: {body}\n")
    result = cli("render", t)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{t}:3:1: template: refused by the sandbox: ")
    assert refused in result.stderr and "not Python internals" in result.stderr


@pytest.mark.parametrize("body, message", [
    ("{% include '/etc/passwd' %}", "templates cannot include, import or extend other files (no file access)"),
    ("{% import 'os' as os %}", "templates cannot include, import or extend other files"),
    ("{% extends 'base.yaml.j2' %}", "templates cannot include, import or extend other files"),
    ("{{ environ }}", "'environ' is not a declared variable"),
    ("{{ os.environ }}", "'os' is not a declared variable"),
    ("{{ lipsum() }}", "'lipsum' is not a declared variable"),
    ("{{ [1, 2]|random }}", "No filter named 'random'"),
    ("{{ self.__init__ }}", "refused by the sandbox"),
])
def test_sandbox_has_no_files_environment_or_randomness(tmp_path, cli, body, message):
    (tmp_path / "base.yaml.j2").write_text("secret: 1\n")
    t = template_file(tmp_path, f"---\nvariables: {{}}\n---\nbase_model: x\nname: {body}\n")
    result = cli("render", t)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert "secret" not in result.stdout + result.stderr


def test_recipe_data_must_not_depend_on_the_plan(tmp_path, cli):
    t = template_file(tmp_path, "base_model: meta-llama/Llama-3.2-1B\nname: x{{ plan.layers_after }}\n")
    result = cli("render", t, "--configs", CONFIGS)
    assert result.exit_code == 2
    assert "the recipe's data depends on `plan`; expected `plan` in comments only" in result.stderr


def test_plan_in_a_template_needs_the_models_config(tmp_path, cli):
    t = template_file(tmp_path, "# {{ plan.layers_after }}\nbase_model: nobody/nothing\n")
    result = cli("render", t, "--configs", CONFIGS)
    assert result.exit_code == 2
    assert "uses `plan` (layer and parameter counts), which needs the config of nobody/nothing" in result.stderr
    assert "nobody__nothing/config.json" in result.stderr


def test_render_does_not_touch_the_plan_fast_path():
    """validate, plan, list and diff import neither jinja2 nor torch."""
    recipe = str(RECIPES / "llama3.2-1b-k4.yaml")
    calls = [["validate", recipe], ["plan", recipe, "--set", f"base_model={CONFIGS / 'meta-llama__Llama-3.2-1B'}"],
             ["list", str(RECIPES), "--configs", str(CONFIGS)], ["diff", recipe, recipe, "--configs", str(CONFIGS)]]
    code = ("import sys; from tli_recipe.cli import main\n"
            f"for args in {calls!r}:\n    try:\n        main(args)\n    except SystemExit as exit:\n        assert not exit.code, args\n"
            "bad = [m for m in ('jinja2', 'torch', 'transformers') if m in sys.modules]\nassert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_read_template_without_front_matter_takes_string_variables(tmp_path):
    t = read_template(template_file(tmp_path, "base_model: {{ base }}\nname: {{ name }}\n"))
    assert sorted(t.variables) == ["base", "name"] and all(v.type == "str" and v.required for v in t.variables.values())
    with pytest.raises(RecipeError, match="is never closed"):
        read_template(template_file(tmp_path, "---\nvariables: {}\nbase_model: x\n", "open.yaml.j2"))
