"""Templates: the sandbox, typed variables, located errors, variants that write all or nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import CONFIGS, RECIPES, ROOT, write_recipe

from tli_recipe.errors import RecipeError
from tli_recipe.library.templates import read_template, render_recipe

TEMPLATES = sorted((RECIPES / "templates").glob("*.yaml.j2"))

SMALL = """---
variables:
  every: {type: int, default: 4, min: 1, help: K}
  dtype: {type: str, default: bfloat16, choices: [float32, bfloat16]}
  base: {type: str, default: meta-llama/Llama-3.2-1B}
---
# {{ plan.layers_before }} -> {{ plan.layers_after }} layers
name: small-k{{ every }}
base_model: {{ base }}
dtype: {{ dtype }}
inject: {every: {{ every }}}
"""


def template_file(tmp_path, text: str, name: str = "t.yaml.j2"):
    return write_recipe(tmp_path, text, name)


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
        "--var every=x:1:13: every: 'x' is not an int; expected an integer such as 4 (K)",
        "--var evry=2:1:12: evry: unknown variable 'evry' (did you mean 'every'?); expected one of: every, dtype, base",
        "--var dtype=bf16:1:13: dtype: 'bf16' is not allowed (did you mean 'bfloat16'?); expected one of: 'float32', 'bfloat16'",
        "--var every=0:1:13: every: must be >= 1, got 0 (K)",
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


def test_variants_with_one_invalid_combination_write_nothing_and_name_it(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    out = tmp_path / "out"
    result = cli("variants", t, "--grid", "every=2,64,4,40", "--out-dir", out, "--configs", CONFIGS)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert not out.exists()
    assert result.stderr.splitlines() == [
        "2 of 4 combinations are invalid; nothing was written",
        f"combination every=64 ({out / 'small-k64.yaml'}):",
        f"{out / 'small-k64.yaml'}:5:17: inject.every: 64 is larger than the 16 layers of the stack of "
        f"{CONFIGS / 'meta-llama__Llama-3.2-1B'}; no layer would be injected; expected every <= 16",
        f"combination every=40 ({out / 'small-k40.yaml'}):",
        f"{out / 'small-k40.yaml'}:5:17: inject.every: 40 is larger than the 16 layers of the stack of "
        f"{CONFIGS / 'meta-llama__Llama-3.2-1B'}; no layer would be injected; expected every <= 16",
    ]
    # A schema error (not a plan-time one) is located the same way, and nothing is written either.
    bad_dtype = template_file(tmp_path, SMALL.replace("dtype: {{ dtype }}", "dtype: {{ dtype }}{{ '16' if every == 8 else '' }}"), "b.yaml.j2")
    result = cli("variants", bad_dtype, "--grid", "every=4,8", "--out-dir", out, "--configs", CONFIGS)
    assert result.exit_code == 2 and not out.exists()
    assert f"{out / 'small-k8.yaml'}:4:8: dtype: 'bfloat1616' is not a valid dtype" in result.stderr


def test_variants_write_every_combination_and_print_a_table(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    out = tmp_path / "out"
    result = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["small-k2.yaml", "small-k4.yaml", "small-k8.yaml"]
    rows = result.stdout.splitlines()
    assert rows[0].split() == ["name", "file", "layers", "parameters", "counts", "from", "status"]
    assert rows[1].split()[:6] == ["small-k2", str(out / "small-k2.yaml"), "16", "->", "24", "1.72B"]
    assert rows[1].endswith("stored config  written")
    # Again: unchanged; a changed grid value with the same name needs --force; --check reports drift.
    assert cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS).stdout.count("unchanged") == 3
    (out / "small-k4.yaml").write_text("edited\n")
    clash = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS)
    assert clash.exit_code == 2 and "pass --force" in clash.stderr and (out / "small-k4.yaml").read_text() == "edited\n"
    check = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS, "--check")
    assert check.exit_code == 1 and "1 of 3 recipes differ" in check.stderr
    forced = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS, "--force")
    assert forced.exit_code == 0 and "replaced" in forced.stdout


def test_variants_refuse_names_that_collide(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    result = cli("variants", t, "--grid", "dtype=float32,bfloat16", "--out-dir", tmp_path / "out", "--configs", CONFIGS)
    assert result.exit_code == 2
    assert "the combinations dtype=float32 and dtype=bfloat16 both render to small-k4.yaml" in result.stderr


def test_matrix_file_is_a_shareable_sweep(tmp_path, cli):
    template_file(tmp_path, SMALL)
    matrix = write_recipe(tmp_path, f"template: t.yaml.j2\nout_dir: made\nconfigs: [{CONFIGS}]\nvars: {{dtype: float32}}\n"
                                    "grid:\n  every: [2, 8]\n", "sweep.yaml")
    result = cli("variants", matrix)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["small-k2.yaml", "small-k8.yaml"]
    assert "dtype: float32" in (tmp_path / "made" / "small-k2.yaml").read_text()
    bad = write_recipe(tmp_path, "template: t.yaml.j2\ngrid:\n  evry: [2]\n  every: [2, x]\n", "bad.yaml")
    result = cli("variants", bad)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{bad}:3:3: evry: unknown variable 'evry' (did you mean 'every'?); expected one of: every, dtype, base",
        f"{bad}:4:14: every: 'x' is not an int; expected a value of type int (K)",
    ]
    assert cli("variants", matrix, "--grid", "every=2").exit_code == 2


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
