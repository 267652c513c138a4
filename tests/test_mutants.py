"""scripts/mutants.py stays runnable: each mutant's pattern is found exactly once in the package, and the
tests named to catch it exist. (Whether each mutant is killed is `make mutants`: a pytest run per mutant.)"""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
from conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


MUTANTS = _script()


@pytest.mark.parametrize("name", list(MUTANTS.M))
def test_each_mutant_applies_once_and_names_real_tests(name):
    m = MUTANTS.M[name]
    path, at = MUTANTS.locate(ROOT, m)
    assert path.read_text()[at : at + len(m.old)] == m.old and m.new != m.old
    for test in m.tests:
        file, _, function = test.partition("::")
        assert (ROOT / file).is_file(), f"{name}: {file} does not exist"
        if function:
            text = (ROOT / file).read_text()
            assert re.search(rf"^def {re.escape(function)}\(", text, re.M), f"{name}: no {function} in {file}"


def test_a_pattern_that_is_gone_or_repeated_is_an_error(tmp_path):
    pkg = tmp_path / "tli_recipe"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\nif x:\n    pass\n")
    (pkg / "b.py").write_text("def f():\n    if x:\n        pass\n")
    with pytest.raises(ValueError, match="occurs 2 times"):
        MUTANTS.locate(tmp_path, MUTANTS.Mutant("if x:", "if False:", ()))
    with pytest.raises(ValueError, match="occurs 0 times"):
        MUTANTS.locate(tmp_path, MUTANTS.Mutant("if y:", "if False:", ()))
    path, at = MUTANTS.locate(tmp_path, MUTANTS.Mutant("if x:", "if False:", (), anchor="def f():"))
    assert path.name == "b.py" and path.read_text()[at:].startswith("if x:")
