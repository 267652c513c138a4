"""Templates -> plain YAML recipes: sandboxed jinja2, typed variables, variants.

A template (``recipes/templates/*.yaml.j2``) is YAML front matter declaring its
variables, then a jinja2 body that renders to a recipe::

    ---
    description: TLI growth of one model
    variables:
      base: {type: str, help: hub id of the model to grow}
      every: {type: int, default: 4, min: 1}
    ---
    base_model: {{ base }}
    inject: {every: {{ every }}}

A shared template is untrusted input. It runs in jinja2's immutable sandbox with
undefined names as errors: no attribute access to Python internals, no method that
mutates, no file access (no loader: include, import and extends fail), no environment,
and no source of randomness (``random`` and ``lipsum`` are removed), so a template
renders the same text every time. ``plan`` is a reserved name: the layer and
parameter counts of the rendered recipe's plan, for comment headers (rendered twice,
and the recipe data must not depend on it). jinja2 is imported only here.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional

import jinja2
import jinja2.meta
import yaml
from jinja2 import StrictUndefined, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from pydantic import Field

from tli_recipe.errors import Problem, RecipeError, TliError, did_you_mean, show
from tli_recipe.recipe.load import (
    LoadedRecipe,
    Marks,
    load_recipe,
    read_recipe,
    read_text,
    validate_model,
)
from tli_recipe.recipe.schema import Strict

TYPES = ("str", "int", "float", "bool", "list", "mapping")
RESERVED = ("plan",)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Largest string or list a template may build with * (a shared template must not exhaust memory).
MAX_SIZE = 1_000_000


# --- front matter -------------------------------------------------------------------

class Variable(Strict):
    """One template variable: its type, default and allowed values."""

    type: Literal["str", "int", "float", "bool", "list", "mapping"] = Field(default="str", description="Type of the value: --var values are parsed and checked as this type.")
    default: Any = Field(default=None, description="Value when none is given; without a default the variable is required.")
    choices: Optional[list[Any]] = Field(default=None, min_length=1, description="The allowed values.")
    min: Optional[float] = Field(default=None, description="Smallest allowed value (int and float).")
    max: Optional[float] = Field(default=None, description="Largest allowed value (int and float).")
    help: Optional[str] = Field(default=None, description="What the variable means, shown in errors.")

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


class FrontMatter(Strict):
    """The YAML between the two ``---`` lines at the top of a template."""

    description: Optional[str] = Field(default=None, description="What the template makes.")
    variables: dict[str, Variable] = Field(default_factory=dict, description="The variables the body may use.")


@dataclass
class Template:
    """A parsed template: its variables and its compiled body."""

    file: str
    body: str
    offset: int  # lines before the body (front matter), added to jinja's line numbers
    description: Optional[str]
    variables: dict[str, Variable]
    marks: Optional[Marks]  # positions in the front matter
    uses_plan: bool
    compiled: Any = field(repr=False, default=None)

    def where(self, name: str) -> tuple[str, int, int]:
        if self.marks is not None:
            return self.marks.locate(("variables", name), prefer_key=True)
        return (self.file, 1, 1)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, also refusing huge ``*`` and ``**`` results."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SIZE:
                    raise SecurityError(f"a sequence of {len(seq) * n} items is larger than the sandbox allows ({MAX_SIZE})")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
            raise SecurityError(f"exponent {right} is larger than the sandbox allows (256)")
        return super().call_binop(context, operator, left, right)


def _human(n: Any) -> str:
    from tli_recipe.plan.report import human_count

    return human_count(int(n))


def environment() -> jinja2.Environment:
    """The sandbox every template renders in: no loader, no randomness, undefined names are errors."""
    env = _Sandbox(undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                   autoescape=False)
    env.globals.pop("lipsum", None)
    env.filters.pop("random", None)
    env.filters["human"] = _human  # 1235814400 -> 1.24B
    return env


def _split_front_matter(text: str) -> tuple[Optional[str], str, int]:
    """(front matter text with its line numbers kept, body, lines before the body)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n") != "---":
        return None, text, 0
    for i, line in enumerate(lines[1:], 1):
        if line.rstrip("\r\n") == "---":
            return "\n" + "".join(lines[1:i]), "".join(lines[i + 1:]), i + 1
    return "", "", -1


