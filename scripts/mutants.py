"""Mutation check of the safeguards the test suite must protect (issue 14's list).

Applies one small breaking change at a time to the source tree, runs the tests, reports
KILLED (some test failed, as it must) or SURVIVED (the suite missed the bug), and restores
the file. Usage: ``.venv/bin/python scripts/mutants.py [NAME...]``; MUT_TESTS narrows the tests.
Every mutation below is KILLED on main; a SURVIVED line is a hole in the suite.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
M = {
    "zeros-as-bytes": (
        "tli_recipe/execute/shards.py",
        "self._handle.seek(nbytes(code, shape), os.SEEK_CUR)",
        "self._handle.write(bytes(nbytes(code, shape)))",
    ),
    "interp-wrong-source": (
        "tli_recipe/execute/executor.py",
        "(sources or {}).get(op.second_source, source).tensors.get(op.second_name)",
        "source.tensors.get(op.second_name)",
    ),
    "verify-any-nonzero": (
        "tli_recipe/execute/verify.py",
        "ok = _same_bits(got, want)",
        "ok = bool(got.any()) or not want.any()",
    ),
    "run-skip-check": ("tli_recipe/execute/executor.py", "    if mismatched:\n", "    if False:\n"),
    "writer-no-dtype": ("tli_recipe/execute/shards.py", " or tensor.dtype != torch_dtype(code)", ""),
    "no-sigterm": (
        "tli_recipe/execute/output.py",
        "previous = signal.signal(signal.SIGTERM, handler)",
        "previous = signal.getsignal(signal.SIGTERM)",
    ),
    "swap-no-rollback": (
        "tli_recipe/execute/output.py",
        "        if old is not None:\n            _restore(old, target)\n        raise",
        "        raise",
    ),
    "all-no-embed": ("tli_recipe/plan/stages.py", 'groups |= {"embeddings", "head"}', "pass"),
    "original-is-injected": (
        "tli_recipe/plan/stages.py",
        "if e.role == sel}",
        'if e.role in ("injected", "original")}',
    ),
    "quantized-ok": ("tli_recipe/plan/sources.py", "    if quantization:\n", "    if False:\n"),
    "bin-only-ok": ("tli_recipe/source/checkpoint.py", 'if not files and any(path.glob("*.bin")):', "if False:"),
}
names = sys.argv[1:] or list(M)
survived = 0
tests = os.environ.get(
    "MUT_TESTS", "tests/execute tests/hostile tests/plan tests/training tests/source tests/test_trust.py"
).split()
for name in names:
    path, old, new = M[name]
    f = ROOT / path
    text = f.read_text()
    assert text.count(old) == 1, (name, text.count(old))
    f.write_text(text.replace(old, new))
    try:
        r = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        last = [line for line in r.stdout.splitlines() if line.strip()][-1:]
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")][:1]
        survived += not r.returncode
        print(f"{name}: {'KILLED' if r.returncode else 'SURVIVED'} {failed} {last}", flush=True)
    finally:
        f.write_text(text)
sys.exit(1 if survived else 0)
