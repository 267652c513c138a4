"""Mutation check: each safeguard the test suite claims to protect, broken on purpose, must fail a test.

A mutant is a one-line break of one safeguard: ``old`` replaced by ``new`` in the one file of
``tli_recipe/`` that holds ``old`` (the first ``old`` after ``anchor``, when an anchor is given), and
the tests that must catch it. Patterns name no file and must be unique in the package, so they survive
reformatting elsewhere and code moving between modules; a pattern that is gone or ambiguous is an ERROR
to fix here, never a silent pass.

The repository (tracked and untracked files, not .git or ignored files) is copied into a temporary
folder; the tests first run there unmutated (a failing baseline would make every mutant look killed),
then once per mutant. The working tree is never touched, so an interrupted run leaves nothing behind.
Each mutant reports KILLED (a test failed, as it must), SURVIVED (the suite missed the bug: a hole), or
ERROR (pattern missing, tests not found or all skipped, a timeout).

Usage: ``python scripts/mutants.py [NAME...]`` (``--list`` lists the mutants); exit status 1 when a
mutant survives or errs. Run it with the project's interpreter (``make mutants``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds per pytest run: a mutant that hangs its tests is an ERROR, not a kill


@dataclass(frozen=True)
class Mutant:
    old: str
    new: str
    tests: tuple[str, ...]
    anchor: str = ""


IC = "tests/execute/test_independent_checks.py::"
PLAN = "tests/plan/test_plan.py::"
M = {
    # --- issue 14: the executor, verify, the output swap, stage selection, refused sources
    "zeros-as-bytes": Mutant(
        "self._handle.seek(nbytes(code, shape), os.SEEK_CUR)",
        "self._handle.write(bytes(nbytes(code, shape)))",
        (IC + "test_zero_tensors_are_written_as_holes",),
        anchor="def zeros(self, name: str) -> int:",
    ),
    "interp-wrong-source": Mutant(
        "(sources or {}).get(op.second_source, source).tensors.get(op.second_name)",
        "source.tensors.get(op.second_name)",
        (IC + "test_interpolation_reads_the_next_layer_from_its_own_source",),
    ),
    "verify-any-nonzero": Mutant(
        "ok = _same_bits(got, want)",
        "ok = bool(got.any()) or not want.any()",
        (IC + "test_verify_catches_one_wrong_bit_in_any_op",),
    ),
    "run-skip-check": Mutant(
        "if mismatched:",
        "if False:",
        (IC + "test_run_refuses_a_source_that_changed_since_the_plan",),
        anchor="def _check_sources(plan: Plan) -> dict:",
    ),
    "writer-no-dtype": Mutant(
        "if tuple(tensor.shape) != shape or tensor.dtype != torch_dtype(code):",
        "if tuple(tensor.shape) != shape:",
        (IC + "test_shard_writer_refuses_a_tensor_of_another_dtype",),
    ),
    "no-sigterm": Mutant(
        "previous = signal.signal(signal.SIGTERM, handler)",
        "previous = signal.getsignal(signal.SIGTERM)",
        ("tests/hostile/test_output.py::test_sigterm_mid_run_leaves_the_previous_output_and_no_temporary_folder",),
    ),
    "swap-no-rollback": Mutant(
        "_restore(old, target)",
        "pass",
        ("tests/hostile/test_output.py::test_a_failed_final_rename_restores_the_previous_output",),
        anchor="rename_noreplace(tmp, target)",
    ),
    "all-no-embed": Mutant(
        'groups |= {"embeddings", "head"}',
        "pass",
        (PLAN + "test_a_lora_all_stage_adapts_the_layers_not_embeddings_and_head",),
    ),
    "original-is-injected": Mutant(
        "if e.role == sel}",
        'if e.role in ("injected", "original")}',
        (PLAN + "test_stages_resolve_to_layers_and_parameter_names",),
        anchor="def _selected(stage: Stage,",
    ),
    "upcycle-original-is-injected": Mutant(
        "if e.role == sel}",
        'if e.role in ("injected", "original")}',
        ("tests/plan/test_upcycle_plan.py",),
        anchor="def select_layers(upc: Upcycling,",
    ),
    "quantized-ok": Mutant(
        "if quantization:",
        "if False:",
        ("tests/hostile/test_plan_inputs.py::test_a_quantized_source_is_refused",),
    ),
    "bin-only-ok": Mutant(
        'if not files and any(path.glob("*.bin")):',
        "if False:",
        ("tests/hostile/test_plan_inputs.py::test_a_bin_only_source_is_refused",),
    ),
    # --- issue 22: one-line breaks the suite used to miss
    "every-vs-base-layers": Mutant(
        "if inject.every is not None and inject.every > stack:",
        "if inject.every is not None and inject.every > base_layers:",
        (PLAN + "test_inject_every_is_checked_against_the_sliced_stack",),
    ),
    "verify-atol-ignored": Mutant(
        "            atol=atol,\n            whole=whole,",
        "            whole=whole,",
        (IC + "test_verify_atol_is_the_tolerance_of_the_logits",),
    ),
    "verify-lesa-hidden-unchecked": Mutant(
        "ok = bool(torch.isfinite(got.float()).all())",
        "ok = True",
        (IC + "test_verify_refuses_a_non_finite_lesa_tensor", IC + "test_verify_refuses_a_non_finite_hidden_router"),
    ),
    "verify-hidden-recomputed": Mutant(
        'if op.op in ("lesa", "hidden"):',
        'if op.op in ("lesa",):',
        (IC + "test_verify_refuses_a_non_finite_hidden_router",),
        anchor="def expected_tensor(",
    ),
    "sandbox-no-exponent-cap": Mutant(
        'if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:',
        "if False:",
        ("tests/library/test_templates.py::test_sandbox_refuses_python_internals",),
    ),
    "noise-seed-per-source-layer": Mutant(
        "seed=tensor_seed(recipe.seed, target) if OPS[kind].seeded else None,",
        "seed=tensor_seed(recipe.seed, arch.layer_key(entry.layer, suffix)) if OPS[kind].seeded else None,",
        (IC + "test_noise_seeds_differ_across_injected_layers_copying_the_same_layer",),
    ),
    "growth-bound-exclusive": Mutant(
        "if total > bound:",
        "if total >= bound:",
        (PLAN + "test_the_growth_bound_holds_exactly_at_its_limit",),
        anchor="total, bound = stack + inject.copies * positions",
    ),
    "slices-bound-exclusive": Mutant(
        "if total > bound:",
        "if total >= bound:",
        (PLAN + "test_the_growth_bound_holds_exactly_at_its_limit",),
        anchor="total = sum(end - start for start, end in (piece.layer_range for piece in recipe.slices))",
    ),
    "lora-all-trains-embeddings": Mutant(
        "if stage.lora is None:",
        "if True:",
        (PLAN + "test_a_lora_all_stage_adapts_the_layers_not_embeddings_and_head",),
        anchor="def _selected(stage: Stage,",
    ),
    "pin-compares-a-prefix": Mutant(
        "if name in found[key] and found[key][name] != digest:",
        "if name in found[key] and found[key][name][:-1] != digest[:-1]:",
        ("tests/source/test_provenance.py::test_a_pin_that_differs_only_in_its_last_character_is_refused",),
    ),
    "yaml-aliases-expand": Mutant(
        "if isinstance(event, yaml.AliasEvent):",
        "if False:",
        ("tests/hostile/test_recipes.py::test_an_alias_bomb_recipe_is_refused_at_once",),
    ),
    "grid-built-before-counted": Mutant(
        "many = too_many(grid)",
        "many = combinations(grid) and too_many(grid)",
        ("tests/hostile/test_recipes.py::test_a_matrix_grid_of_too_many_combinations_is_refused_before_rendering",),
        anchor="def sweep_from_matrix(",
    ),
    "frozen-injected-not-stored": Mutant(
        "frozen_injected=stuck,",
        "frozen_injected=[],",
        ("tests/training/test_emit.py::test_lora_leaving_out_zeroed_projections_is_refused_unless_intended",),
    ),
}


def locate(tree: Path, m: Mutant) -> tuple[Path, int]:
    """The file and offset of the mutant's ``old`` in ``tree/tli_recipe``; ValueError when not exactly one."""
    key = m.anchor or m.old
    hits = [(p, i) for p in sorted((tree / "tli_recipe").rglob("*.py")) for i in _find_all(p.read_text(), key)]
    if len(hits) != 1:
        what = "anchor" if m.anchor else "pattern"
        raise ValueError(f"the {what} {key!r} occurs {len(hits)} times in tli_recipe/; expected once")
    path, start = hits[0]
    at = path.read_text().find(m.old, start)
    if at < 0:
        raise ValueError(f"{m.old!r} does not follow the anchor {m.anchor!r} in {path.relative_to(tree)}")
    return path, at


