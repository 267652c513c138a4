"""Read a recipe file, keeping the line and column of every key and value.

``read_recipe`` returns the plain data plus a :class:`Marks` table; ``validate_recipe``
runs the pydantic models and turns their errors into ``file:line:col`` problems.
No torch, no transformers: this module is on the fast path of ``validate`` and ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from tli_recipe.errors import Problem, RecipeError, did_you_mean, show, suggestion


@dataclass
class Marks:
    """Where each field path of a recipe was written: ``path -> (file, line, column)``.

    ``keys`` holds the position of the key (used for "unknown key" errors), ``values``
    the position of the value (used for everything else). Positions are 1-based.
    """

    file: str
    values: dict[tuple, tuple[str, int, int]] = field(default_factory=dict)
    keys: dict[tuple, tuple[str, int, int]] = field(default_factory=dict)

    def locate(self, path: Iterable[object], prefer_key: bool = False) -> tuple[str, int, int]:
        """The position of ``path``, or of its nearest written ancestor."""
        path = tuple(path)
        while True:
            table = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            for t in table:
                if path in t:
                    return t[path]
            if not path:
                return (self.file, 1, 1)
            path = path[:-1]

    def problem(self, path: Iterable[object], message: str, prefer_key: bool = False) -> Problem:
        path = tuple(path)
        file, line, col = self.locate(path, prefer_key)
        return Problem(path=path, message=message, file=file, line=line, column=col)


def _mark(file: str, node: yaml.Node) -> tuple[str, int, int]:
    return (file, node.start_mark.line + 1, node.start_mark.column + 1)


def _walk(node: yaml.Node, path: tuple, marks: Marks, problems: list[Problem]) -> Any:
    """Build plain Python data from a composed node, recording marks and duplicate keys."""
    marks.values[path] = _mark(marks.file, node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(path, "a key must be a plain name; expected name: value", *_mark(marks.file, key_node)))
                continue
            key = str(_scalar(key_node))
            child = path + (key,)
            if key in out:
                first = marks.keys[child]
                problems.append(
                    Problem(child, f"duplicate key '{key}' (first written at line {first[1]}); write each key once",
                            *_mark(marks.file, key_node))
                )
                continue
            marks.keys[child] = _mark(marks.file, key_node)
            out[key] = _walk(value_node, child, marks, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, path + (i,), marks, problems) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    # Resolve the scalar exactly as safe_load would (ints, floats, bools, null, strings).
    return yaml.SafeLoader("").construct_object(node)


def read_text(path: str | Path, what: str, expected: str) -> str:
    """A UTF-8 file's text; a missing or unreadable file is a located RecipeError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem((), f"no such {what}; expected {expected}", str(path), 1, 1)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem((), f"cannot read the {what}: {exc}", str(path), 1, 1)]) from None


def read_recipe(path: str | Path, text: str | None = None) -> tuple[dict, Marks]:
    """Parse a recipe file into plain data and marks; YAML errors become a RecipeError."""
    file = str(path)
    if text is None:
        text = read_text(path, "recipe file", "a path to a .yaml recipe")
    marks = Marks(file)
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = _walk(node, (), marks, problems) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem and exc.context_mark:
            where = exc.context.removeprefix("while parsing ").removeprefix("while scanning ").removeprefix("a ")
            what += f" (in the {where} opened at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        raise RecipeError([Problem((), f"invalid YAML: {what}; fix the syntax", file, line, col)]) from None
    except yaml.YAMLError as exc:  # reader errors (control characters) carry no mark
        raise RecipeError([Problem((), f"invalid YAML: {str(exc).splitlines()[0]}; fix the file", file, 1, 1)]) from None
    if node is None:
        raise RecipeError([Problem((), "the recipe is empty; expected a mapping with at least base_model", file, 1, 1)])
    if not isinstance(data, dict):
        problems.append(Problem((), f"a recipe must be a mapping of keys, got {type(data).__name__}", file, 1, 1))
    if problems:
        raise RecipeError(problems)
    return data, marks


def _split_path(text: str) -> list[str | int]:
    """``slices[1].layer_range`` or ``slices.1.layer_range`` -> ``["slices", 1, "layer_range"]``."""
    parts: list[str | int] = []
    for chunk in text.replace("[", ".").replace("]", "").split("."):
        if chunk == "":
            raise ValueError("empty path segment")
        parts.append(int(chunk) if chunk.isdigit() else chunk)
    return parts


