"""Values of template variables: a variable's declaration, ``--var`` text parsed as its type,
types, ranges and choices checked, defaults filled in. No jinja2."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Iterable, Literal, Optional

from pydantic import Field

from tli_recipe.errors import Problem, RecipeError, did_you_mean, show
from tli_recipe.recipe.load import load_data
from tli_recipe.recipe.schema import Strict

if TYPE_CHECKING:
    from tli_recipe.library.templates import Template


class Variable(Strict):
    """One template variable: its type, default and allowed values."""

    type: Literal["str", "int", "float", "bool", "list", "mapping"] = Field(
        default="str", description="Type of the value: --var values are parsed and checked as this type."
    )
    default: Any = Field(
        default=None, description="Value when none is given; without a default the variable is required."
    )
    choices: Optional[list[Any]] = Field(default=None, min_length=1, description="The allowed values.")
    min: Optional[float] = Field(default=None, description="Smallest allowed value (int and float).")
    max: Optional[float] = Field(default=None, description="Largest allowed value (int and float).")
    help: Optional[str] = Field(default=None, description="What the variable means, shown in errors.")

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


def type_error(kind: str, value: Any) -> Optional[str]:
    """Why ``value`` is not of the variable type ``kind``, or None."""
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "mapping": isinstance(value, dict),
    }[kind]
    if ok:
        return None
    hint = f" (quote it: '{value}')" if kind == "str" and isinstance(value, (int, float, bool)) else ""
    return f"{show(value)} is not {'an' if kind == 'int' else 'a'} {kind}{hint}; expected a value of type {kind}"


def range_error(var: Variable, value: Any) -> Optional[str]:
    """Why ``value`` is outside ``var``'s choices or bounds, or None."""
    if var.choices is not None and value not in var.choices:
        return (
            f"{show(value)} is not allowed{did_you_mean(str(value), [str(c) for c in var.choices])}; expected one of: "
            f"{', '.join(show(c) for c in var.choices)}"
        )
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (var.min is not None or var.max is not None) and not numeric:
        return (
            f"min and max apply to int and float variables, and {show(value)} is a {type(value).__name__}; "
            "remove them or change the type"
        )
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
            number = float(raw)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"'{raw}' is not a finite float; expected a number such as 0.01")
        return number
    if kind == "bool":
        if raw.strip().lower() not in ("true", "false"):
            raise ValueError(f"'{raw}' is not a bool; expected true or false")
        return raw.strip().lower() == "true"
    try:
        value = load_data(raw, "--var")
    except RecipeError:
        value = None
    if kind == "list" and not isinstance(value, list):
        raise ValueError(f"'{raw}' is not a list; expected YAML such as [0, 8]")
    if kind == "mapping" and not isinstance(value, dict):
        raise ValueError(f"'{raw}' is not a mapping; expected YAML such as {{key: value}}")
    return value


def check_value(
    template: Template, name: str, value: Any, where: tuple[str, int, int], from_text: bool
) -> tuple[Any, Optional[Problem]]:
    """``value`` for variable ``name`` typed and checked; (value, None) or (None, problem at ``where``)."""
    if name not in template.variables:
        known = list(template.variables)
        return None, Problem(
            (name,),
            f"unknown variable '{name}'{did_you_mean(name, known)}; expected one of: "
            f"{', '.join(known) or '(the template declares none)'}",
            *where,
        )
    var = template.variables[name]
    if from_text:
        try:
            value = parse_text(var.type, value)
        except ValueError as exc:
            return None, Problem((name,), str(exc) + _help(var), *where)
    error = type_error(var.type, value) or range_error(var, value)
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
        value, problem = check_value(
            template, key.strip(), raw, (where[0], 1, len(option) + len(key) + 3), from_text=True
        )
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
            problems.append(
                Problem(
                    (name,),
                    f"has no default and no value; expected --var {name}=VALUE{_help(var)}",
                    *template.where(name),
                )
            )
    if problems:
        raise RecipeError(problems)
    return out
