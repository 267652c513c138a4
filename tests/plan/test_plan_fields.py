"""The plan is the complete description: the fields that the executor, verify, emit and
provenance read instead of the recipe (seed, lesa, dtype, pins with their recipe locations,
typed stage settings, architecture keys)."""

from __future__ import annotations

import json

from conftest import write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.plan.model import Plan

SHA = "a" * 64


def config_dir(tmp_path, **extra):
    folder = tmp_path / "llama"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 64,
                "num_hidden_layers": 8,
                "torch_dtype": "float32",
                **extra,
            }
        )
    )
    return folder


def test_typed_settings_travel_in_the_plan_and_round_trip(tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""base_model: {config_dir(tmp_path)}
dtype: bfloat16
seed: 7
inject: {{every: 4, init: {{o_proj: lesa, down_proj: zero}}, lesa: {{hidden: 16}}}}
stages:
  - name: s
    trainable: [injected, {{layers: [0, 2]}}]
    learning_rate: 0.25
    datasets: [{{path: data.txt}}]
""",
    )
    plan = compile_plan(load_recipe(recipe))
    assert plan.seed == 7 and plan.recipe_dtype == "bfloat16" and plan.lesa is not None and plan.lesa.hidden == 16
    assert plan.stages[0].settings.learning_rate == 0.25 and plan.stages[0].settings.datasets[0].path.endswith(
        "data.txt"
    )
    assert (plan.layers_pattern, plan.num_layers_key, plan.vocab_key, plan.vocab_size) == (
        "layers",
        "num_hidden_layers",
        "vocab_size",
        64,
    )
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again == plan


def test_no_lesa_settings_without_a_lesa_op_and_no_dtype_when_none_asked(tmp_path):
    plan = compile_plan(
        load_recipe(write_recipe(tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n"))
    )
    assert plan.lesa is None and plan.recipe_dtype is None and plan.dtype == "float32"


def test_pins_carry_their_recipe_locations(tmp_path):
    base = config_dir(tmp_path)
    recipe = write_recipe(
        tmp_path,
        f"""base_model:
  path: {base}
  checksums:
    config.json: "{SHA}"
""",
    )
    plan = compile_plan(load_recipe(recipe))
    (pin,) = plan.pins.values()
    assert pin.revision is None and pin.checksums == {"config.json": SHA}
    revision, checksum = pin.revision_at, pin.checksums_at["config.json"]
    assert (revision.file, revision.line, revision.column) == (str(recipe), 2, 3)  # no revision: its mapping
    assert revision.path == ("base_model", "revision")
    assert checksum.path == ("base_model", "checksums", "config.json")
    assert (checksum.file, checksum.line, checksum.column, checksum.key_line, checksum.key_column) == (
        str(recipe),
        4,
        18,
        4,
        5,
    )
    # structured data survives plan.json as it is: nothing is parsed back out of a string
    again = Plan.model_validate_json(plan.model_dump_json()).pins[str(plan.base_model)]
    assert again == pin


def test_pin_locations_follow_a_set_override(tmp_path):
    base = config_dir(tmp_path)
    recipe = write_recipe(tmp_path, "base_model: /nowhere\n")
    plan = compile_plan(load_recipe(recipe, [f"base_model={base}"]))
    (spot,) = [p.revision_at for p in plan.pins.values()]
    assert spot.file.startswith("--set base_model=") and spot.path == ("base_model", "revision")