def _find_all(text: str, key: str) -> list[int]:
    found, at = [], text.find(key)
    while at >= 0:
        found.append(at)
        at = text.find(key, at + 1)
    return found


def copy_repo(into: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) copied under ``into``."""
    tree = into / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
    )
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            src, dst = ROOT / name, tree / name
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    else:  # not a git checkout (an unpacked sdist)
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv*", ".demo", "__pycache__"))
    return tree


def pytest(tree: Path, tests: tuple[str, ...]) -> tuple[str, str]:
    """Run ``tests`` in ``tree``: ("failed" | "passed" | "error", the line that says why)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "error", f"timed out after {TIMEOUT} s"
    lines = [line for line in out.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    first_failure = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), last)
    if proc.returncode == 1:
        return "failed", first_failure
    if proc.returncode == 0 and " passed" in last:
        return "passed", last
    return "error", f"pytest exit {proc.returncode}: {first_failure}"


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        print("\n".join(M))
        return 0
    unknown = [n for n in argv if n not in M]
    if unknown:
        print(f"unknown mutant {unknown[0]!r}; known: {', '.join(M)}", file=sys.stderr)
        return 2
    names = argv or list(M)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the temporary copy is removed on SIGTERM too
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tli-mutants-") as tmp:
        tree = copy_repo(Path(tmp))
        where = subprocess.run(
            [sys.executable, "-c", "import tli_recipe; print(tli_recipe.__file__)"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(tree)):
            print(f"the copy's tli_recipe is not the one imported ({where or 'none'}); stopping", file=sys.stderr)
            return 2
        union = tuple(dict.fromkeys(t for n in names for t in M[n].tests))
        state, why = pytest(tree, union)
        if state != "passed":
            print(f"baseline: the unmutated tests do not pass ({why}); fix them first", file=sys.stderr)
            return 2
        print(f"baseline: {len(union)} tests pass unmutated", flush=True)
        bad = 0
        for name in names:
            m = M[name]
            try:
                path, at = locate(tree, m)
            except ValueError as exc:
                bad += 1
                print(f"{name}: ERROR {exc}", flush=True)
                continue
            text = path.read_text()
            path.write_text(text[:at] + m.new + text[at + len(m.old) :])
            began = time.perf_counter()
            try:
                state, why = pytest(tree, m.tests)
            finally:
                path.write_text(text)
            verdict = {"failed": "KILLED", "passed": "SURVIVED", "error": "ERROR"}[state]
            bad += verdict != "KILLED"
            took = time.perf_counter() - began
            print(f"{name}: {verdict} in {took:.0f} s ({path.relative_to(tree)}) {why}", flush=True)
    print(f"{len(names) - bad} of {len(names)} mutants killed in {time.perf_counter() - started:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
