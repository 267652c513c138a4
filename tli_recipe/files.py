"""Small files the tool writes for the user (a rendered recipe, an eval report): whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from tli_recipe.errors import TliError


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_folder(folder: Path, log: Optional[Callable[[str], None]] = None) -> None:
    """``mkdir -p`` that says which folders it created (a typo in an output path makes a tree the user
    did not ask for, and they should hear of it)."""
    missing = []
    path = Path(folder)
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    Path(folder).mkdir(parents=True, exist_ok=True)
    if missing and log is not None:
        more = f" and {len(missing) - 1} folder{'s' * (len(missing) > 2)} inside it" if len(missing) > 1 else ""
        log(f"created {missing[-1]}{more} (it did not exist)")


def named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name when it has none (a write on a full disk names no file)."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def write_text_atomic(
    path: Path, text: str, mode: Optional[int] = None, log: Optional[Callable[[str], None]] = None
) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename (never half-written).

    The file gets ``mode``, by default the usual permissions of a new file (0666 less the umask),
    not mkstemp's 0600. A missing folder is created, and said to ``log``; an error names ``path``.
    """
    try:
        make_folder(path.parent, log)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise named(exc, path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise named(exc, path) from None
        raise


def missing_folders(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, outermost first."""
    missing = []
    for folder in Path(path).parents:
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing[::-1]


def write_output(path: str | Path, text: str, *, force: bool = False, replace: bool = False, what: str = "") -> str:
    """Write the file a command was asked for with ``-o``/``--output``: the one behaviour of every command.

    Missing parent folders are created (the returned line names the outermost one); a target that
    exists and is not a regular file (a folder, a link, a device) is refused; a file already holding
    ``text`` is left alone; a file that differs is replaced only with ``force``, or always when
    ``replace`` (a generated file such as a schema, which a rerun is meant to refresh). The file is
    written whole or not at all, mode 0666 less the umask. ``what`` names the new text in messages
    ("the rendering"). Returns the line to show the user: ``wrote PATH``, ``unchanged PATH``.
    """
    path = Path(path)
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise TliError(
                f"{path} exists and is not a regular file; nothing was written; remove it or choose another --output"
            )
        data = text.encode("utf-8")
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return f"unchanged {path}"
        if not (force or replace):
            raise TliError(
                f"{path} exists and differs{f' from {what}' if what else ''}; nothing was written; "
                "pass --force to replace it (or choose another --output)"
            )
    created = missing_folders(path)
    write_text_atomic(path, text)
    return f"wrote {path}" + (f" (created the folder {created[0]})" if created else "")
