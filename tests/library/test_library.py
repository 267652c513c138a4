"""The recipe library: committed recipes match their templates, `list` and `diff`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import CONFIGS, RECIPES, ROOT, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.library.catalog import describe_method, recipe_files

MATRICES = sorted((RECIPES / "matrices").glob("*.yaml"))
LIBRARY = recipe_files([RECIPES])
GENERATED = [p for p in LIBRARY if "Generated from recipes/templates/" in p.read_text()]


def test_matrices_and_generated_recipes_exist():
    assert MATRICES and len(GENERATED) >= 17
    assert not [p for p in LIBRARY if "matrices" in p.parts or "templates" in p.parts]


@pytest.mark.parametrize("matrix", MATRICES, ids=lambda p: p.name)
def test_committed_recipes_match_their_templates(matrix, cli):
    """Re-render every sweep; a recipe edited by hand, or a template changed without regenerating, fails."""
    result = cli("variants", matrix, "--check")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "unchanged" in result.stdout and "differs" not in result.stdout and "missing" not in result.stdout


def test_every_generated_recipe_comes_from_a_matrix(cli):
    produced = set()
    for matrix in MATRICES:
        produced |= {
            Path(line.split()[1]).resolve() for line in cli("variants", matrix, "--check").stdout.splitlines()[1:]
        }
    assert {p.resolve() for p in GENERATED} <= produced


EXPECTED = {
    # name: (base model, layers before -> after)
    "llama3.2-1b-k2": ("meta-llama/Llama-3.2-1B", 16, 24),
    "llama3.2-1b-k4": ("meta-llama/Llama-3.2-1B", 16, 20),
    "llama3.2-1b-k8": ("meta-llama/Llama-3.2-1B", 16, 18),
    "llama3.2-3b-k2": ("meta-llama/Llama-3.2-3B", 28, 42),
    "llama3.2-3b-k4": ("meta-llama/Llama-3.2-3B", 28, 35),
    "llama3.2-3b-k8": ("meta-llama/Llama-3.2-3B", 28, 31),
    "llama3.1-8b-k2": ("meta-llama/Llama-3.1-8B", 32, 48),
    "llama3.1-8b-k4": ("meta-llama/Llama-3.1-8B", 32, 40),
    "llama3.1-8b-k8": ("meta-llama/Llama-3.1-8B", 32, 36),
    "mistral-7b-k4": ("mistralai/Mistral-7B-v0.1", 32, 40),
    "qwen2.5-1.5b-k4": ("Qwen/Qwen2.5-1.5B", 28, 35),
    "qwen2.5-7b-k4": ("Qwen/Qwen2.5-7B", 28, 35),
    "qwen3-4b-k4": ("Qwen/Qwen3-4B", 36, 45),
    "qwen3-8b-k4": ("Qwen/Qwen3-8B", 36, 45),
    "gemma3-1b-k2": ("google/gemma-3-1b-pt", 26, 39),
    "mistral-7b-dus-solar": ("mistralai/Mistral-7B-v0.1", 32, 48),
    "llama2-7b-k4-llama-pro": ("meta-llama/Llama-2-7b-hf", 32, 40),
    "llama3.2-1b-widen-x2": ("meta-llama/Llama-3.2-1B", 16, 16),
    # hand-written (the README's example and the demo)
    "llama3-8b-k4": ("meta-llama/Meta-Llama-3-8B", 32, 40),
    "smollm2-135m-k4": ("HuggingFaceTB/SmolLM2-135M", 30, 37),
    "smollm2-135m-k4-mod": ("HuggingFaceTB/SmolLM2-135M", 30, 37),
    "smollm2-135m-moe": ("HuggingFaceTB/SmolLM2-135M", 30, 30),
    "smollm2-135m-widen-mlp": ("HuggingFaceTB/SmolLM2-135M", 30, 30),
}


def test_widen_mlp_recipe_is_about_tli_k4s_added_parameters():
    configs = [f"base_model={CONFIGS / 'HuggingFaceTB__SmolLM2-135M'}"]
    wide = compile_plan(load_recipe(RECIPES / "smollm2-135m-widen-mlp.yaml", configs)).totals
    deep = compile_plan(load_recipe(RECIPES / "smollm2-135m-k4.yaml", configs)).totals
    added = wide.parameters_after - wide.parameters_before
    assert added == 30 * 3 * 576 * 512  # gate, up, down of 512 new neurons in 30 layers
    assert abs(added / (deep.parameters_after - deep.parameters_before) - 1) < 0.08
    assert (
        f"{wide.parameters_before:,} -> {wide.parameters_after:,} parameters"
        in (RECIPES / "smollm2-135m-widen-mlp.yaml").read_text()
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_library_recipe(name):
    """The issue's library: each recipe plans against its published config, and its header states
    the plan's exact numbers (generated ones: exact parameter counts too)."""
    path = RECIPES / f"{name}.yaml"
    base, before, after = EXPECTED[name]
    loaded = load_recipe(path)
    assert loaded.recipe.base_model == base and loaded.recipe.name == name
    plan = compile_plan(load_recipe(path, [f"base_model={CONFIGS / base.replace('/', '__')}"]))
    t = plan.totals
    assert (t.layers_before, t.layers_after) == (before, after)
    header = path.read_text()
    assert f"{before} -> {after} layers" in header
    if path in GENERATED:
        assert f"{t.parameters_before:,} -> {t.parameters_after:,} parameters" in header
        assert re.search(r"arXiv \d{4}\.\d{5}", header)  # the paper it follows
    assert not plan.blocking


