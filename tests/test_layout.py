"""The package layout is the pipeline: every module imports on its own, imports point down.

Floors, bottom to top: errors/_version, recipe, source, plan, execute, training and
library (side by side), the public API (tli_recipe/__init__.py), cli. A module may
import its own floor or lower ones, never a higher one, so there is no import circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PKG = ROOT / "tli_recipe"
FLOORS = {
    "errors": 0,
    "_version": 0,
    "files": 0,
    "recipe": 1,
    "source": 2,
    "plan": 3,
    "execute": 4,
    "training": 5,
    "library": 5,
    "": 6,
    "__main__": 8,
    "cli": 7,
}
FLOORS_BY_FILE = {"tli_recipe.__main__": 8}
MODULES = sorted(p for p in PKG.rglob("*.py"))


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(module: str) -> int:
    if module in FLOORS_BY_FILE:
        return FLOORS_BY_FILE[module]
    parts = module.split(".")
    return FLOORS[parts[1] if len(parts) > 1 else ""]


def imports(path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tli_recipe"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "relative"))
    return found


def test_there_are_modules():
    assert len(MODULES) > 30


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    for line, target in imports(path):
        assert target != "relative", f"{path}:{line}: use absolute tli_recipe imports"
        if target == "tli_recipe" and floor(me) < 6:
            raise AssertionError(f"{path}:{line}: {me} imports the public API above it")
        assert floor(target) <= floor(me), (
            f"{path}:{line}: {me} (floor {floor(me)}) imports {target} (floor {floor(target)})"
        )


def test_every_module_imports_on_its_own():
    names = [module_name(p) for p in MODULES if p.name != "__main__.py"]
    assert "tli_recipe.training.train" in names
    code = (
        "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
        "    [sys.modules.pop(m) for m in list(sys.modules) if m.startswith('tli_recipe')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_python_dash_m_runs_the_cli():
    for args in (["-m", "tli_recipe", "--help"], ["-m", "tli_recipe.cli", "--help"]):
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0 and "validate" in result.stdout, result.stderr
