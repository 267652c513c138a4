"""Small files the tool writes for the user (a rendered recipe, an eval report): whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomic(path: Path, text: str, mode: Optional[int] = None) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename (never half-written).

    The file gets ``mode``, by default the usual permissions of a new file (0666 less the umask),
    not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
