"""Reading a hostile input file: a recipe, a template or a matrix someone shared.

Three guards, shared by every reader of YAML the user did not write themselves:

- the file must be a regular file (a symlink is judged by its target) and at most
  ``MAX_BYTES``; ``/dev/zero``, a FIFO or a directory is refused before it is opened for
  reading, and at most ``MAX_BYTES + 1`` bytes are ever read;
- the text must be UTF-8, and a bad byte is reported at its own line and column;
- YAML is composed without aliases (``*name``; a few hundred bytes of nested aliases
  expand to billions of nodes) and at most ``MAX_DEPTH`` levels deep (the composer and
  the walk that follows are recursive).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

import yaml

from tli_recipe.errors import Problem, RecipeError

#: Largest input file: recipes, templates and matrices are a few KiB of text.
MAX_BYTES = 1 << 20
#: Deepest nesting of mappings and lists; a recipe is at most about six levels deep.
MAX_DEPTH = 64

_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _refuse(file: str, message: str, line: int = 1, column: int = 1) -> RecipeError:
    return RecipeError([Problem((), message, file, line, column)])


def _not_regular(mode: int) -> Optional[str]:
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def read_bytes(path: str | Path, what: str, expected: str) -> bytes:
    """The bytes of a regular file of at most MAX_BYTES; anything else is a located RecipeError."""
    file = str(path)
    try:
        info = os.stat(path)  # follows a symlink: a link to /dev/zero is judged as /dev/zero
    except FileNotFoundError:
        raise _refuse(file, f"no such {what}; expected {expected}") from None
    except (OSError, ValueError) as exc:
        raise _refuse(file, f"cannot read the {what}: {exc}") from None
    kind = _not_regular(info.st_mode)
    if kind:
        raise _refuse(file, f"is {kind}, not a regular file; expected {expected}")
    if info.st_size > MAX_BYTES:
        raise _refuse(file, f"the {what} is {info.st_size} bytes; expected at most {MAX_BYTES} bytes (1 MiB)")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise _refuse(file, f"cannot read the {what}: {exc.strerror or exc}") from None
    try:
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind:
            raise _refuse(file, f"is {kind}, not a regular file; expected {expected}")
        chunks, size = [], 0
        while size <= MAX_BYTES:  # a file that grows after the stat is still read only up to the cap + 1
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _refuse(file, f"cannot read the {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise _refuse(file, f"the {what} is larger than {MAX_BYTES} bytes; expected at most {MAX_BYTES} bytes (1 MiB)")
    return b"".join(chunks)


def decode(data: bytes, file: str) -> str:
    """UTF-8 text; a byte that is not UTF-8 is reported at its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line_start = before.rfind(b"\n") + 1
        column = len(before[line_start:].decode("utf-8", "replace")) + 1
        raise _refuse(
            file,
            f"byte 0x{data[exc.start]:02x} is not UTF-8 text; expected a UTF-8 file",
            before.count(b"\n") + 1,
            column,
        ) from None


def read_text(path: str | Path, what: str, expected: str) -> str:
    """A UTF-8 regular file's text (see :func:`read_bytes`); every failure is a located RecipeError."""
    return decode(read_bytes(path, what, expected), str(path))


class _Refused(Exception):
    def __init__(self, message: str, mark) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark


class Loader(yaml.SafeLoader):
    """SafeLoader composing no alias and nothing deeper than MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"YAML aliases (*{event.anchor}) and merge keys (<<) are not supported: they can expand a few "
                "bytes into billions of values; expected the value written out in full",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    f"nesting is deeper than {MAX_DEPTH} levels; expected a recipe a few levels deep", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def compose(text: str, file: str) -> Optional[yaml.Node]:
    """The YAML node tree of ``text``; syntax errors, aliases and deep nesting are located RecipeErrors."""
    loader = None
    try:
        loader = Loader(text)  # the reader checks for control characters here
        return loader.get_single_node()
    except _Refused as exc:
        raise _refuse(file, exc.message, exc.mark.line + 1, exc.mark.column + 1) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem and exc.context_mark:
            where = exc.context.removeprefix("while parsing ").removeprefix("while scanning ").removeprefix("a ")
            what += (
                f" (in the {where} opened at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
            )
        raise _refuse(file, f"invalid YAML: {what}; fix the syntax", line, col) from None
    except yaml.reader.ReaderError as exc:  # a control character: located by its position in the text
        before = text[: max(exc.position, 0)]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise _refuse(file, f"invalid YAML: {str(exc).splitlines()[0]}; fix the file", line, col) from None
    except yaml.YAMLError as exc:
        raise _refuse(file, f"invalid YAML: {str(exc).splitlines()[0]}; fix the file") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_data(text: str, file: str):
    """Plain data of a YAML text (rendered templates, --set and --var values) with the same guards
    as a recipe file: no alias, bounded depth. Errors are located RecipeErrors."""
    node = compose(text, file)
    if node is None:
        return None
    try:
        return Loader("").construct_document(node)
    except yaml.YAMLError as exc:
        raise _refuse(file, f"invalid YAML: {str(exc).splitlines()[0]}; fix the syntax") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise _refuse(file, f"invalid YAML: {exc}; expected a number of usual size") from None
