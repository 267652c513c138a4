"""The package layout is the pipeline: every module imports on its own, imports point down.

Floors, bottom to top: errors/_version, recipe, source, plan, execute, training and
library (side by side), the public API (tli_recipe/__init__.py), cli. A module may
import its own floor or lower ones, never a higher one, so there is no import circle.
A module uses only the public names of another (no ``from x import _name``, no ``x._name``).
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


# --- private names stay in their module ----------------------------------------------------------------

#: Private modules a module may import, and why. ``_version`` is the packaging convention for the file
#: holding ``__version__`` (setuptools-scm and hatch-vcs write the same file); its one name is a dunder.
PRIVATE_MODULES = {"tli_recipe._version": {"__version__"}}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node) -> str | None:
    """``a.b.c`` of an attribute chain over a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def private_uses(source: str, me: str) -> list[tuple[int, str, str]]:
    """``(line, defining module, private name)`` for each private name of another tli_recipe module that
    ``source`` (the module ``me``) uses: ``from tli_recipe.x import _name``, ``x._name`` on an imported
    tli_recipe name or module, or any import of a private module (``tli_recipe._x``) not in PRIVATE_MODULES."""
    tree = ast.parse(source)
    found: list[tuple[int, str, str]] = []
    bound: dict[str, str] = {}  # local name -> the tli_recipe module or object it stands for

    def private_module(line: int, module: str, names: set[str]) -> None:
        private = [part for part in module.split(".") if _private(part)]
        if private and module != me and not names <= PRIVATE_MODULES.get(module, set()):
            found.append((line, module, private[0]))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tli_recipe"):
            private_module(node.lineno, node.module, {a.name for a in node.names})
            for alias in node.names:
                if _private(alias.name) and node.module != me:
                    found.append((node.lineno, node.module, alias.name))
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tli_recipe"):
                    private_module(node.lineno, alias.name, {"*"})
                    # ``import a.b as m`` binds m to a.b; ``import a.b`` binds a, used as ``a.b.x``
                    bound[alias.asname or "tli_recipe"] = alias.name if alias.asname else "tli_recipe"
    for node in ast.walk(tree):
        owner = _dotted(node.value) if isinstance(node, ast.Attribute) and _private(node.attr) else None
        head, _, rest = (owner or "").partition(".")
        if head in bound:
            target = ".".join(filter(None, (bound[head], rest)))
            if target != me:
                found.append((node.lineno, target, node.attr))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_private_names_of_other_modules(path):
    """A module uses another module's public names only: a private name (``_x``) is free to change with its
    own module. What several modules need is public where it is defined (or moves where it belongs)."""
    me = module_name(path)
    bad = [
        f"{path}:{line}: {me} uses {name} of {module}; make it public in {module} or move it"
        for line, module, name in private_uses(path.read_text(), me)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "code, expected",
    [
        ("from tli_recipe.recipe.base import _fail", [(1, "tli_recipe.recipe.base", "_fail")]),
        ("from tli_recipe.recipe.base import Strict as _S, fail", []),
        ("from tli_recipe.me import _mine", []),
        ("def f():\n    from tli_recipe.source.hub import _token as t", [(2, "tli_recipe.source.hub", "_token")]),
        ("from tli_recipe.source import hub\nhub._token()", [(2, "tli_recipe.source.hub", "_token")]),
        ("from tli_recipe.source import hub as h\nx = h._token", [(2, "tli_recipe.source.hub", "_token")]),
        ("from tli_recipe.plan.model import Plan\nPlan._private", [(2, "tli_recipe.plan.model.Plan", "_private")]),
        ("import tli_recipe.source.hub\ntli_recipe.source.hub._token", [(2, "tli_recipe.source.hub", "_token")]),
        ("import tli_recipe.source.hub as hub\nhub._token", [(2, "tli_recipe.source.hub", "_token")]),
        ("from tli_recipe._version import __version__", []),
        ("from tli_recipe._version import __version__, other", [(1, "tli_recipe._version", "_version")]),
        ("from tli_recipe._secret import x", [(1, "tli_recipe._secret", "_secret")]),
        ("import tli_recipe._secret", [(1, "tli_recipe._secret", "_secret")]),
        ("from tli_recipe.source import hub\nhub.__name__, self._x, other._y", []),
    ],
)
def test_private_uses_finds_each_form(code, expected):
    assert private_uses(code, "tli_recipe.me") == expected


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


def _plan_models() -> set[type]:
    """Every pydantic model the Plan holds, following its fields' annotations down."""
    import typing

    from pydantic import BaseModel

    from tli_recipe.plan.model import Plan

    seen: set[type] = set()
    todo: list[object] = [Plan]
    while todo:
        item = todo.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            if item not in seen:
                seen.add(item)
                todo += [f.annotation for f in item.model_fields.values()]
        else:
            todo += typing.get_args(item)
    return seen


def test_the_plan_holds_only_plan_types():
    """The plan is pure data of its own floor: no recipe type in any of its fields (a recipe model
    would make plan.json's meaning follow the recipe schema), and plan/model.py imports no recipe module."""
    models = _plan_models()
    assert len(models) > 10
    recipe_types = sorted(m.__qualname__ for m in models if not m.__module__.startswith("tli_recipe.plan."))
    assert recipe_types == []
    recipe_imports = [
        name for _line, name in imports(PKG / "plan" / "model.py") if name.startswith("tli_recipe.recipe")
    ]
    assert recipe_imports == []