def read_template(path: str | Path, text: Optional[str] = None) -> Template:
    """Read and check a template: front matter, body syntax, names the body uses."""
    file = str(path)
    if text is None:
        text = read_text(path, "template", "a path to a .yaml.j2 template")
    front, body, offset = _split_front_matter(text)
    if offset < 0:
        raise RecipeError([Problem(("front matter",), "the front matter opened by '---' on line 1 is never closed; "
                                   "expected a second '---' line", file, 1, 1)])
    marks, matter = None, FrontMatter()
    if front is not None and front.strip():
        data, marks = read_recipe(file, text=front)
        matter = validate_model(FrontMatter, data, marks)
        problems = []
        for name, var in matter.variables.items():
            problems += [marks.problem(("variables", name) + p, m, prefer_key=not p) for p, m in _variable_problems(name, var)]
        if problems:
            raise RecipeError(problems)

    env = environment()
    try:
        ast = env.parse(body)
        compiled = env.from_string(body)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError([Problem(("template",), f"{exc.message.rstrip('.')}; fix the jinja syntax", file,
                                   (exc.lineno or 1) + offset, 1)]) from None
    undeclared = jinja2.meta.find_undeclared_variables(ast)
    used = undeclared - set(RESERVED) - set(env.globals)
    if front is None:  # no front matter: every name the body uses is a required string
        variables = {name: Variable() for name in sorted(used)}
    else:
        variables = dict(matter.variables)
        problems = []
        for name in sorted(used - set(variables)):
            line = min((n.lineno for n in ast.find_all(nodes.Name) if n.name == name), default=1)
            problems.append(Problem(("template",), f"'{name}' is not a declared variable{did_you_mean(name, variables)}; "
                                    f"expected one of: {', '.join(variables) or '(none declared)'}, or declare it in the "
                                    "front matter", file, line + offset, 1))
        if problems:
            raise RecipeError(problems)
    template = Template(file=file, body=body, offset=offset, description=matter.description, variables=variables,
                        marks=marks, uses_plan="plan" in undeclared)
    template.compiled = compiled
    return template


def _variable_problems(name: str, var: Variable) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    if not _NAME.match(name) or name in RESERVED:
        why = "is reserved (the rendered recipe's plan)" if name in RESERVED else "is not a name"
        problems.append(((), f"'{name}' {why}; expected letters, digits and '_', not starting with a digit"))
    if var.min is not None or var.max is not None:
        if var.type not in ("int", "float"):
            problems.append((("min" if var.min is not None else "max",), f"applies to int and float variables, and this one is {var.type}"))
    for i, choice in enumerate(var.choices or []):
        error = _type_error(var.type, choice)
        if error:
            problems.append((("choices", i), error))
    if not var.required:
        error = _type_error(var.type, var.default) or _range_error(var, var.default)
        if error:
            problems.append((("default",), error))
    return problems


# --- values --------------------------------------------------------------------------

def _type_error(kind: str, value: Any) -> Optional[str]:
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "mapping": isinstance(value, dict),
    }[kind]
    if ok:
        return None
    hint = f" (quote it: '{value}')" if kind == "str" and isinstance(value, (int, float, bool)) else ""
    return f"{show(value)} is not {'an' if kind == 'int' else 'a'} {kind}{hint}; expected a value of type {kind}"


def _range_error(var: Variable, value: Any) -> Optional[str]:
    if var.choices is not None and value not in var.choices:
        return f"{show(value)} is not allowed{did_you_mean(str(value), [str(c) for c in var.choices])}; expected one of: {', '.join(show(c) for c in var.choices)}"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (var.min is not None or var.max is not None) and not numeric:
        return f"min and max apply to int and float variables, and {show(value)} is a {type(value).__name__}; remove them or change the type"
    if var.min is not None and value < var.min:
        return f"must be >= {var.min:g}, got {show(value)}"
    if var.max is not None and value > var.max:
        return f"must be <= {var.max:g}, got {show(value)}"
    return None


def parse_text(kind: str, raw: str) -> Any:
    """A --var value as its declared type; ValueError with 'what is wrong; what is expected'."""
    if kind == "str":
        return raw
    if kind == "int":
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise ValueError(f"'{raw}' is not an int; expected an integer such as 4")
        return int(raw)
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"'{raw}' is not a float; expected a number such as 0.01") from None
    if kind == "bool":
        if raw.strip().lower() not in ("true", "false"):
            raise ValueError(f"'{raw}' is not a bool; expected true or false")
        return raw.strip().lower() == "true"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = None
    if kind == "list" and not isinstance(value, list):
        raise ValueError(f"'{raw}' is not a list; expected YAML such as [0, 8]")
    if kind == "mapping" and not isinstance(value, dict):
        raise ValueError(f"'{raw}' is not a mapping; expected YAML such as {{key: value}}")
    return value


