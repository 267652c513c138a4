"""Read a recipe file, keeping the line and column of every key and value.

``read_recipe`` returns the plain data plus a :class:`Marks` table; ``validate_model`` (in
``recipe/validate.py``) runs the pydantic models and turns their errors into ``file:line:col`` problems.
No torch, no transformers: this module is on the fast path of ``validate`` and ``plan``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from tli_recipe.errors import Problem, RecipeError
from tli_recipe.recipe.read import compose, load_data, read_text
from tli_recipe.recipe.validate import NULL_MESSAGE, non_finite, validate_model

__all__ = [
    "Marks",
    "LoadedRecipe",
    "read_recipe",
    "read_text",
    "load_data",
    "apply_overrides",
    "validate_model",
    "load_recipe",
    "NULL_MESSAGE",
    "non_finite",
]


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


MERGE_TAG = "tag:yaml.org,2002:merge"


def _walk(node: yaml.Node, path: tuple, marks: Marks, problems: list[Problem]) -> Any:
    """Build plain Python data from a composed node, recording marks and duplicate keys.

    The composer bounds the depth (``read.MAX_DEPTH``) and refuses aliases, so this recursion is bounded
    and every node is visited once.
    """
    marks.values[path] = _mark(marks.file, node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(
                    Problem(path, "a key must be a plain name; expected name: value", *_mark(marks.file, key_node))
                )
                continue
            if key_node.tag == MERGE_TAG:
                problems.append(
                    Problem(
                        path,
                        "YAML merge keys (<<) are not supported; expected the keys written out in full",
                        *_mark(marks.file, key_node),
                    )
                )
                continue
            key = str(_scalar(key_node, path, marks, problems))
            child = path + (key,)
            if key in out:
                first = marks.keys[child]
                problems.append(
                    Problem(
                        child,
                        f"duplicate key '{key}' (first written at line {first[1]}); write each key once",
                        *_mark(marks.file, key_node),
                    )
                )
                continue
            marks.keys[child] = _mark(marks.file, key_node)
            out[key] = _walk(value_node, child, marks, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, path + (i,), marks, problems) for i, item in enumerate(node.value)]
    return _scalar(node, path, marks, problems)


class _ScalarLoader(yaml.SafeLoader):
    """One constructor for every scalar (a fresh SafeLoader per scalar is slow), keeping no cache of nodes."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        finally:
            self.constructed_objects.clear()


_SCALARS = _ScalarLoader("")


def _scalar(node: yaml.ScalarNode, path: tuple, marks: Marks, problems: list[Problem]) -> Any:
    # Resolve the scalar exactly as safe_load would (ints, floats, bools, null, strings).
    try:
        return _SCALARS.construct_object(node)
    except ValueError:  # an integer of more than 4300 digits (Python's int limit)
        problems.append(
            Problem(
                path,
                f"cannot read this number ({len(node.value)} digits); expected a number of usual size",
                *_mark(marks.file, node),
            )
        )
        return None


def read_recipe(path: str | Path, text: str | None = None) -> tuple[dict, Marks]:
    """Parse a recipe file into plain data and marks; YAML errors become a RecipeError."""
    file = str(path)
    if text is None:
        text = read_text(path, "recipe file", "a path to a .yaml recipe")
    marks = Marks(file)
    problems: list[Problem] = []
    node = compose(text, file)
    try:
        data = _walk(node, (), marks, problems) if node is not None else None
    except yaml.MarkedYAMLError as exc:  # a tag no safe constructor knows (!!python/object...)
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise RecipeError(
            [Problem((), f"invalid YAML: {exc.problem or exc.context}; fix the syntax", file, line, col)]
        ) from None
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


def _expand(data: Any, path: list) -> tuple[list[list], str]:
    """``path`` with each ``*`` replaced by every index of the list it stands for (``stages[*].precision``
    -> one path per stage), or ``([], why)`` when a ``*`` is not over a list with items."""
    paths: list[list] = [[]]
    for _depth, part in enumerate(path):
        if part != "*":
            paths = [p + [part] for p in paths]
            continue
        grown: list[list] = []
        for prefix in paths:
            target: Any = data
            for step in prefix:
                target = (
                    target.get(step)
                    if isinstance(target, dict)
                    else (
                        target[step]
                        if isinstance(target, list) and isinstance(step, int) and step < len(target)
                        else None
                    )
                )
            if not isinstance(target, list) or not target:
                shown = "".join(f"[{s}]" if isinstance(s, int) else (f".{s}" if i else s) for i, s in enumerate(prefix))
                return [], (
                    f"{shown or '(root)'}[*]: no list items to set ("
                    f"{'an empty list' if isinstance(target, list) else 'not a list'}); expected [*] after a list "
                    "that has items, such as stages[*]"
                )
            grown += [prefix + [i] for i in range(len(target))]
        paths = grown
    return paths, ""


