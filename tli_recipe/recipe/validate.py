"""Validating plain recipe data with the pydantic models, every error located by the recipe's marks.

``validate_model`` turns pydantic's errors into ``file:line:col: field.path: what is wrong; what is
expected`` problems, all at once. It is shared by the recipe, template front matter and matrix files.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from tli_recipe.errors import RecipeError, did_you_mean, show, suggestion
from tli_recipe.recipe.base import NULL_MESSAGE

if TYPE_CHECKING:
    from tli_recipe.recipe.load import Marks


def _message(err: dict, model: type[BaseModel]) -> str:
    """A pydantic error as 'what is wrong; what is expected'."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    shown = show(value)
    names = [p for p in err["loc"] if isinstance(p, str)]
    noun = names[-1] if names else "value"
    if kind == "missing":
        field = _field_at(model, err["loc"])
        described = (
            f"; expected {field.description[0].lower()}{field.description[1:].rstrip('.')}"
            if field and field.description
            else ""
        )
        return f"is required{described}"
    if kind == "string_pattern_mismatch":
        return (
            f"{shown} is not a valid {noun}; expected letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    if kind == "string_too_short":
        return f"is empty; expected a non-empty {noun}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {shown}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {shown}"
    if kind == "finite_number":
        return f"{shown} is not a finite number; expected a finite number"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {shown}"
    if kind in ("string_type",):
        return f"must be a string, got {shown}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {shown}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {shown}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of keys, got {shown}"
    if kind in ("too_short", "too_long") and noun in ("layer_range", "layers"):
        return f"{shown} has {ctx.get('actual_length')} items; expected [start, end] (half-open, 0-based)"
    if kind == "too_short" and not ctx.get("actual_length"):
        return f"is empty; expected at least {ctx.get('min_length')} item{'s' * (ctx.get('min_length') != 1)}"
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"has {ctx.get('actual_length')} items; expected {'at least' if kind == 'too_short' else 'at most'} {n}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        noun = "LoRA target" if noun == "targets" else noun
        hint = _module_hint(value) if noun == "LoRA target" else ""
        return (
            f"{shown} is not a valid {noun}{hint or did_you_mean(value, choices)}; expected one of: "
            f"{', '.join(choices)}"
        )
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def validate_model(model: type[BaseModel], data: Any, marks: Marks) -> BaseModel:
    """``model.model_validate(data)`` with every error located in the recipe file.

    A non-finite number (``.nan``, ``.inf``) anywhere in ``data`` is an error, found by one walk
    here for every model (recipe, template front matter, matrix), free-form mappings included.
    """
    nulls = _drop_nulls(model, data, ())
    non_finite_paths = {p for p, _ in non_finite(data)}
    found = [marks.problem(p, m) for p, m in non_finite(data)]
    try:
        validated = model.model_validate(data)
    except ValidationError as exc:
        problems = [marks.problem(p, NULL_MESSAGE) for p in nulls] + found
        # The walk above already reported each non-finite number once, at its own value.
        errors = [
            e
            for e in exc.errors(include_url=False)
            if e["type"] != "finite_number" and tuple(e["loc"]) not in non_finite_paths
        ]
        for err in errors:
            err["loc"] = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # A typo'd key already says "did you mean 'x'"; a second "x is required" adds nothing.
        meant = set()
        for err in errors:
            if err["type"] == "extra_forbidden":
                owner = _model_at(model, err["loc"][:-1])
                hint = suggestion(err["loc"][-1], owner.model_fields) if owner else None
                if hint:
                    meant.add(err["loc"][:-1] + (hint,))
        for err in errors:
            path = err["loc"]
            if err["type"] == "extra_forbidden":
                problems.append(marks.problem(path, _unknown_key(model, path), prefer_key=True))
            elif not (err["type"] == "missing" and path in meant):
                problems.append(marks.problem(path, _message(err, model)))
        raise RecipeError(sorted(problems, key=lambda p: (p.file != marks.file, p.line, p.column))) from None
    if nulls or found:
        problems = [marks.problem(p, NULL_MESSAGE) for p in nulls] + found
        raise RecipeError(sorted(problems, key=lambda p: (p.file != marks.file, p.line, p.column)))
    return validated


def non_finite(data: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """``(path, message)`` for every NaN or infinity in plain data (iterative: no recursion limit)."""
    found, todo = [], [(path, data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            shown = ".nan" if value != value else (".inf" if value > 0 else "-.inf")
            found.append((where, f"{shown} is not a finite number; expected a finite number"))
        elif isinstance(value, dict):
            todo += [(where + (k,), v) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(where + (i,), v) for i, v in enumerate(value)]
    return sorted(found, key=lambda item: str(item[0]))


def _drop_nulls(model: type[BaseModel], data: Any, path: tuple) -> list[tuple]:
    """Remove known keys written with no value (``inject:`` alone) and return their paths.

    An empty key is never what the user meant: ``inject:`` with its body commented out
    must not silently mean "no injection".
    """
    found = []
    if isinstance(data, dict):
        owner = _model_at(model, path)
        for key in list(data):
            if data[key] is None and owner is not None and key in owner.model_fields:
                found.append(path + (key,))
                del data[key]
            else:
                found += _drop_nulls(model, data[key], path + (key,))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found += _drop_nulls(model, item, path + (i,))
    return found


#: Module names of the MLP projections in Mixtral's experts (and Meta's LLaMA code): a recipe names the
#: projections, so these are told apart from typos.
MODULE_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _module_hint(key: object) -> str:
    """`` ('w2' is down_proj here: ...)`` for a module name of a projection, else ``""``."""
    if key not in MODULE_NAMES:
        return ""
    return (
        f" ('{key}' is {MODULE_NAMES[key]} here: recipes name projections, and Mixtral's experts call "
        "gate_proj, up_proj and down_proj w1, w3 and w2)"
    )


def _unknown_key(model: type[BaseModel], path: tuple) -> str:
    """'unknown key' with the allowed names of the model that holds it."""
    owner = _model_at(model, path[:-1])
    key = path[-1]
    if owner is None:
        return f"unknown key '{key}'"
    names = list(owner.model_fields)
    noun = getattr(owner, "key_noun", "key")
    hint = _module_hint(key) if noun == "projection" else ""
    return f"unknown {noun} '{key}'{hint or did_you_mean(key, names)}; expected one of: {', '.join(names)}"


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at ``path``."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _first_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _field_at(model: type[BaseModel], path: tuple):
    owner = _model_at(model, tuple(path[:-1]))
    return owner.model_fields.get(path[-1]) if owner is not None and path else None


def _first_model(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None
