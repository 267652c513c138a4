"""Small files the tool writes for the user (a rendered recipe, an eval report): whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


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
