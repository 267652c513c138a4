"""Variants (library/variants.py): grids and matrix files that write all recipes or none."""

from __future__ import annotations

from conftest import CONFIGS, write_recipe
from small_template import SMALL, template_file

from tli_recipe.library.variants import (
    MAX_COMBINATIONS,
    combinations,
    repository,
    too_many,
)


def test_variants_with_one_invalid_combination_write_nothing_and_name_it(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    out = tmp_path / "out"
    result = cli("variants", t, "--grid", "every=2,64,4,40", "--out-dir", out, "--configs", CONFIGS)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert not out.exists()
    assert result.stderr.splitlines() == [
        "2 of 4 combinations are invalid; nothing was written",
        f"combination every=64 ({out / 'small-k64.yaml'}):",
        f"{out / 'small-k64.yaml'}:5:17: inject.every: 64 is larger than the 16 layers of the stack of "
        f"{CONFIGS / 'meta-llama__Llama-3.2-1B'}; no layer would be injected; expected every <= 16",
        f"combination every=40 ({out / 'small-k40.yaml'}):",
        f"{out / 'small-k40.yaml'}:5:17: inject.every: 40 is larger than the 16 layers of the stack of "
        f"{CONFIGS / 'meta-llama__Llama-3.2-1B'}; no layer would be injected; expected every <= 16",
    ]
    # A schema error (not a plan-time one) is located the same way, and nothing is written either.
    bad_dtype = template_file(tmp_path, SMALL.replace("dtype: {{ dtype }}", "dtype: {{ dtype }}{{ '16' if every == 8 else '' }}"), "b.yaml.j2")
    result = cli("variants", bad_dtype, "--grid", "every=4,8", "--out-dir", out, "--configs", CONFIGS)
    assert result.exit_code == 2 and not out.exists()
    assert f"{out / 'small-k8.yaml'}:4:8: dtype: 'bfloat1616' is not a valid dtype" in result.stderr


def test_variants_write_every_combination_and_print_a_table(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    out = tmp_path / "out"
    result = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["small-k2.yaml", "small-k4.yaml", "small-k8.yaml"]
    rows = result.stdout.splitlines()
    assert rows[0].split() == ["name", "file", "layers", "parameters", "counts", "from", "status"]
    assert rows[1].split()[:6] == ["small-k2", str(out / "small-k2.yaml"), "16", "->", "24", "1.72B"]
    assert rows[1].endswith("stored config  written")
    # Again: unchanged; a changed grid value with the same name needs --force; --check reports drift.
    assert cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS).stdout.count("unchanged") == 3
    (out / "small-k4.yaml").write_text("edited\n")
    clash = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS)
    assert clash.exit_code == 2 and "pass --force" in clash.stderr and (out / "small-k4.yaml").read_text() == "edited\n"
    check = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS, "--check")
    assert check.exit_code == 1 and "1 of 3 recipes differ" in check.stderr
    forced = cli("variants", t, "--grid", "every=2,4,8", "--out-dir", out, "--configs", CONFIGS, "--force")
    assert forced.exit_code == 0 and "replaced" in forced.stdout


def test_variants_refuse_names_that_collide(tmp_path, cli):
    t = template_file(tmp_path, SMALL)
    result = cli("variants", t, "--grid", "dtype=float32,bfloat16", "--out-dir", tmp_path / "out", "--configs", CONFIGS)
    assert result.exit_code == 2
    assert "the combinations dtype=float32 and dtype=bfloat16 both render to small-k4.yaml" in result.stderr


def test_matrix_file_is_a_shareable_sweep(tmp_path, cli):
    template_file(tmp_path, SMALL)
    matrix = write_recipe(tmp_path, f"template: t.yaml.j2\nout_dir: made\nconfigs: [{CONFIGS}]\nvars: {{dtype: float32}}\n"
                                    "grid:\n  every: [2, 8]\n", "sweep.yaml")
    result = cli("variants", matrix)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["small-k2.yaml", "small-k8.yaml"]
    assert "dtype: float32" in (tmp_path / "made" / "small-k2.yaml").read_text()
    bad = write_recipe(tmp_path, "template: t.yaml.j2\ngrid:\n  evry: [2]\n  every: [2, x]\n", "bad.yaml")
    result = cli("variants", bad)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{bad}:3:3: evry: unknown variable 'evry' (did you mean 'every'?); expected one of: every, dtype, base",
        f"{bad}:4:14: every: 'x' is not an int; expected a value of type int (K)",
    ]
    assert cli("variants", matrix, "--grid", "every=2").exit_code == 2


def test_too_many_counts_combinations_without_building_them():
    assert too_many({"a": [1] * 32, "b": [1] * 32}) is None  # exactly MAX_COMBINATIONS
    assert MAX_COMBINATIONS == 1024
    assert too_many({"a": list(range(1000)), "b": list(range(1000)), "c": list(range(1000))}) == (
        "the grid has 1000 x 1000 x 1000 = 1000000000 combinations; expected at most 1024")
    assert [label for label, _ in combinations({"a": [1, 2], "b": ["x"]})] == ["a=1 b=x", "a=2 b=x"]


def test_repository_is_the_git_work_tree_else_the_folder(tmp_path):
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "recipes" / "matrices").mkdir(parents=True)
    (tmp_path / "loose").mkdir()
    assert repository(tmp_path / "repo" / "recipes" / "matrices" / "m.yaml") == (tmp_path / "repo").resolve()
    assert repository(tmp_path / "loose" / "m.yaml") == (tmp_path / "loose").resolve()