def _set(data: dict, path: list, value: Any) -> tuple[bool, tuple, str]:
    """Set ``value`` at ``path`` (creating mappings and appending list items as needed); (ok, where, why)."""
    target: Any = data
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
            return False, tuple(path[: depth + 1]), "cannot descend here; expected an existing key or list index"
    last = path[-1]
    if isinstance(target, dict) and isinstance(last, str):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last <= len(target):
        if last == len(target):
            target.append(value)
        else:
            target[last] = value
    else:
        return False, tuple(path), "cannot set this path; expected a key of a mapping or a list index"
    return True, (), ""


def apply_overrides(data: dict, marks: Marks, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) and mark them as ``--set``.

    ``[*]`` stands for every item of a list: ``stages[*].precision=float32`` sets each stage's precision.
    """
    problems: list[Problem] = []
    for item in overrides:
        where = f"--set {item}"
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem((), "expected key.path=value", where, 1, 1))
            continue
        try:
            path = _split_path(key.strip())
            value = load_data(raw, where) if raw.strip() else ""
        except RecipeError as exc:
            problems.append(
                Problem(
                    (), f"cannot parse the override ({exc.problems[0].message}); expected key.path=value", where, 1, 1
                )
            )
            continue
        except ValueError as exc:
            problems.append(Problem((), f"cannot parse the override ({exc}); expected key.path=value", where, 1, 1))
            continue
        paths, why = _expand(data, path)
        if why:
            problems.append(Problem(tuple(p for p in path if p != "*"), why, where, 1, 1))
            continue
        for concrete in paths:
            ok, at, why = _set(data, concrete, copy.deepcopy(value))
            if not ok:
                problems.append(Problem(at, why, where, 1, 1))
                break
            # Every position under the overridden path now comes from the command line.
            tup = tuple(concrete)
            for table in (marks.values, marks.keys):
                for p in [p for p in table if p[: len(tup)] == tup]:
                    del table[p]
            marks.values[tup] = (where, 1, len("--set ") + len(key) + 2)
            marks.keys[tup] = (where, 1, len("--set ") + 1)
    if problems:
        raise RecipeError(problems)
    return data


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
    """Read, override and validate a recipe; every problem is raised together as a RecipeError.

    ``output`` and dataset paths written in the recipe are resolved against the recipe file's folder
    (a shared recipe must not write or read relative to wherever it is run from); values given with
    ``--set`` stay relative to the working directory.
    """
    from tli_recipe.recipe.checks import output_config_problems, recipe_problems
    from tli_recipe.recipe.schema import Recipe

    data, marks = read_recipe(path, text)
    data = apply_overrides(data, marks, overrides)
    recipe = validate_model(Recipe, data, marks)
    problems = [marks.problem(p, m) for p, m in recipe_problems(recipe)]
    problems += [marks.problem(p, m, prefer_key=True) for p, m in output_config_problems(recipe.output_config)]
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: (p.file != marks.file, p.line, p.column)))
    return LoadedRecipe(recipe=recipe_relative(recipe, marks), marks=marks, file=str(path))


def recipe_relative(recipe: Any, marks: Marks) -> Any:
    """``recipe`` with ``output`` and ``stages[i].datasets[j].path`` absolute: a path written in the
    recipe file is joined to the file's folder, one from ``--set`` to the working directory."""
    folder = Path(marks.file).parent

    def resolve(path: tuple, value: str) -> str:
        written_here = marks.locate(path)[0] == marks.file
        try:
            expanded = os.path.expanduser(value)
        except (RuntimeError, KeyError):  # ~user that does not exist: kept as written
            expanded = value
        return os.path.abspath(os.path.join(folder, expanded) if written_here else expanded)

    update: dict[str, Any] = {}
    if recipe.output is not None:
        update["output"] = resolve(("output",), recipe.output)
    stages = []
    for i, stage in enumerate(recipe.stages):
        datasets = [
            d.model_copy(update={"path": resolve(("stages", i, "datasets", j, "path"), d.path)})
            for j, d in enumerate(stage.datasets)
        ]
        stages.append(stage.model_copy(update={"datasets": datasets}))
    update["stages"] = stages
    return recipe.model_copy(update=update)
