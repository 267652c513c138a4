"""The output directory: refuse unsafe targets, swap the finished folder into place.

Everything is written into a temporary directory beside the target, renamed onto it
only when complete; SIGTERM is treated like Ctrl-C so the temporary folder goes either way.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tli_recipe.errors import TliError
from tli_recipe.plan.model import Plan


def check_output(target: Path, plan: Plan, sources: dict, force: bool) -> None:
    resolved = target.resolve()
    for key, src in plan.sources.items():
        # The directory and every file it points to (hub-cache snapshots are symlinks into blobs/).
        roots = {Path(src.path).resolve()} | {Path(f).resolve().parent for f in sources[key].files()}
        for root in roots:
            if resolved == root or root in resolved.parents or resolved in root.parents:
                raise TliError(f"output {target} overlaps the source model {src.path} ({root}); "
                               "choose an output outside it (--output DIR)")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise TliError(f"output {target} exists and is not a directory; remove it or choose another --output")
    if target.exists():
        if not force:
            raise TliError(f"output {target} already exists; pass --force to replace it, or choose another --output")
        if any(target.iterdir()) and not (target / "plan.json").is_file():
            raise TliError(f"output {target} is not empty and holds no plan.json, so it is not a tli-recipe output; "
                           "--force replaces only those: remove it yourself or choose another --output")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the temporary directory is cleaned up either way."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished directory onto the target; an old target is removed only afterwards."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
