"""Bounds on rendering untrusted templates: recipe templates and lm-eval task templates.

Two layers. In the process, the jinja sandbox refuses ``*`` and ``**`` whose result would be
huge (``'x' * 10**9``, ``9**9**9``) before computing it. Around it, a rendering runs in a
forked child process under ``RLIMIT_CPU`` and ``RLIMIT_AS``, so nested loops or any other way
to spend time or memory end with a message naming the limit instead of a hang: the parent
gets the child's result as JSON, or the limit that stopped it.

The limits default to far more than a template needs (a real one renders in milliseconds and
a few MiB) and are raised with ``TLI_RECIPE_TEMPLATE_CPU_SECONDS`` (seconds of CPU time) and
``TLI_RECIPE_TEMPLATE_MEMORY`` (bytes, or 2GiB, 500MB...); ``0`` turns a limit off. Where
``fork`` or ``resource`` is missing (not Linux or macOS), templates render in the process with
the sandbox's own bounds only.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Optional

from jinja2.sandbox import SecurityError

from tli_recipe.errors import TliError

#: Largest string or list a template may build with * (a shared template must not exhaust memory).
MAX_SIZE = 1_000_000
#: Largest exponent of ``**``.
MAX_EXPONENT = 256

CPU_ENV = "TLI_RECIPE_TEMPLATE_CPU_SECONDS"
MEMORY_ENV = "TLI_RECIPE_TEMPLATE_MEMORY"
DEFAULT_CPU_SECONDS = 20
DEFAULT_MEMORY = 2 * 2**30


class BoundedOps:
    """A jinja sandbox mixin refusing huge ``*`` and ``**`` results before they are computed."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SIZE:
                    raise SecurityError(
                        f"a sequence of {len(seq) * n} items is larger than the sandbox allows ({MAX_SIZE})"
                    )
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than the sandbox allows ({MAX_EXPONENT})")
        return super().call_binop(context, operator, left, right)  # type: ignore[misc]


@dataclass(frozen=True)
class Limits:
    """CPU seconds and bytes of memory a rendering may use (None: unlimited)."""

    cpu_seconds: Optional[int]
    memory: Optional[int]

    def describe_cpu(self) -> str:
        return f"the CPU-time limit of {self.cpu_seconds} s ({CPU_ENV} raises it)"

    def describe_memory(self) -> str:
        return f"the memory limit of {self.memory / 2**20:,.0f} MiB ({MEMORY_ENV} raises it)"


def limits() -> Limits:
    """The limits from the environment, or the defaults; a bad value is an error naming the variable."""
    from tli_recipe.recipe.sizes import parse_size

    cpu_text = os.environ.get(CPU_ENV, "").strip()
    mem_text = os.environ.get(MEMORY_ENV, "").strip()
    try:
        cpu = int(cpu_text) if cpu_text else DEFAULT_CPU_SECONDS
        if cpu < 0:
            raise ValueError
    except ValueError:
        raise TliError(f"{CPU_ENV}={cpu_text[:40]!r}: expected a whole number of seconds (0: no limit)") from None
    try:
        memory = parse_size(mem_text) if mem_text else DEFAULT_MEMORY
        if memory < 0:
            raise ValueError
    except ValueError:
        raise TliError(
            f"{MEMORY_ENV}={mem_text[:40]!r}: expected a size in bytes, or 2GiB, 500MB... (0: no limit)"
        ) from None
    return Limits(cpu or None, memory or None)


class LimitHit(Exception):
    """A rendering was stopped by a limit; the message names it and how to raise it."""


def _vm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _apply(lim: Limits) -> None:
    import resource

    if lim.cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 1))
    vm = _vm_bytes()
    if lim.memory is not None and vm is not None:
        # The child starts with the parent's address space (copy-on-write): the budget comes on top.
        cap = vm + lim.memory
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or cap <= hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def run_bounded(func: Callable[..., Any], *args: Any, lim: Optional[Limits] = None) -> Any:
    """``func(*args)`` in a forked child under the limits; its JSON-able result, or ``LimitHit``.

    ``func`` handles its own errors and returns data describing them: the child's result crosses
    as JSON, so only plain data comes back. Without ``fork`` it runs here, unbounded.
    """
    lim = lim if lim is not None else limits()
    if not hasattr(os, "fork") or (lim.cpu_seconds is None and lim.memory is None):
        return func(*args)
    try:
        import resource  # noqa: F401 - only to know the limits can be set
    except ImportError:  # pragma: no cover - not a Unix
        return func(*args)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        status = 0
        try:
            os.close(read_fd)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once; the parent reports it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _apply(lim)
            try:
                data = json.dumps({"ok": func(*args)})
            except MemoryError:
                data = json.dumps({"memory": True})
            view = memoryview(data.encode("utf-8"))
            while view:
                view = view[os.write(write_fd, view) :]
        except BaseException:  # noqa: BLE001 - nothing may escape a forked child
            status = 3
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            while chunk := pipe.read(1 << 16):
                chunks.append(chunk)
    finally:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and lim.cpu_seconds is not None:
            raise LimitHit(f"it used more than {lim.describe_cpu()}")
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        raise LimitHit(f"the rendering process ended with signal {sig}")
    try:
        result = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        result = None
    if isinstance(result, dict) and result.get("memory"):
        raise LimitHit(f"it needed more than {lim.describe_memory()}")
    if not isinstance(result, dict) or "ok" not in result:
        if lim.memory is not None:
            raise LimitHit(
                f"the rendering process failed (exit {os.WEXITSTATUS(status)}), likely at {lim.describe_memory()}"
            )
        raise LimitHit(f"the rendering process failed (exit {os.WEXITSTATUS(status)})")
    return result["ok"]
