"""Templates -> plain YAML recipes: sandboxed jinja2, typed variables (``values``), one rendering at a time.

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
and the recipe data must not depend on it). jinja2 is imported only here and in
``variants`` (grids and matrix files of many renderings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import jinja2
import jinja2.meta
from jinja2 import StrictUndefined, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from pydantic import Field

from tli_recipe.errors import Problem, RecipeError, did_you_mean
from tli_recipe.library.sandbox import BoundedOps, LimitHit, run_bounded
from tli_recipe.library.values import Variable, range_error, type_error
from tli_recipe.recipe.load import (
    LoadedRecipe,
    Marks,
    load_data,
    load_recipe,
    read_recipe,
    read_text,
    validate_model,
)
from tli_recipe.recipe.schema import Strict

RESERVED_MEANING = {"plan": "the rendered recipe's plan", "generated": "what rendered the recipe"}
RESERVED = tuple(RESERVED_MEANING)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --- front matter -------------------------------------------------------------------


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
    uses_generated: bool = False
    compiled: Any = field(repr=False, default=None)

    def where(self, name: str) -> tuple[str, int, int]:
        if self.marks is not None:
            return self.marks.locate(("variables", name), prefer_key=True)
        return (self.file, 1, 1)


class _Sandbox(BoundedOps, ImmutableSandboxedEnvironment):
    """The immutable sandbox, also refusing huge ``*`` and ``**`` results (``sandbox.BoundedOps``)."""


def _human(n: Any) -> str:
    from tli_recipe.plan.report import human_count

    return human_count(int(n))


def environment() -> jinja2.Environment:
    """The sandbox every template renders in: no loader, no randomness, undefined names are errors."""
    env = _Sandbox(
        undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False
    )
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
            return "\n" + "".join(lines[1:i]), "".join(lines[i + 1 :]), i + 1
    return "", "", -1


def read_template(path: str | Path, text: Optional[str] = None) -> Template:
    """Read and check a template: front matter, body syntax, names the body uses."""
    file = str(path)
    if text is None:
        text = read_text(path, "template", "a path to a .yaml.j2 template")
    front, body, offset = _split_front_matter(text)
    if offset < 0:
        raise RecipeError(
            [
                Problem(
                    ("front matter",),
                    "the front matter opened by '---' on line 1 is never closed; expected a second '---' line",
                    file,
                    1,
                    1,
                )
            ]
        )
    marks, matter = None, FrontMatter()
    if front is not None and front.strip():
        data, marks = read_recipe(file, text=front)
        matter = validate_model(FrontMatter, data, marks)
        problems = []
        for name, var in matter.variables.items():
            problems += [
                marks.problem(("variables", name) + p, m, prefer_key=not p) for p, m in _variable_problems(name, var)
            ]
        if problems:
            raise RecipeError(problems)

    env = environment()
    try:
        ast = env.parse(body)
        compiled = env.from_string(body)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(
            [
                Problem(
                    ("template",),
                    f"{exc.message.rstrip('.')}; fix the jinja syntax",
                    file,
                    (exc.lineno or 1) + offset,
                    1,
                )
            ]
        ) from None
    undeclared = jinja2.meta.find_undeclared_variables(ast)
    used = undeclared - set(RESERVED) - set(env.globals)
    if front is None:  # no front matter: every name the body uses is a required string
        variables = {name: Variable() for name in sorted(used)}
    else:
        variables = dict(matter.variables)
        problems = []
        for name in sorted(used - set(variables)):
            line = min((n.lineno for n in ast.find_all(nodes.Name) if n.name == name), default=1)
            problems.append(
                Problem(
                    ("template",),
                    f"'{name}' is not a declared variable{did_you_mean(name, variables)}; "
                    f"expected one of: {', '.join(variables) or '(none declared)'}, or declare it in the "
                    "front matter",
                    file,
                    line + offset,
                    1,
                )
            )
        if problems:
            raise RecipeError(problems)
    template = Template(
        file=file,
        body=body,
        offset=offset,
        description=matter.description,
        variables=variables,
        marks=marks,
        uses_plan="plan" in undeclared,
        uses_generated="generated" in undeclared,
    )
    template.compiled = compiled
    return template


def _variable_problems(name: str, var: Variable) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    if not _NAME.match(name) or name in RESERVED:
        why = f"is reserved ({RESERVED_MEANING[name]})" if name in RESERVED else "is not a name"
        problems.append(((), f"'{name}' {why}; expected letters, digits and '_', not starting with a digit"))
    if var.min is not None or var.max is not None:
        if var.type not in ("int", "float"):
            problems.append(
                (
                    ("min" if var.min is not None else "max",),
                    f"applies to int and float variables, and this one is {var.type}",
                )
            )
    for i, choice in enumerate(var.choices or []):
        error = type_error(var.type, choice)
        if error:
            problems.append((("choices", i), error))
    if not var.required:
        error = type_error(var.type, var.default) or range_error(var, var.default)
        if error:
            problems.append((("default",), error))
    return problems


# --- rendering -----------------------------------------------------------------------


def render_text(
    template: Template, values: dict[str, Any], plan: Optional[dict] = None, generated: Optional[dict] = None
) -> str:
    """The body rendered with ``values`` (and ``plan``, ``generated``), in the sandbox; errors located in
    the template."""
    context = dict(values)
    if template.uses_plan:
        context["plan"] = plan if plan is not None else PLACEHOLDER_PLAN
    if template.uses_generated:
        context["generated"] = generated if generated is not None else PLACEHOLDER_GENERATED
    # What a filter imports on first use is imported here, once: in the child it would be imported
    # again on every rendering (the `human` filter's plan.report took 0.4 s a rendering).
    import tli_recipe.plan.report  # noqa: F401

    try:
        # In a child process with CPU-time and memory limits (library/sandbox.py): a template is untrusted.
        result = run_bounded(_render_here, template, context)
    except LimitHit as hit:
        raise RecipeError(
            [
                Problem(
                    ("template",),
                    f"rendering was stopped: {hit}; expected a template that renders in well under a second",
                    template.file,
                    template.offset + 1,
                    1,
                )
            ]
        ) from None
    if "text" in result:
        return result["text"]
    raise RecipeError([Problem(("template",), result["message"], template.file, result["line"] + template.offset, 1)])


def _render_here(template: Template, context: dict) -> dict:
    """The rendering itself, as plain data: the text, or a located message (sent back from the child)."""
    try:
        return {"text": template.compiled.render(context)}
    except MemoryError:
        raise  # the limit that was hit: run_bounded reports it
    except Exception as exc:  # noqa: BLE001 - anything a template raises becomes a located message
        return {"message": _render_message(exc, template), "line": _template_line(exc)}


def _template_line(exc: BaseException) -> int:
    line, tb = 1, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render_message(exc: BaseException, template: Template) -> str:
    if isinstance(exc, SecurityError):
        return (
            f"refused by the sandbox: {str(exc).rstrip('.')}; a template may use its variables and jinja's "
            "filters, not Python internals"
        )
    if isinstance(exc, jinja2.UndefinedError):
        match = re.match(r"^'(\w+)' is undefined$", str(exc))
        if match:
            name = match.group(1)
            return (
                f"'{name}' is undefined{did_you_mean(name, template.variables)}; expected one of: "
                f"{', '.join(template.variables)}"
            )
        return f"{exc}; expected an attribute or key that exists"
    if isinstance(exc, TypeError) and "no loader" in str(exc):
        return (
            "templates cannot include, import or extend other files (no file access); "
            "expected one self-contained template"
        )
    return f"{type(exc).__name__}: {exc}; fix the expression"


#: What ``plan`` holds on the first pass, before the plan exists (only comments may use it).
PLACEHOLDER_PLAN = {
    "layers_before": 0,
    "layers_after": 0,
    "parameters_before": 0,
    "parameters_after": 0,
    "injected": [],
    "function_preserving": False,
    "architecture": "",
    "init": "",
    "warnings": [],
    "widths": {},
}


def plan_values(plan) -> dict:
    """What a template sees as ``plan``."""
    t = plan.totals
    return {
        "layers_before": t.layers_before,
        "layers_after": t.layers_after,
        "parameters_before": t.parameters_before,
        "parameters_after": t.parameters_after,
        "injected": list(plan.requires_grad_layers),
        "function_preserving": plan.function_preserving,
        "architecture": plan.architecture,
        "init": ", ".join(f"{k}={v}" for k, v in plan.init.items()),
        "warnings": list(plan.warnings),
        # widen: each width key of config.json -> [before, after] (empty when the plan widens nothing)
        "widths": {k: [plan.widen.before[k], v] for k, v in plan.widen.config.items()} if plan.widen else {},
    }


#: What ``generated`` holds on the first pass (only comments may use it).
PLACEHOLDER_GENERATED = {"command": "", "template": "", "matrix": ""}


def repository(path: Path) -> Path:
    """The git work tree holding ``path`` (a folder with .git) or the library installed with tli-recipe
    (its copy of the repository's recipes/ and schemas/), else ``path``'s own folder."""
    from tli_recipe.library.catalog import INSTALLED_LIBRARY

    folder = path.resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists() or candidate == INSTALLED_LIBRARY:
            return candidate
    return folder


#: The editor's schema line of a recipe (yaml-language-server), as the library's templates write it.
_SCHEMA_LINE = re.compile(r"^(# yaml-language-server: \$schema=)(\S*recipe\.schema\.json)[ \t]*$", re.MULTILINE)


def link_schema(text: str, template_file: str | Path, folder: Path) -> str:
    """``text`` with its ``$schema=`` link to the recipe schema made to resolve from ``folder``, where the
    recipe is written: the schema of the template's repository, else of the library installed with
    tli-recipe; a relative path when the two share a folder below the file system's root (a checkout),
    else a ``file://`` URL (an installed library seen from a project elsewhere). A URL is left as it is."""
    import os

    from tli_recipe.library.catalog import library_schema

    schema = library_schema(repository(Path(template_file)))
    if schema is None:
        return text
    schema, folder = schema.resolve(), Path(folder).resolve()
    shared = Path(os.path.commonpath([schema, folder]))
    link = schema.as_uri() if shared == Path(shared.anchor) else Path(os.path.relpath(schema, folder)).as_posix()
    return _SCHEMA_LINE.sub(lambda m: m.group(0) if "://" in m.group(2) else m.group(1) + link, text)


def shown_path(path: str | Path) -> str:
    """``path`` relative to its repository (``recipes/matrices/llama.yaml``), the same from any working
    directory, so a header naming it renders the same text wherever the command runs."""
    path = Path(path)
    return path.resolve().relative_to(repository(path)).as_posix()


def generated_by(command: str, template: str | Path, matrix: str | Path | None = None) -> dict:
    """What a template sees as ``generated``: the command that rendered it (as a user would type it
    from the repository root), the template, and the matrix file ('' for a one-off rendering)."""
    return {"command": command, "template": shown_path(template), "matrix": shown_path(matrix) if matrix else ""}


def provenance_line(generated: dict) -> str:
    """The comment a rendering holds when its template does not name its command itself; ``variants
    --force`` replaces only files naming the command of their own sweep."""
    return f"# Generated from {generated['template']} by `{generated['command']}`.\n"


@dataclass
class Rendered:
    """One rendered recipe, validated, with its plan when the base model's config was found."""

    values: dict[str, Any]
    text: str
    loaded: LoadedRecipe
    plan: Any = None
    found: str = "not found"  # where the plan's config came from: local model, hub cache, stored config


def render_recipe(
    template: Template,
    values: dict[str, Any],
    label: str,
    configs: Iterable[Path] = (),
    generated: Optional[dict] = None,
    folder: Optional[Path] = None,
) -> Rendered:
    """Render, validate (errors located at ``label``:line:col of the rendered text) and plan
    when the base model's config is found; ``plan`` in the template gets the plan's counts,
    ``generated`` what rendered it (without it, a line naming the command is appended).
    ``folder``: where the recipe is written (standard output: the working directory); its
    ``$schema`` link is made to resolve from there (``link_schema``)."""
    from tli_recipe.library.catalog import plan_recipe

    text = render_text(template, values)
    loaded = load_recipe(label, text=text)
    plan, found = plan_recipe(loaded, label, text, configs)
    if template.uses_plan and plan is None:
        base = loaded.recipe.base_model
        raise RecipeError(
            [
                Problem(
                    ("template",),
                    f"uses `plan` (layer and parameter counts), which needs the config of "
                    f"{base}: it is not a local directory, not in the Hugging Face cache, and not in the "
                    f"stored configs ({', '.join(map(str, configs)) or 'none given'}); expected --configs DIR "
                    f"holding {base.path.replace('/', '__')}/config.json",
                    template.file,
                    1,
                    1,
                )
            ]
        )
    first = text
    if template.uses_plan or (template.uses_generated and generated is not None):
        final = render_text(template, values, plan_values(plan) if plan is not None else None, generated)
        if load_data(final, template.file) != load_data(text, template.file):
            names = " and ".join(
                f"`{n}`" for n, used in (("plan", template.uses_plan), ("generated", template.uses_generated)) if used
            )
            raise RecipeError(
                [
                    Problem(
                        ("template",),
                        f"the recipe's data depends on {names}; expected {names} in comments "
                        "only (the plan is computed from the recipe)",
                        template.file,
                        1,
                        1,
                    )
                ]
            )
        text = final
    if generated is not None and f"`{generated['command']}`" not in text:
        text += ("" if text.endswith("\n") or not text else "\n") + provenance_line(generated)
    if folder is not None:
        text = link_schema(text, template.file, folder)
    if text != first:
        loaded = load_recipe(label, text=text)
    return Rendered(values=values, text=text, loaded=loaded, plan=plan, found=found)
