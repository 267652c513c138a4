"""Plans: layer maps, config changes, stages, the recipe library. No tensor is read here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CONFIGS, RECIPES, ROOT, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.errors import RecipeError


def plan_of(tmp_path, text: str, overrides=()):
    return compile_plan(load_recipe(write_recipe(tmp_path, text), overrides))


def config_dir(tmp_path, layers: int = 8, **config):
    """A directory holding only config.json (plan derives the tensor shapes from it)."""
    folder = tmp_path / f"cfg{layers}"
    folder.mkdir(exist_ok=True)
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "num_hidden_layers": layers,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


def layer_map(plan) -> str:
    return " ".join(f"{e.layer}{'*' if e.role == 'injected' else ''}" for e in plan.layers)


def test_tli_8_layers_k4_matches_algorithm_1(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n")
    assert layer_map(plan) == "0 1 2 3 3* 4 5 6 7 7*"
    assert plan.requires_grad_layers == [4, 9]
    assert plan.config["num_hidden_layers"] == 10 and plan.config["requires_grad_layers"] == [4, 9]
    assert plan.function_preserving
    assert not [w for w in plan.warnings if "does not divide" in w]


def test_tli_32_layers_k4_indices_from_the_paper(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {config_dir(tmp_path, 32)}\ninject: {{every: 4}}\n")
    assert plan.requires_grad_layers == [4, 9, 14, 19, 24, 29, 34, 39]
    assert plan.totals.layers_after == 40


def test_injected_layer_ops_zero_only_output_projections(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n")
    ops = {op.name: op for op in plan.tensors}
    assert ops["model.layers.4.self_attn.o_proj.weight"].op == "zero"
    assert ops["model.layers.4.mlp.down_proj.weight"].op == "zero"
    assert ops["model.layers.4.self_attn.q_proj.weight"].op == "copy"
    assert ops["model.layers.4.self_attn.q_proj.weight"].source_name == "model.layers.3.self_attn.q_proj.weight"
    assert ops["model.layers.5.self_attn.o_proj.weight"].source_name == "model.layers.4.self_attn.o_proj.weight"
    assert ops["model.layers.5.self_attn.o_proj.weight"].op == "copy"
    assert {op.op for op in plan.tensors if op.layer not in (4, 9)} == {"copy"}


def test_trailing_layers_without_injection_are_a_warning(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {config_dir(tmp_path, 10)}\ninject: {{every: 4}}\n")
    assert layer_map(plan) == "0 1 2 3 3* 4 5 6 7 7* 8 9"
    assert any("does not divide the 10 layers" in w and "output layers 10..11" in w for w in plan.warnings)


def test_copies_per_position(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4, copies: 2}}\n")
    assert layer_map(plan) == "0 1 2 3 3* 3* 4 5 6 7 7* 7*"
    assert plan.requires_grad_layers == [4, 5, 10, 11]


def test_dus_slices_layer_map(tmp_path):
    plan = plan_of(
        tmp_path, f"base_model: {config_dir(tmp_path)}\nslices:\n  - layer_range: [0, 6]\n  - layer_range: [2, 8]\n"
    )
    assert layer_map(plan) == "0 1 2 3 4 5 2 3 4 5 6 7"
    assert plan.requires_grad_layers == [] and not plan.function_preserving


def test_slices_and_inject_combine(tmp_path):
    plan = plan_of(
        tmp_path,
        f"base_model: {config_dir(tmp_path)}\nslices:\n  - layer_range: [0, 4]\n  - layer_range: [2, 6]\n"
        "inject: {every: 4}\n",
    )
    assert layer_map(plan) == "0 1 2 3 3* 2 3 4 5 5*"


def test_non_zero_init_is_not_function_preserving(tmp_path):
    plan = plan_of(
        tmp_path,
        f"base_model: {config_dir(tmp_path)}\ninject:\n  every: 4\n"
        "  init: {o_proj: zero, down_proj: {noise: 0.01}}\n",
    )
    assert not plan.function_preserving
    noisy = [op for op in plan.tensors if op.op == "noise"]
    assert len(noisy) == 2 and all(op.seed is not None for op in noisy) and noisy[0].seed != noisy[1].seed
    scaled = plan_of(
        tmp_path,
        f"base_model: {config_dir(tmp_path)}\ninject:\n  every: 4\n  init: {{o_proj: {{scale: 0}}, down_proj: zero}}\n",
    )
    assert scaled.function_preserving


def test_qwen_layer_types_follow_the_layer_map(tmp_path):
    types = ["full_attention", "sliding_attention"] * 4
    folder = config_dir(tmp_path, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=8, layer_types=types)
    plan = plan_of(tmp_path, f"base_model: {folder}\ninject: {{every: 4}}\n")
    assert plan.config["layer_types"] == [types[e.layer] for e in plan.layers]
    assert len(plan.config["layer_types"]) == plan.config["num_hidden_layers"] == 10


def test_qwen_layer_types_are_derived_from_max_window_layers(tmp_path):
    folder = config_dir(
        tmp_path,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=64,
        max_window_layers=6,
    )
    plan = plan_of(tmp_path, f"base_model: {folder}\ninject: {{every: 4}}\n")
    # source layers 6, 7 slide (outputs 7, 8) and so does the copy of 7 (output 9); the copy of 3 does not
    assert plan.config["layer_types"] == ["full_attention"] * 7 + ["sliding_attention"] * 3


def test_stages_resolve_to_layers_and_parameter_names(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""base_model: {config_dir(tmp_path, 12)}
inject: {{every: 4}}
stages:
  - name: new
    trainable: [injected]
  - name: top
    trainable: [{{layers: [10, 15]}}, head]
  - name: lora
    trainable: [all]
    lora: {{r: 4, alpha: 8, targets: [o_proj, down_proj]}}
""",
    )
    new, top, lora = plan.stages
    assert new.trainable_layers == [4, 9, 14]
    assert all(p.startswith(("model.layers.4.", "model.layers.9.", "model.layers.14.")) for p in new.parameters)
    assert len(new.parameters) == 3 * 9
    assert top.trainable_layers == [10, 11, 12, 13, 14] and "lm_head.weight" in top.parameters
    assert "model.embed_tokens.weight" not in top.parameters
    assert lora.lora.layers == list(range(15)) and len(lora.parameters) == 15 * 2
    assert not [w for w in plan.warnings if "LoRA" in w]


