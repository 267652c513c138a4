"""The exclusive lock on an output target: ``.<name>.lock`` beside it, holding the writer's pid.

The lock is an ``flock`` on that file, so the kernel releases it when a run dies however
it dies (even SIGKILL); the file then still names the dead run's pid, and the next run
takes it over and says so. A live holder makes the next run stop with a message naming it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from tli_recipe.errors import TliError


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OverflowError:
        return False
    return True


@contextmanager
def shielded() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while cleanup runs; they arrive when it is done."""
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _recorded(fd: int) -> tuple[Optional[int], dict[str, str]]:
    """The pid on a lock file's first line, and its ``key value`` notes (the run's work folders).

    Only a decimal pid is trusted or echoed; the notes are checked by whoever uses them.
    """
    try:
        lines = os.pread(fd, 4096, 0).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, {}
    pid = lines[0].strip() if lines else ""
    notes = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    return (int(pid) if pid.isdigit() and len(pid) < 11 else None), notes


def _recorded_pid(fd: int) -> Optional[int]:
    return _recorded(fd)[0]


class TargetLock:
    """``with TargetLock(target, log):`` nobody else's run writes ``target`` meanwhile."""

    def __init__(self, target: Path, log=print) -> None:
        self.target, self.path, self.log = target, lock_path(target), log
        self.fd: Optional[int] = None
        #: the pid and notes of the dead run whose lock this one took over (pid None: none)
        self.stale_pid: Optional[int] = None
        self.stale_notes: dict[str, str] = {}

    def __enter__(self) -> "TargetLock":
        for _ in range(20):  # a holder that just finished may unlink the file we opened: open it again
            fd = self._open()
            if self._try_lock(fd) and self._is_current(fd):
                break
            os.close(fd)
        else:  # pragma: no cover - twenty releases in a row while we tried
            raise TliError(f"output {self.target}: could not lock {self.path}; another run keeps taking it, try again")
        stale, notes = _recorded(fd)
        self.fd = fd
        try:
            self.note()  # may fail (a full disk): the lock file must not stay behind then
        except BaseException:
            self.__exit__(None, None, None)
            raise
        if stale is not None and stale != os.getpid():
            self.stale_pid, self.stale_notes = stale, notes
            self.log(f"{self.path}: took over the lock of an earlier run that did not finish (pid {stale})")
        return self

    def note(self, **notes: str) -> None:
        """Record this run's pid and work folders, so a run after a SIGKILL knows what to clean up."""
        text = f"{os.getpid()}\n" + "".join(f"{key} {value}\n" for key, value in notes.items())
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode("utf-8", "surrogateescape"), 0)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TliError(f"{self.path} is a symbolic link, not a tli-recipe lock file; remove it") from exc
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise TliError(f"{self.path} is not a regular file, not a tli-recipe lock file; remove it")
        return fd

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pid = _recorded_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid is not None else "pid not yet recorded"
            raise TliError(
                f"output {self.target} is being written by another tli-recipe run ({who}, lock "
                f"{self.path}); wait for it to finish, or choose another --output"
            ) from None
        except OSError as exc:  # no flock on this file system: trust the recorded pid instead
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            pid = _recorded_pid(fd)
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                os.close(fd)
                raise TliError(
                    f"output {self.target} is being written by another tli-recipe run (pid {pid}, "
                    f"lock {self.path}); wait for it to finish, or choose another --output"
                ) from None
            return True

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc) -> None:
        """Release: remove the file (while still holding it, so no one locks a removed file), then close."""
        if self.fd is None:
            return
        with shielded():
            try:
                if self._is_current(self.fd):
                    os.unlink(self.path)
            except OSError:
                pass
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
