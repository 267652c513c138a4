"""The hostile-input harness: every case asserts the same five things.

``refused(result, message, inputs=..., target=..., secrets=...)`` checks, for one CLI run:
1. the exit status (2 for bad input unless told otherwise);
2. no traceback in stdout or stderr;
3. the expected located message (a substring or a regex);
4. every input tree is byte-identical to before (take ``snapshot(folder)`` first);
5. nothing is left beside the target (no ``.tmp-``/``.old-`` folders, no lock file), and
   no file below the target (if one exists) contains any of ``secrets``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

import pytest


def _root_helpers() -> dict:
    """The plain helpers of tests/conftest.py (tree_digest, write_recipe, logits_of...).

    Two conftest.py files outside packages share the module name ``conftest``: pytest drops
    the root one from ``sys.modules`` when it imports this one, so ``from conftest import ...``
    here (and in every test module collected after this folder) would find this file. Load
    the root file under its own name and re-export its helpers, not its fixtures or hooks.
    """
    import importlib.util
    import types

    from _pytest.fixtures import FixtureFunctionDefinition

    spec = importlib.util.spec_from_file_location(
        "_tests_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith(("_", "pytest_"))
        and not isinstance(value, (FixtureFunctionDefinition, types.ModuleType))
        # constants (ROOT, CONFIGS: Path objects whose __module__ is pathlib) and its own functions
        and (not callable(value) or getattr(value, "__module__", module.__name__) == module.__name__)
    }


globals().update(_root_helpers())
tree_digest = globals()["tree_digest"]


class Snapshot:
    def __init__(self, folders: Iterable[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        self.digests = [tree_digest(f) if f.is_dir() else None for f in self.folders]

    def unchanged(self) -> None:
        for folder, before in zip(self.folders, self.digests):
            after = tree_digest(folder) if folder.is_dir() else None
            assert after == before, f"{folder} changed"


@pytest.fixture
def snapshot():
    return lambda *folders: Snapshot(folders)


def leftovers(target: Path) -> list[str]:
    """Hidden work files of a run beside ``target`` (temporary and aside folders, lock files)."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}.") or p.name == f"{target.name}.lock"
    )


def refused(
    result,
    message: str | re.Pattern,
    *,
    status: int = 2,
    inputs: Optional[Snapshot] = None,
    target: Optional[Path] = None,
    secrets: Iterable[bytes] = (),
) -> None:
    output = (result.stdout or "") + (getattr(result, "stderr", "") or "")
    assert result.exit_code == status, f"exit {result.exit_code}, expected {status}:\n{output}"
    assert "Traceback" not in output, output
    if isinstance(message, re.Pattern):
        assert message.search(output), f"no match for {message.pattern!r} in:\n{output}"
    else:
        assert message in output, f"{message!r} not in:\n{output}"
    if inputs is not None:
        inputs.unchanged()
    if target is not None:
        assert leftovers(target) == [], leftovers(target)
        secrets = list(secrets)
        if secrets and target.exists():
            for path in target.rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    for secret in secrets:
                        assert secret not in data, f"{path} holds a secret read from outside the inputs"


@pytest.fixture
def hostile_cli():
    """Like ``cli``, but exceptions are caught so that a traceback counts as a failure, not a crash."""
    from click.testing import CliRunner

    from tli_recipe.cli import main

    runner = CliRunner()

    def invoke(*args, input: Optional[str] = None):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=True, input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            text = "".join(traceback.format_exception(result.exception))
            raise AssertionError(f"Traceback (uncaught {type(result.exception).__name__}):\n{text}")
        return result

    return invoke


@pytest.fixture(name="refused")
def refused_fixture():
    """The ``refused`` check above, as a fixture (test modules cannot import a conftest by name reliably)."""
    return refused


@pytest.fixture(name="leftovers")
def leftovers_fixture():
    return leftovers
