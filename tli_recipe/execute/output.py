"""The output directory: refuse unsafe targets, write beside them, swap the finished folder in.

One lifecycle, ``staged_output``, for every run: an exclusive lock beside the target
(``.<name>.lock``, holding the pid), removal of temporary folders that dead runs left,
a temporary folder that becomes the target only when complete, a re-check of the target
right before the swap, and cleanup that never raises. ``--force`` replaces only a genuine
earlier output, recognised by its manifest (``tli-recipe.json``, see ``manifest.py``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from tli_recipe.errors import TliError
from tli_recipe.execute.lock import TargetLock, pid_alive, shielded
from tli_recipe.execute.manifest import MANIFEST, output_problem, write_manifest
from tli_recipe.files import current_umask, make_folder
from tli_recipe.plan.model import Plan

#: Inside a temporary folder while a run writes it: which run made it (pid, host, target name).
RUN_MARKER = ".tli-recipe-run"


def check_output(target: Path, plan: Plan, sources: dict, force: bool) -> None:
    """The checks made before any work: the output is outside every source and may be written."""
    resolved = target.resolve()
    for key, src in plan.sources.items():
        # The directory and every file it points to (hub-cache snapshots are symlinks into blobs/).
        roots = {Path(src.path).resolve()} | {Path(f).resolve().parent for f in sources[key].files()}
        for root in roots:
            if resolved == root or root in resolved.parents or resolved in root.parents:
                raise TliError(
                    f"output {target} overlaps the source model {src.path} ({root}); "
                    "choose an output outside it (--output DIR)"
                )
    check_target(target, force)


def check_target(target: Path, force: bool, appeared: bool = False) -> bool:
    """Refuse a target that is not absent, empty-with-force, or (with --force) an earlier tli-recipe output.

    ``appeared``: the check right before the swap, so whatever is there now came during the run.
    Returns whether the target exists (and may be replaced).
    """
    if not os.path.lexists(target):
        return False
    during = " appeared while this run was writing and" if appeared else ""
    kept = "; it was left as it is and nothing was written" if appeared else ""
    if target.is_symlink() or not target.is_dir():
        raise TliError(
            f"output {target}{during} exists and is not a directory{kept}; remove it or choose another --output"
        )
    if not force:
        raise TliError(
            f"output {target}{during} already exists{kept}; pass --force to replace it, or choose another --output"
        )
    problem = output_problem(target) if any(target.iterdir()) else None  # an empty folder loses nothing
    if problem:
        raise TliError(
            f"output {target}{during} is not a tli-recipe output ({problem}){kept}; --force replaces only "
            "an earlier tli-recipe output: remove it yourself or choose another --output"
        )
    return True


@contextmanager
def staged_output(target: Path, *, force: bool, recipe_sha256: str, sync: bool = False, log=print) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; when the block ends normally it becomes ``target``.

    Under the lock: stale folders of dead runs go, the target is checked, and checked again
    right before the swap. On any failure (exception, Ctrl-C, SIGTERM, a full disk) the
    temporary folder is removed and the target is as it was.
    """
    try:
        make_folder(target.parent, log)
        with _staged(target, force, recipe_sha256, sync, log) as tmp:
            yield tmp
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" (writing {exc.filename})" if exc.filename else ""
        raise TliError(
            f"output {target}: no space left on the file system of {target.parent}{where}; nothing was "
            f"written and the partial output was removed, as was the lock; free space or choose another --output"
        ) from exc


@contextmanager
def _staged(target: Path, force: bool, recipe_sha256: str, sync: bool, log) -> Iterator[Path]:
    with sigterm_as_interrupt(), TargetLock(target, log) as lock:
        if lock.stale_pid is not None:
            finish_dead_swap(target, lock.stale_pid, lock.stale_notes, log)
        remove_stale_runs(target, log)
        check_target(target, force)
        tmp = _make_temp(target)
        try:
            lock.note(tmp=tmp.name)
            yield tmp
            write_manifest(tmp, recipe_sha256, skip={RUN_MARKER})
            if sync:
                fsync_tree(tmp)
            (tmp / RUN_MARKER).unlink()
            # True: a genuine earlier output was there (checked); whatever comes after this check is not ours.
            replace = check_target(target, force, appeared=True)
            swap_into_place(tmp, target, aside=lambda old: lock.note(tmp=tmp.name, aside=old.name), replace=replace)
            if sync:
                _fsync(target.parent)  # the renames themselves
        except BaseException:
            remove_quietly(tmp)
            raise


