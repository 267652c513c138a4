"""Variants: one recipe per combination of a template's variables (grids, matrix files, sweeps).

A matrix file (``recipes/matrices/*.yaml``) names a template, fixed values and a grid; ``variants``
renders every combination, validates (and where possible plans) each, and writes all or nothing.
A matrix is shared input: its ``template`` and ``out_dir`` must stay inside the repository that
holds it (the git work tree, else its folder) unless the path is given on the command line.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

from pydantic import Field

from tli_recipe.errors import Problem, RecipeError, TliError, show
from tli_recipe.library.templates import (  # noqa: F401 - repository is exported here too
    Rendered,
    Template,
    generated_by,
    read_template,
    render_recipe,
    render_text,
    repository,
    shown_path,
)
from tli_recipe.library.values import check_value, complete, parse_var_options
from tli_recipe.recipe.base import file_schema
from tli_recipe.recipe.load import Marks, load_data, read_recipe, validate_model
from tli_recipe.recipe.schema import Strict

#: Most combinations one sweep may render (each is rendered, validated and planned).
MAX_COMBINATIONS = 1024


def combinations(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The cartesian product of the grid as (label, values); an axis value that is a mapping sets
    several variables at once (labelled by its first value). The caller checks :func:`too_many` first."""
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


def too_many(grid: dict[str, list[Any]]) -> Optional[str]:
    """A message when the grid has more than MAX_COMBINATIONS combinations (counted, not built)."""
    count = math.prod(len(values) for values in grid.values())
    if count > MAX_COMBINATIONS:
        sizes = " x ".join(str(len(v)) for v in grid.values())
        return f"the grid has {sizes} = {count} combinations; expected at most {MAX_COMBINATIONS}"
    return None


def _outside(path: Path, root: Path) -> bool:
    # resolve(): a symlink inside the repository that points out of it counts as leaving it.
    return not path.resolve().is_relative_to(root)


class Matrix(Strict):
    """A shareable sweep: a template, fixed values and a grid (``recipes/matrices/*.yaml``)."""

    template: str = Field(min_length=1, description="The template, relative to this file.")
    out_dir: str = Field(default=".", min_length=1, description="Where the recipes are written, relative to this file.")
    configs: list[str] = Field(
        default_factory=list,
        description=(
            "Folders of stored configs (org__name/config.json), relative to this file, for models that are not local."
        ),
    )
    vars: dict[str, Any] = Field(default_factory=dict, description="Values of every combination.")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict,
        description=(
            "Variable -> values; one recipe per combination. A value that is a mapping sets several variables at once."
        ),
    )


def matrix_schema() -> dict:
    """The JSON schema of a matrix file (``schemas/matrix.schema.json``)."""
    return file_schema(Matrix, "tli-recipe matrix (tli-recipe variants)")


@dataclass
class Sweep:
    """What `variants` renders: a template, typed fixed values, typed combinations, where to write."""

    template: Template
    fixed: dict[str, Any]
    combos: list[tuple[str, dict[str, Any]]]  # (label, values)
    grid_keys: list[str]
    out_dir: Optional[Path]
    configs: list[Path]
    generated: dict = field(
        default_factory=dict
    )  # what rendered it: command, template, matrix (templates.generated_by)

    def owns(self, text: str) -> bool:
        """Whether a recipe on disk says this sweep generated it, so ``--force`` may replace it: it names
        the same matrix file's command, or (a sweep from --grid options) `tli-recipe variants TEMPLATE`."""
        if self.generated.get("matrix"):
            return f"`{self.generated['command']}`" in text
        return re.search(rf"`tli-recipe variants {re.escape(self.generated.get('template', ''))}[ `]", text) is not None


def read_matrix(path: str | Path) -> tuple[Matrix, Marks]:
    data, marks = read_recipe(path)
    return validate_model(Matrix, data, marks), marks