def check_value(template: Template, name: str, value: Any, where: tuple[str, int, int], from_text: bool) -> tuple[Any, Optional[Problem]]:
    """``value`` for variable ``name`` typed and checked; (value, None) or (None, problem at ``where``)."""
    if name not in template.variables:
        known = list(template.variables)
        return None, Problem((name,), f"unknown variable '{name}'{did_you_mean(name, known)}; expected one of: "
                                      f"{', '.join(known) or '(the template declares none)'}", *where)
    var = template.variables[name]
    if from_text:
        try:
            value = parse_text(var.type, value)
        except ValueError as exc:
            return None, Problem((name,), str(exc) + _help(var), *where)
    error = _type_error(var.type, value) or _range_error(var, value)
    if error:
        return None, Problem((name,), error + _help(var), *where)
    return value, None


def _help(var: Variable) -> str:
    return f" ({var.help})" if var.help else ""


def parse_var_options(template: Template, items: Iterable[str], option: str = "--var") -> dict[str, Any]:
    """``--var key=value`` options -> typed values; all problems together."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, raw = item.partition("=")
        where = (f"{option} {item}", 1, len(option) + 2)
        if not sep or not key.strip():
            problems.append(Problem((), "expected name=value", *where))
            continue
        value, problem = check_value(template, key.strip(), raw, (where[0], 1, len(option) + len(key) + 3), from_text=True)
        if problem:
            problems.append(problem)
        else:
            values[key.strip()] = value
    if problems:
        raise RecipeError(problems)
    return values


def complete(template: Template, values: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; a required variable without a value is an error at its declaration."""
    out = {}
    problems = []
    for name, var in template.variables.items():
        if name in values:
            out[name] = values[name]
        elif not var.required:
            out[name] = var.default
        else:
            problems.append(Problem((name,), f"has no default and no value; expected --var {name}=VALUE{_help(var)}",
                                    *template.where(name)))
    if problems:
        raise RecipeError(problems)
    return out


# --- rendering -----------------------------------------------------------------------

def render_text(template: Template, values: dict[str, Any], plan: Optional[dict] = None) -> str:
    """The body rendered with ``values`` (and ``plan``), in the sandbox; errors located in the template."""
    context = dict(values)
    if template.uses_plan:
        context["plan"] = plan if plan is not None else PLACEHOLDER_PLAN
    try:
        return template.compiled.render(context)
    except Exception as exc:  # noqa: BLE001 - anything a template raises becomes a located message
        raise RecipeError([Problem(("template",), _render_message(exc, template), template.file,
                                   _template_line(exc) + template.offset, 1)]) from None


def _template_line(exc: BaseException) -> int:
    line, tb = 1, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render_message(exc: BaseException, template: Template) -> str:
    if isinstance(exc, SecurityError):
        return (f"refused by the sandbox: {str(exc).rstrip('.')}; a template may use its variables and jinja's "
                "filters, not Python internals")
    if isinstance(exc, jinja2.UndefinedError):
        match = re.match(r"^'(\w+)' is undefined$", str(exc))
        if match:
            name = match.group(1)
            return f"'{name}' is undefined{did_you_mean(name, template.variables)}; expected one of: {', '.join(template.variables)}"
        return f"{exc}; expected an attribute or key that exists"
    if isinstance(exc, TypeError) and "no loader" in str(exc):
        return "templates cannot include, import or extend other files (no file access); expected one self-contained template"
    return f"{type(exc).__name__}: {exc}; fix the expression"


#: What ``plan`` holds on the first pass, before the plan exists (only comments may use it).
PLACEHOLDER_PLAN = {"layers_before": 0, "layers_after": 0, "parameters_before": 0, "parameters_after": 0,
                    "injected": [], "function_preserving": False, "architecture": "", "init": "", "warnings": []}


def plan_values(plan) -> dict:
    """What a template sees as ``plan``."""
    t = plan.totals
    return {"layers_before": t.layers_before, "layers_after": t.layers_after, "parameters_before": t.parameters_before,
            "parameters_after": t.parameters_after, "injected": list(plan.requires_grad_layers),
            "function_preserving": plan.function_preserving, "architecture": plan.architecture,
            "init": ", ".join(f"{k}={v}" for k, v in plan.init.items()), "warnings": list(plan.warnings)}


@dataclass
class Rendered:
    """One rendered recipe, validated, with its plan when the base model's config was found."""

    values: dict[str, Any]
    text: str
    loaded: LoadedRecipe
    plan: Any = None
    found: str = "not found"  # where the plan's config came from: local model, hub cache, stored config


