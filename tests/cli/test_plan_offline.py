"""`plan` without the hub: the library's recipes are planned from the configs stored in the package."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tli_recipe" / "_data" / "configs"


def test_plan_offline_falls_back_to_the_stored_config(cli):
    # conftest sets HF_HUB_OFFLINE=1: Qwen/Qwen3-4B is not in the cache and may not be fetched.
    result = cli("plan", ROOT / "recipes" / "qwen3-4b-k4.yaml")
    assert result.exit_code == 0, result.stderr
    stored = CONFIGS / "Qwen__Qwen3-4B" / "config.json"
    assert "HF_HUB_OFFLINE is set" in result.stderr  # why the model itself could not be opened
    assert f"the plan is made from the stored config {stored}" in result.stderr
    assert "`run` needs the weights" in result.stderr
    assert "36 -> 45" in result.stdout  # Qwen3-4B: 36 layers, K = 4


def test_plan_json_offline_is_the_plan_of_the_stored_config(cli):
    result = cli("plan", ROOT / "recipes" / "qwen3-4b-k4.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    direct = cli(
        "plan", ROOT / "recipes" / "qwen3-4b-k4.yaml", "--json", "--set", f"base_model={CONFIGS / 'Qwen__Qwen3-4B'}"
    )
    assert result.stdout == direct.stdout


def test_a_hub_id_without_a_stored_config_is_still_an_error(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: someone/not-stored\ninject: {every: 4}\n")
    result = cli("plan", recipe)
    assert result.exit_code == 2
    assert f"{recipe}:1:13: base_model: 'someone/not-stored' is neither a local directory" in result.stderr
    assert "stored config" not in result.stderr


def test_other_problems_are_not_hidden_by_the_fallback(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: Qwen/Qwen3-4B\ninject: {every: 40}\n")  # 40 is not smaller than 36 layers
    result = cli("plan", recipe)
    assert result.exit_code == 2 and "inject.every" in result.stderr and "stored config" in result.stderr
