"""Errors that reach the user, and the one place their messages are formatted.

Every problem with a recipe is reported as ``file:line:col: field.path: message``.
All problems found in one pass are collected into a single :class:`RecipeError`,
so the user fixes them together instead of one run at a time.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

Path = tuple  # a field path: str keys and int indices, e.g. ("slices", 0, "layer_range")


def format_path(path: Sequence[object]) -> str:
    """``("slices", 0, "layer_range")`` -> ``slices[0].layer_range``; the root is ``(root)``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'o_proj'?)`` when a close match exists, else an empty string."""
    choices = [str(c) for c in choices]
    word = str(word)
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not match and len(word) >= 3:  # 'base' -> 'base_model'
        match = [c for c in choices if c.startswith(word)][:1]
    return f" (did you mean '{match[0]}'?)" if match else ""


def suggestion(word: str, choices: Iterable[str]) -> str | None:
    """The name ``did_you_mean`` would suggest, or None."""
    hint = did_you_mean(word, choices)
    return hint.split("'")[1] if hint else None


def show(value: object) -> str:
    """A value as the user wrote it in YAML: true, null, 'text', 4."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Problem:
    """One message about one place of a recipe."""

    path: Path
    message: str
    file: str = "<recipe>"
    line: int = 1
    column: int = 1

    def __str__(self) -> str:
        return f"{self.where()}: {format_path(self.path)}: {self.message}"

    def where(self) -> str:
        """``file:line:col``; a command-line option (``--set key=value``, ``--var``, ``--grid``) is
        shown whole instead, since a line and column glued to its value (``--set base_model=/x:1:18``)
        read as part of the value and add nothing to a one-line option."""
        if self.file.startswith("--"):
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class RecipeError(Exception):
    """All problems found in a recipe; the CLI prints them and exits with status 2."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class TliError(Exception):
    """A failure outside the recipe text (a checkpoint, the output directory...).

    The message names the file or tensor and says how to fix it. ``exit_code`` is
    2 for bad input and 1 for a failed check.
    """

    exit_code = 2


class VerifyError(TliError):
    """An output checkpoint does not match its plan or its base model."""

    exit_code = 1