def render_recipe(template: Template, values: dict[str, Any], label: str, configs: Iterable[Path] = ()) -> Rendered:
    """Render, validate (errors located at ``label``:line:col of the rendered text) and plan
    when the base model's config is found; ``plan`` in the template gets the plan's counts."""
    from tli_recipe.library.catalog import plan_recipe

    text = render_text(template, values)
    loaded = load_recipe(label, text=text)
    plan, found = plan_recipe(loaded, label, text, configs)
    if template.uses_plan:
        if plan is None:
            base = loaded.recipe.base_model
            raise RecipeError([Problem(("template",), f"uses `plan` (layer and parameter counts), which needs the config of "
                                       f"{base}: it is not a local directory, not in the Hugging Face cache, and not in the "
                                       f"stored configs ({', '.join(map(str, configs)) or 'none given'}); expected --configs DIR "
                                       f"holding {base.path.replace('/', '__')}/config.json", template.file, 1, 1)])
        final = render_text(template, values, plan_values(plan))
        if yaml.safe_load(final) != yaml.safe_load(text):
            raise RecipeError([Problem(("template",), "the recipe's data depends on `plan`; expected `plan` in comments only "
                                       "(the plan is computed from the recipe)", template.file, 1, 1)])
        text = final
        loaded = load_recipe(label, text=text)
    return Rendered(values=values, text=text, loaded=loaded, plan=plan, found=found)


# --- variants -------------------------------------------------------------------------