def sweep_from_matrix(path: str | Path, out_dir_given: bool = False) -> Sweep:
    """The sweep a matrix file describes. Its ``template`` and ``out_dir`` (unless ``out_dir_given``:
    the command line chose the folder) must stay inside the matrix's repository."""
    matrix, marks = read_matrix(path)
    here = Path(path).parent
    root = repository(Path(path))
    keys = [("template", matrix.template)] + ([] if out_dir_given else [("out_dir", matrix.out_dir)])
    leaving = [
        marks.problem(
            (key,),
            f"{value!r} leaves the matrix's repository ({root}); expected a path inside it"
            + (", or --out-dir on the command line" if key == "out_dir" else ", or pass the template itself"),
        )
        for key, value in keys
        if _outside(here / value, root)
    ]
    if leaving:
        raise RecipeError(leaving)
    template = read_template(here / matrix.template)
    problems: list[Problem] = []
    fixed = {}
    for name, value in matrix.vars.items():
        checked, problem = check_value(
            template, name, value, marks.locate(("vars", name), prefer_key=True), from_text=False
        )
        problems += [problem] if problem else []
        fixed[name] = checked
    grid: dict[str, list[Any]] = {}
    for axis, values in matrix.grid.items():
        if axis in matrix.vars:
            problems.append(
                marks.problem(
                    ("grid", axis),
                    f"'{axis}' is also in vars; expected each variable in vars or grid, not both",
                    prefer_key=True,
                )
            )
        grid[axis] = []
        if axis not in template.variables and not all(isinstance(v, dict) for v in values):
            problems.append(
                check_value(template, axis, None, marks.locate(("grid", axis), prefer_key=True), from_text=False)[1]
            )
            continue
        for i, value in enumerate(values):
            if isinstance(value, dict):
                for name, v in value.items():
                    checked, problem = check_value(
                        template, name, v, marks.locate(("grid", axis, i, name), prefer_key=True), from_text=False
                    )
                    problems += [problem] if problem else []
                grid[axis].append(value)
            else:
                checked, problem = check_value(template, axis, value, marks.locate(("grid", axis, i)), from_text=False)
                problems += [problem] if problem else []
                grid[axis].append(checked)
    many = too_many(grid)
    if many:
        problems.append(marks.problem(("grid",), many, prefer_key=True))
    if problems:
        raise RecipeError(problems)
    keys = list(
        dict.fromkeys(
            k for axis, values in grid.items() for v in values for k in (v if isinstance(v, dict) else {axis: v})
        )
    )
    return Sweep(
        template,
        fixed,
        combinations(grid),
        keys,
        here / matrix.out_dir,
        [Path(os.path.normpath(here / c)) for c in matrix.configs],
        generated_by(f"tli-recipe variants {shown_path(path)}", template.file, path),
    )


def sweep_from_options(template_path: str, var_items: Iterable[str], grid_items: Iterable[str]) -> Sweep:
    """A sweep from ``--var key=value`` and ``--grid key=v1,v2`` options (scalar types only in --grid)."""
    var_items, grid_items = list(var_items), list(grid_items)
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
            problems.append(
                Problem(
                    (key,),
                    f"'{key}' is given twice (--var or --grid); expected each variable once",
                    f"--grid {item}",
                    1,
                    8,
                )
            )
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
    many = too_many(grid)
    if many:
        problems.append(Problem((), many, "--grid", 1, 1))
    if problems:
        raise RecipeError(problems)
    options = [f"--var {shlex.quote(i)}" for i in var_items] + [f"--grid {shlex.quote(i)}" for i in grid_items]
    command = " ".join([f"tli-recipe variants {shown_path(template_path)}", *options]).replace("\n", " ")
    return Sweep(template, fixed, combinations(grid), list(grid), None, [], generated_by(command, template_path))


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
        lines = [
            f"{len(self.failed)} of {self.total} combinations {'is' if len(self.failed) == 1 else 'are'} invalid; "
            "nothing was written"
        ]
        for v in self.failed:
            lines.append(f"combination {v.label} ({v.file}):")
            lines += [str(p) for p in v.problems]
        return "\n".join(lines)


def render_variants(sweep: Sweep, out_dir: Path, configs: Iterable[Path] = ()) -> list[Variant]:
    """Render and validate every combination; a VariantsError names each invalid one (then nothing may be written)."""
    configs = list(sweep.configs) + [c for c in configs if c not in sweep.configs]
    out_dir = Path(os.path.normpath(out_dir))
    complete(
        sweep.template, {**sweep.fixed, **sweep.combos[0][1]}
    )  # a missing value: one message, not one per combination
    variants: list[Variant] = []
    for label, combo in sweep.combos:
        values = complete(sweep.template, {**sweep.fixed, **combo})
        try:
            text = render_text(sweep.template, values)
        except RecipeError as exc:
            variants.append(
                Variant(
                    label,
                    out_dir / f"{variant_name(None, sweep.template, values, sweep.grid_keys)}.yaml",
                    problems=exc.problems,
                )
            )
            continue
        try:  # only the name is wanted here; render_recipe below locates any YAML error
            data = load_data(text, "<rendered>")
        except RecipeError:
            data = None
        own = data.get("name") if isinstance(data, dict) and isinstance(data.get("name"), str) else None
        variant = Variant(label, out_dir / f"{variant_name(own, sweep.template, values, sweep.grid_keys)}.yaml")
        try:
            variant.rendered = render_recipe(
                sweep.template, values, str(variant.file), configs, sweep.generated or None, folder=out_dir
            )
        except RecipeError as exc:
            variant.problems = exc.problems
        except TliError as exc:  # a source that cannot be planned (an inconsistent config...)
            variant.problems = [Problem((), str(exc), str(variant.file), 1, 1)]
        variants.append(variant)
    seen: dict[Path, Variant] = {}
    for v in variants:
        if v.file in seen and not v.problems:
            v.problems = [
                v.rendered.loaded.marks.problem(
                    ("name",),
                    f"the combinations {seen[v.file].label} and {v.label} both "
                    f"render to {v.file.name}; expected a name that depends on every grid variable",
                )
            ]
        seen.setdefault(v.file, v)
    failed = [v for v in variants if v.problems]
    if failed:
        raise VariantsError(problems=[p for v in failed for p in v.problems], failed=failed, total=len(variants))
    return variants