def test_lora_without_output_projections_warns(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""base_model: {config_dir(tmp_path)}
inject: {{every: 4}}
stages:
  - name: lora
    trainable: [all]
    lora: {{r: 4, alpha: 8, targets: [q_proj, v_proj]}}
""",
    )
    assert any("never move" in w and "down_proj, o_proj" in w for w in plan.warnings)


def test_set_overrides_any_field(tmp_path):
    plan = plan_of(
        tmp_path,
        "base_model: /nowhere\ninject: {every: 4}\n",
        [f"base_model={config_dir(tmp_path)}", "inject.every=2", "slices[0].layer_range=[0, 4]"],
    )
    assert layer_map(plan) == "0 1 1* 2 3 3*"


def test_plan_time_errors_point_at_the_recipe(tmp_path):
    recipe = write_recipe(tmp_path, f"base_model: {config_dir(tmp_path)}\nslices:\n  - layer_range: [0, 9]\n")
    with pytest.raises(RecipeError) as err:
        compile_plan(load_recipe(recipe))
    assert (
        str(err.value)
        == f"{recipe}:3:18: slices[0].layer_range: [0, 9] ends past the 8 layers of {config_dir(tmp_path)}; "
        "expected end <= 8 (half-open range)"
    )


def test_layer_index_is_a_whole_segment():
    from tli_recipe.source.arch import load_architectures

    llama = load_architectures()["llama"]
    assert llama.split_layer_key("model.layers.1.mlp.down_proj.weight") == (1, "mlp.down_proj.weight")
    assert llama.split_layer_key("model.layers.10.mlp.down_proj.weight") == (10, "mlp.down_proj.weight")
    assert llama.split_layer_key("model.layers.1.mlp.experts.10.down_proj.weight") == (
        1,
        "mlp.experts.10.down_proj.weight",
    )
    assert llama.split_layer_key("model.layers.01.mlp.down_proj.weight") is None
    assert llama.split_layer_key("model.layers_norm.weight") is None
    assert llama.projection_of("mlp.down_proj.weight") == "down_proj"
    assert llama.projection_of("mlp.experts.1.down_proj.weight") is None


# recipes/matrices/ holds sweeps (template + grid), not recipes.
RECIPE_FILES = sorted(p for p in RECIPES.rglob("*.yaml") if "matrices" not in p.relative_to(RECIPES).parts)


def test_recipe_library_is_not_empty():
    assert len(RECIPE_FILES) >= 5


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.name)
def test_every_recipe_compiles_against_its_real_config(recipe):
    loaded = load_recipe(recipe)
    stored = CONFIGS / loaded.recipe.base_model.path.replace("/", "__")
    assert (stored / "config.json").is_file(), f"store the config of {loaded.recipe.base_model} in {stored}"
    plan = compile_plan(load_recipe(recipe, [f"base_model={stored}"]))
    grows = plan.totals.layers_after > plan.totals.layers_before  # deeper, or wider (upcycled experts, widen)
    wider = plan.upcycle is not None or plan.widen is not None
    assert grows or (wider and plan.totals.parameters_after > plan.totals.parameters_before)
    header = recipe.read_text()
    # The comment header states the layer counts; keep it honest.
    assert f"{plan.totals.layers_before} -> {plan.totals.layers_after} layers" in header


def test_validate_and_plan_do_not_import_torch(tmp_path):
    folder = config_dir(tmp_path)
    recipe = write_recipe(tmp_path, f"base_model: {folder}\ninject: {{every: 4}}\n")
    code = (
        "import sys; from tli_recipe.cli import main\n"
        "try:\n    main(['plan', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_plan_json_round_trips(tmp_path, cli):
    recipe = write_recipe(tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n")
    result = cli("plan", recipe, "--json")
    assert result.exit_code == 0
    from tli_recipe.plan.model import Plan

    plan = Plan.model_validate_json(result.stdout)
    assert plan.requires_grad_layers == [4, 9]
    table = cli("plan", recipe)
    assert "4       3  injected*  o_proj=zero, down_proj=zero, rest copy" in table.stdout
    assert "layers      8 -> 10" in table.stdout


def test_inject_every_is_checked_against_the_sliced_stack(tmp_path):
    """8 base layers sliced to a stack of 4: every 6 injects nothing, though 6 <= the base's 8 layers."""
    recipe = write_recipe(
        tmp_path, f"base_model: {config_dir(tmp_path)}\nslices:\n  - layer_range: [0, 4]\ninject: {{every: 6}}\n"
    )
    with pytest.raises(RecipeError, match=r"inject\.every: 6 is larger than the 4 layers of the stack") as err:
        compile_plan(load_recipe(recipe))
    assert "expected every <= 4" in str(err.value)
    assert layer_map(plan_of(tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 6}}\n")).count("*") == 1


def test_the_growth_bound_holds_exactly_at_its_limit(tmp_path):
    """At most 16x the base's layers (8 -> 128): 128 output layers are built, 136 are refused."""
    base = config_dir(tmp_path)
    assert len(plan_of(tmp_path, f"base_model: {base}\ninject: {{every: 1, copies: 15}}\n").layers) == 128
    with pytest.raises(RecipeError, match="16 copies at 8 positions give 136 output layers; expected at most 128"):
        plan_of(tmp_path, f"base_model: {base}\ninject: {{every: 1, copies: 16}}\n")
    assert len(plan_of(tmp_path, f"base_model: {base}\nslices:\n" + "  - layer_range: [0, 8]\n" * 16).layers) == 128
    with pytest.raises(RecipeError, match="the slices stack 136 layers; expected at most 128"):
        plan_of(tmp_path, f"base_model: {base}\nslices:\n" + "  - layer_range: [0, 8]\n" * 17)


def test_a_lora_all_stage_adapts_the_layers_not_embeddings_and_head(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""base_model: {config_dir(tmp_path)}
inject: {{every: 4}}
stages:
  - name: full
    trainable: [all]
  - name: lora
    trainable: [all]
    lora: {{r: 4, alpha: 8, targets: [q_proj, o_proj, down_proj]}}
""",
    )
    full, lora = plan.stages
    assert full.trainable_groups == ["embeddings", "head"]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(full.parameters)
    assert lora.trainable_groups == [] and lora.lora.layers == list(range(10))
    assert all(name.startswith("model.layers.") for name in lora.parameters) and len(lora.parameters) == 10 * 3