def combinations(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The cartesian product of the grid as (label, values); an axis value that is a mapping sets
    several variables at once (labelled by its first value)."""
    axes = [[(name, v) for v in values] for name, values in grid.items()]
    out = []
    for combo in itertools.product(*axes):
        values: dict[str, Any] = {}
        labels = []
        for name, v in combo:
            values.update(v if isinstance(v, dict) else {name: v})
            shown = next(iter(v.values()), "") if isinstance(v, dict) else v
            labels.append(f"{name}={shown if isinstance(shown, str) else show(shown)}")
        out.append((" ".join(labels) or "(no grid)", values))
    return out


def variant_name(rendered_name: Optional[str], template: Template, values: dict[str, Any], keys: list[str]) -> str:
    """The recipe's own ``name`` when it has one, else the template's stem and the grid values."""
    if rendered_name:
        return rendered_name
    stem = Path(template.file).name.removesuffix(".j2").removesuffix(".yaml")
    slug = "-".join(re.sub(r"[^A-Za-z0-9.]+", "-", f"{k}{values[k]}").strip("-") for k in keys if k in values)
    return f"{stem}-{slug}" if slug else stem


class Matrix(Strict):
    """A shareable sweep: a template, fixed values and a grid (``recipes/matrices/*.yaml``)."""

    template: str = Field(min_length=1, description="The template, relative to this file.")
    out_dir: str = Field(default=".", min_length=1, description="Where the recipes are written, relative to this file.")
    configs: list[str] = Field(default_factory=list, description="Folders of stored configs (org__name/config.json), relative to this file, for models that are not local.")
    vars: dict[str, Any] = Field(default_factory=dict, description="Values of every combination.")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict, description="Variable -> values; one recipe per combination. A value that is a mapping sets several variables at once.")


@dataclass
class Sweep:
    """What `variants` renders: a template, typed fixed values, typed combinations, where to write."""

    template: Template
    fixed: dict[str, Any]
    combos: list[tuple[str, dict[str, Any]]]  # (label, values)
    grid_keys: list[str]
    out_dir: Optional[Path]
    configs: list[Path]


def read_matrix(path: str | Path) -> tuple[Matrix, Marks]:
    data, marks = read_recipe(path)
    return validate_model(Matrix, data, marks), marks


def sweep_from_matrix(path: str | Path) -> Sweep:
    matrix, marks = read_matrix(path)
    here = Path(path).parent
    template = read_template(here / matrix.template)
    problems: list[Problem] = []
    fixed = {}
    for name, value in matrix.vars.items():
        checked, problem = check_value(template, name, value, marks.locate(("vars", name), prefer_key=True), from_text=False)
        problems += [problem] if problem else []
        fixed[name] = checked
    grid: dict[str, list[Any]] = {}
    for axis, values in matrix.grid.items():
        if axis in matrix.vars:
            problems.append(marks.problem(("grid", axis), f"'{axis}' is also in vars; expected each variable in vars or grid, not both", prefer_key=True))
        grid[axis] = []
        if axis not in template.variables and not all(isinstance(v, dict) for v in values):
            problems.append(check_value(template, axis, None, marks.locate(("grid", axis), prefer_key=True), from_text=False)[1])
            continue
        for i, value in enumerate(values):
            if isinstance(value, dict):
                for name, v in value.items():
                    checked, problem = check_value(template, name, v, marks.locate(("grid", axis, i, name), prefer_key=True), from_text=False)
                    problems += [problem] if problem else []
                grid[axis].append(value)
            else:
                checked, problem = check_value(template, axis, value, marks.locate(("grid", axis, i)), from_text=False)
                problems += [problem] if problem else []
                grid[axis].append(checked)
    if problems:
        raise RecipeError(problems)
    keys = list(dict.fromkeys(k for axis, values in grid.items() for v in values for k in (v if isinstance(v, dict) else {axis: v})))
    return Sweep(template, fixed, combinations(grid), keys, here / matrix.out_dir,
                 [Path(os.path.normpath(here / c)) for c in matrix.configs])


def sweep_from_options(template_path: str, var_items: Iterable[str], grid_items: Iterable[str]) -> Sweep:
    """A sweep from ``--var key=value`` and ``--grid key=v1,v2`` options (scalar types only in --grid)."""
    template = read_template(template_path)
    fixed = parse_var_options(template, var_items)
    grid: dict[str, list[Any]] = {}
    problems = []
    for item in grid_items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            problems.append(Problem((), "expected name=value1,value2,...", f"--grid {item}", 1, 8))
            continue
        if key in fixed or key in grid:
            problems.append(Problem((key,), f"'{key}' is given twice (--var or --grid); expected each variable once", f"--grid {item}", 1, 8))
            continue
        grid[key] = []
        column = len("--grid ") + len(key) + 2
        for part in raw.split(","):
            value, problem = check_value(template, key, part.strip(), (f"--grid {item}", 1, column), from_text=True)
            column += len(part) + 1
            if problem:
                problems.append(problem)
            else:
                grid[key].append(value)
    if problems:
        raise RecipeError(problems)
    return Sweep(template, fixed, combinations(grid), list(grid), None, [])


@dataclass
class Variant:
    label: str  # the combination, e.g. "every=2 size=1b"
    file: Path
    rendered: Optional[Rendered] = None
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VariantsError(RecipeError):
    """Invalid combinations, each named, with its problems located in its rendered recipe."""

    failed: list[Variant] = field(default_factory=list)
    total: int = 0

    def __str__(self) -> str:
        lines = [f"{len(self.failed)} of {self.total} combinations {'is' if len(self.failed) == 1 else 'are'} invalid; nothing was written"]
        for v in self.failed:
            lines.append(f"combination {v.label} ({v.file}):")
            lines += [str(p) for p in v.problems]
        return "\n".join(lines)


def render_variants(sweep: Sweep, out_dir: Path, configs: Iterable[Path] = ()) -> list[Variant]:
    """Render and validate every combination; a VariantsError names each invalid one (then nothing may be written)."""
    configs = list(sweep.configs) + [c for c in configs if c not in sweep.configs]
    out_dir = Path(os.path.normpath(out_dir))
    complete(sweep.template, {**sweep.fixed, **sweep.combos[0][1]})  # a missing value: one message, not one per combination
    variants: list[Variant] = []
    for label, combo in sweep.combos:
        values = complete(sweep.template, {**sweep.fixed, **combo})
        try:
            data = yaml.safe_load(render_text(sweep.template, values))
        except yaml.YAMLError:
            data = None
        except RecipeError as exc:
            variants.append(Variant(label, out_dir / f"{variant_name(None, sweep.template, values, sweep.grid_keys)}.yaml", problems=exc.problems))
            continue
        own = data.get("name") if isinstance(data, dict) and isinstance(data.get("name"), str) else None
        variant = Variant(label, out_dir / f"{variant_name(own, sweep.template, values, sweep.grid_keys)}.yaml")
        try:
            variant.rendered = render_recipe(sweep.template, values, str(variant.file), configs)
        except RecipeError as exc:
            variant.problems = exc.problems
        except TliError as exc:  # a source that cannot be planned (an inconsistent config...)
            variant.problems = [Problem((), str(exc), str(variant.file), 1, 1)]
        variants.append(variant)
    seen: dict[Path, Variant] = {}
    for v in variants:
        if v.file in seen and not v.problems:
            v.problems = [v.rendered.loaded.marks.problem(("name",), f"the combinations {seen[v.file].label} and {v.label} both "
                                                          f"render to {v.file.name}; expected a name that depends on every grid variable")]
        seen.setdefault(v.file, v)
    failed = [v for v in variants if v.problems]
    if failed:
        raise VariantsError(problems=[p for v in failed for p in v.problems], failed=failed, total=len(variants))
    return variants