def test_llama_pro_is_the_papers_model():
    plan = compile_plan(
        load_recipe(RECIPES / "llama2-7b-k4-llama-pro.yaml", [f"base_model={CONFIGS / 'meta-llama__Llama-2-7b-hf'}"])
    )
    assert plan.requires_grad_layers == [4, 9, 14, 19, 24, 29, 34, 39]
    assert round(plan.totals.parameters_after / 1e9, 2) == 8.36  # "LLaMA Pro-8.3B"
    assert plan.function_preserving and plan.init == {"o_proj": "zero", "down_proj": "zero"}


def test_solar_is_the_papers_shape():
    plan = compile_plan(
        load_recipe(RECIPES / "mistral-7b-dus-solar.yaml", [f"base_model={CONFIGS / 'mistralai__Mistral-7B-v0.1'}"])
    )
    assert [e.layer for e in plan.layers] == list(range(24)) + list(range(8, 32))
    assert round(plan.totals.parameters_after / 1e9, 1) == 10.7


def test_list_shows_the_library(cli):
    result = cli("list", RECIPES, "--configs", CONFIGS)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["recipe", "base", "method", "layers", "parameters", "counts", "from"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(EXPECTED)
    assert re.search(
        r"llama3.2-1b-k4 +meta-llama/Llama-3.2-1B +TLI, K = 4 +16 -> 20 +1.24B -> 1.48B +stored config$",
        rows["llama3.2-1b-k4"],
    )
    assert "DUS [0, 24) + [8, 32)  32 -> 48" in rows["mistral-7b-dus-solar"]
    markdown = cli("list", RECIPES, "--configs", CONFIGS, "--markdown").stdout.splitlines()
    assert (
        markdown[0] == "| recipe | base | method | layers | parameters | counts from |"
        and len(markdown) == len(EXPECTED) + 2
    )


def test_list_says_where_counts_come_from(tmp_path, tiny, cli):
    local = write_recipe(tmp_path, f"base_model: {tiny()}\ninject: {{every: 4}}\n", "local.yaml")
    gone = write_recipe(tmp_path, "base_model: nobody/nothing\ninject: {every: 4}\n", "gone.yaml")
    result = cli("list", local, gone, "--configs", CONFIGS)
    assert result.exit_code == 0, result.stderr
    rows = result.stdout.splitlines()[1:]
    assert rows[0].startswith("local ") and rows[0].endswith("TLI, K = 4  8 -> 10  78.37K -> 96.93K  local model")
    assert rows[1].split()[0] == "gone" and rows[1].split()[-4:] == ["?", "?", "not", "found"]


def test_list_reports_invalid_recipes_after_the_table(tmp_path, cli):
    bad = write_recipe(tmp_path, "base_model: x\ninject: {every: 0}\n", "bad.yaml")
    result = cli("list", bad)
    assert result.exit_code == 2
    assert result.stderr == f"{bad}:2:17: inject.every: must be >= 1, got 0\n"


def test_diff_shows_fields_layer_maps_and_policies(tmp_path, cli):
    a = write_recipe(tmp_path, f"base_model: {CONFIGS / 'meta-llama__Llama-3.2-1B'}\ninject: {{every: 4}}\n", "a.yaml")
    b = write_recipe(
        tmp_path,
        f"base_model: {CONFIGS / 'meta-llama__Llama-3.2-1B'}\ninject:\n  every: 4\n"
        "  init: {o_proj: zero, down_proj: {noise: 0.01}}\n",
        "b.yaml",
    )
    result = cli("diff", a, b)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert '  inject.init: (absent) -> {"o_proj": "zero", "down_proj": {"noise": 0.01}}' in out
    assert "init        o_proj=zero, down_proj=zero   |   o_proj=zero, down_proj=noise(0.01)" in out
    assert "preserving  yes   |   no" in out
    assert "!    4  3* o_proj=zero, down_proj=zero, rest copy   3* o_proj=zero, down_proj=noise(0.01), rest copy" in out
    assert out.count("... 2 identical layers") == 3  # 6, 7 between the injected layers 4 and 9 (5 and 8 are context)


def test_diff_of_k_changes_the_layer_map_and_stages(cli):
    result = cli("diff", RECIPES / "llama3.2-1b-k4.yaml", RECIPES / "llama3.2-1b-k8.yaml", "--configs", CONFIGS)
    out = result.stdout
    assert "  inject.every: 4 -> 8" in out
    assert "injected    [4, 9, 14, 19]   |   [8, 17]" in out
    assert "!   19  15* o_proj=zero, down_proj=zero, rest copy  -" in out
    assert "  requires_grad_layers: [4, 9, 14, 19] -> [8, 17]" in out
    assert "  injected-only: layers 4, 9, 14, 19 -> layers 8, 17" in out


def test_diff_without_configs_compares_fields_only(tmp_path, cli):
    a = write_recipe(tmp_path, "base_model: nobody/nothing\ninject: {every: 4}\n", "a.yaml")
    b = write_recipe(tmp_path, "base_model: nobody/nothing\ninject: {every: 2}\n", "b.yaml")
    out = cli("diff", a, b, "--configs", tmp_path).stdout
    assert "  inject.every: 4 -> 2" in out and "plans not compared: no config of nobody/nothing" in out


def test_describe_method():
    def method(text):
        return describe_method(load_recipe("x.yaml", text=text).recipe)

    assert method("base_model: x\ninject: {every: 4}\n") == "TLI, K = 4"
    assert method("base_model: x\ninject: {every: 4, copies: 2}\n") == "block expansion, K = 4, P = 2"
    assert (
        method("base_model: x\nslices: [{layer_range: [0, 24]}, {layer_range: [8, 32]}]\n") == "DUS [0, 24) + [8, 32)"
    )
    assert (
        method("base_model: x\ninject: {between: [8, 16], init: {o_proj: {interpolate: 0.5}}}\n")
        == "TLI, between [8, 16), init interpolate"
    )
    assert method("base_model: x\n") == "copy"
    assert (
        method("base_model: x\ninject: {every: 4}\nupcycle: {experts: 4, top_k: 2}\n")
        == "TLI, K = 4 + MoE, E = 4, k = 2"
    )


def test_docs_table_is_what_list_markdown_prints(cli, monkeypatch, tmp_path):
    """Issue 15: the README's recipe table had drifted from `list --markdown` (grouped rows, no
    counts column); it is now pasted from it into docs/library.md, and this test keeps the two equal."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # counts from the stored configs, on any machine
    monkeypatch.delenv("TLI_RECIPE_CONFIGS", raising=False)
    result = cli("list", "--markdown")
    assert result.exit_code == 0, result.stderr
    lines = (ROOT / "docs" / "library.md").read_text().splitlines()
    start = lines.index("| recipe | base | method | layers | parameters | counts from |")
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert "\n".join(table) == result.stdout.rstrip("\n"), (
        "docs/library.md's recipe table is stale: paste `tli-recipe list --markdown`"
    )