def apply_overrides(data: dict, marks: Marks, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) and mark them as ``--set``."""
    problems: list[Problem] = []
    for item in overrides:
        where = f"--set {item}"
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem((), "expected key.path=value", where, 1, 1))
            continue
        try:
            path = _split_path(key.strip())
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (ValueError, yaml.YAMLError) as exc:
            problems.append(Problem((), f"cannot parse the override ({exc}); expected key.path=value", where, 1, 1))
            continue
        target: Any = data
        ok = True
        for depth, part in enumerate(path[:-1]):
            nxt = path[depth + 1]
            if isinstance(target, dict) and isinstance(part, str):
                target = target.setdefault(part, [] if isinstance(nxt, int) else {})
            elif isinstance(target, list) and isinstance(part, int) and part < len(target):
                target = target[part]
            elif isinstance(target, list) and part == len(target):  # slices[N].x with N = len: a new item
                target.append([] if isinstance(nxt, int) else {})
                target = target[-1]
            else:
                problems.append(Problem(tuple(path[: depth + 1]), "cannot descend here; expected an existing key or list index", where, 1, 1))
                ok = False
                break
        if not ok:
            continue
        last = path[-1]
        if isinstance(target, dict) and isinstance(last, str):
            target[last] = value
        elif isinstance(target, list) and isinstance(last, int) and last <= len(target):
            if last == len(target):
                target.append(value)
            else:
                target[last] = value
        else:
            problems.append(Problem(tuple(path), "cannot set this path; expected a key of a mapping or a list index", where, 1, 1))
            continue
        # Every position under the overridden path now comes from the command line.
        tup = tuple(path)
        for table in (marks.values, marks.keys):
            for p in [p for p in table if p[: len(tup)] == tup]:
                del table[p]
        col = len("--set ") + len(key) + 2
        marks.values[tup] = (where, 1, col)
        marks.keys[tup] = (where, 1, len("--set ") + 1)
    if problems:
        raise RecipeError(problems)
    return data


def _message(err: dict, model: type[BaseModel]) -> str:
    """A pydantic error as 'what is wrong; what is expected'."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    shown = show(value)
    names = [p for p in err["loc"] if isinstance(p, str)]
    noun = names[-1] if names else "value"
    if kind == "missing":
        field = _field_at(model, err["loc"])
        described = f"; expected {field.description[0].lower()}{field.description[1:].rstrip('.')}" if field and field.description else ""
        return f"is required{described}"
    if kind == "string_pattern_mismatch":
        return f"{shown} is not a valid {noun}; expected letters, digits, '.', '_' and '-', starting with a letter or digit"
    if kind == "string_too_short":
        return f"is empty; expected a non-empty {noun}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {shown}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {shown}"
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
        return f"{shown} is not a valid {noun}{did_you_mean(value, choices)}; expected one of: {', '.join(choices)}"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def validate_model(model: type[BaseModel], data: Any, marks: Marks) -> BaseModel:
    """``model.model_validate(data)`` with every error located in the recipe file."""
    nulls = _drop_nulls(model, data, ())
    try:
        validated = model.model_validate(data)
    except ValidationError as exc:
        problems = [marks.problem(p, NULL_MESSAGE) for p in nulls]
        errors = exc.errors(include_url=False)
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
    if nulls:
        raise RecipeError([marks.problem(p, NULL_MESSAGE) for p in nulls])
    return validated


NULL_MESSAGE = "is empty (null); expected a value, or remove the key"


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


def _unknown_key(model: type[BaseModel], path: tuple) -> str:
    """'unknown key' with the allowed names of the model that holds it."""
    owner = _model_at(model, path[:-1])
    key = path[-1]
    if owner is None:
        return f"unknown key '{key}'"
    names = list(owner.model_fields)
    noun = getattr(owner, "key_noun", "key")
    return f"unknown {noun} '{key}'{did_you_mean(key, names)}; expected one of: {', '.join(names)}"


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





@dataclass
class LoadedRecipe:
    """A validated recipe with the marks that locate its fields."""

    recipe: Any  # recipe.Recipe (typed loosely to keep this module free of model imports at class level)
    marks: Marks
    file: str

    def resolved(self) -> dict:
        """The recipe after overrides and defaults, as plain JSON-able data."""
        return self.recipe.model_dump(mode="json", exclude_none=True)


def load_recipe(path: str | Path, overrides: Iterable[str] = (), text: str | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe; every problem is raised together as a RecipeError."""
    from tli_recipe.recipe.schema import Recipe, recipe_problems

    data, marks = read_recipe(path, text)
    data = apply_overrides(data, marks, overrides)
    recipe = validate_model(Recipe, data, marks)
    problems = [marks.problem(p, m) for p, m in recipe_problems(recipe)]
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(recipe=recipe, marks=marks, file=str(path))