def _make_temp(target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the output is an ordinary directory
        (tmp / RUN_MARKER).write_text(
            json.dumps({"tool": "tli-recipe", "pid": os.getpid(), "host": socket.gethostname(), "target": target.name})
            + "\n"
        )
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def _marker_pid(folder: Path, target: Path) -> Optional[int]:
    """The pid of the run that made ``folder``, when it is a temporary folder of this tool for ``target``."""
    marker = folder / RUN_MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or marker.stat().st_size > 4096:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "tli-recipe" or data.get("target") != target.name:
        return None
    pid = data.get("pid")
    if data.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return pid


def remove_stale_runs(target: Path, log) -> None:
    """Remove the temporary folders of dead runs on ``target`` (called under the lock).

    Only folders this tool made are touched: named ``.<target>.tmp-*``, holding the run
    marker written by ``_make_temp`` for this target and host, whose pid is no longer alive.
    """
    prefix = f".{target.name}.tmp-"
    try:
        entries = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return
    for folder in entries:
        pid = _marker_pid(folder, target)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        remove_quietly(folder)
        if not os.path.lexists(folder):
            log(f"removed {folder}: the temporary folder of an earlier run on {target} that did not finish (pid {pid})")


def finish_dead_swap(target: Path, pid: int, notes: dict[str, str], log) -> None:
    """Undo what a run killed while swapping left (called under the lock it held, now ours).

    Its lock notes name its temporary folder and where the previous output was moved
    aside; names that are not this target's work folders are ignored.
    """
    for key in ("tmp", "aside"):
        name = notes.get(key, "")
        folder = target.parent / name
        if (
            not name.startswith(f".{target.name}.{key if key == 'tmp' else 'old'}-")
            or "/" in name
            or folder.is_symlink()
            or not folder.is_dir()
        ):
            continue
        if key == "tmp" and not any((folder / n).is_file() for n in (RUN_MARKER, MANIFEST)):
            continue  # not in the state this tool leaves its temporary folders in
        if key == "aside" and not os.path.lexists(target):
            os.rename(folder, target)
            log(f"restored {target} from {folder}: an earlier run (pid {pid}) was stopped while replacing it")
            continue
        if key == "aside" and output_problem(target) is not None:
            log(
                f"kept {folder}: an earlier run (pid {pid}) moved the previous output there, and {target} is not "
                "the output that replaced it; look at both and remove one yourself"
            )
            continue
        remove_quietly(folder)
        what = "temporary folder" if key == "tmp" else "previous output it had replaced"
        log(f"removed {folder}: the {what} of an earlier run on {target} that did not finish (pid {pid})")


def remove_quietly(folder: Path) -> None:
    """Remove a folder this run made; never raises (a cleanup error must not hide the real one).

    Ctrl-C and SIGTERM wait until it is done, so a second signal cannot leave half of it.
    """
    with shielded():
        try:
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


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


def swap_into_place(
    tmp: Path, target: Path, aside: Optional[Callable[[Path], None]] = None, replace: bool = True
) -> None:
    """Rename the finished directory onto the target; an old target is removed only afterwards.

    The final rename never replaces anything (``rename_noreplace``), so whatever appeared at the
    target since the last check makes it fail instead of being lost or written into.
    If the final rename fails, the old target is renamed back. ``aside(old)`` is called
    before the old target moves (the lock records where it goes, for a run after a SIGKILL).
    ``replace=False``: the target was absent at the last check, so whatever is there now is not
    ours to move: the swap fails and leaves it as it is.
    """
    old = None
    if replace and os.path.lexists(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        if aside is not None:
            aside(old)
        os.rename(target, old)
    try:
        rename_noreplace(tmp, target)
    except BaseException as exc:
        if old is not None:
            _restore(old, target)
        if isinstance(exc, FileExistsError):
            raise TliError(
                f"output {target} appeared while this run was writing; it was left as it is and nothing was "
                "written; remove it or choose another --output"
            ) from None
        raise
    if old is not None:
        remove_quietly(old)


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), in one step where the kernel can.

    ``os.rename`` of a directory silently replaces an *empty* directory, so a folder a user creates
    between the last check and the rename would be swallowed; Linux's ``renameat2(RENAME_NOREPLACE)``
    closes that window. Where it is missing (another OS, a file system without it) the check and the
    rename are two steps.
    """
    libc = _libc()
    if libc is not None:
        result = libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            libc.renameat2.restype = ctypes.c_int
        except (OSError, AttributeError):
            libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def _restore(old: Path, target: Path) -> None:
    with shielded():
        try:
            os.rename(old, target)
        except OSError as exc:
            raise TliError(
                f"output {target}: the new output could not be renamed into place, nor the previous one "
                f"back ({exc.strerror}); the previous output is kept at {old}"
            ) from exc


def fsync_tree(folder: Path) -> None:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
