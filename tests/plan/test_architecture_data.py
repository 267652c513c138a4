"""Architecture facts live in the definitions (tli_recipe/_data/architectures), not in code."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.errors import RecipeError
from tli_recipe.recipe.schema import LINEAR_PROJECTIONS, PROJECTIONS
from tli_recipe.source.arch import infer_architecture, load_architectures


def test_every_definition_names_its_config_keys_and_layer_list():
    for name, arch in load_architectures().items():
        assert arch.num_layers_key and arch.vocab_key and arch.layers_pattern, name
        assert f".{arch.layers_pattern}." in "." + arch.layer_prefix, name


def test_the_recipe_vocabulary_of_projections_is_the_definitions_own():
    """The recipe's init keys and LoRA targets are exactly what the definitions spell, and a
    LoRA target is any projection that is not a norm (the router included)."""
    archs = load_architectures().values()
    assert set(PROJECTIONS) == {p for arch in archs for p in arch.projections}
    assert set(LINEAR_PROJECTIONS) == {p for arch in archs for p in arch.linear_projections}
    assert "router" in load_architectures()["mixtral"].linear_projections


def test_an_inferred_architecture_takes_its_layer_list_from_the_names():
    arch = infer_architecture(
        "GPTX",
        [
            "transformer.h.0.attn.o_proj.weight",
            "transformer.h.1.attn.o_proj.weight",
            "transformer.h.0.mlp.router.weight",
        ],
    )
    assert arch.layers_pattern == "h" and arch.num_layers_key == "num_hidden_layers"
    assert set(arch.projections) == {"o_proj", "router"}


def test_an_unknown_lora_target_lists_the_router_of_an_moe(tmp_path):
    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 64,
                "num_hidden_layers": 4,
                "num_local_experts": 2,
            }
        )
    )
    recipe = write_recipe(
        tmp_path,
        f"base_model: {folder}\nstages:\n  - name: s\n    trainable: [all]\n"
        "    lora: {r: 2, alpha: 4, targets: [qkv_proj]}\n",
    )
    with pytest.raises(RecipeError) as err:
        compile_plan(load_recipe(recipe))
    assert str(err.value).endswith(
        "expected one of: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, router"
    )


def test_a_definition_without_its_config_keys_is_refused():
    from tli_recipe.source import arch as arch_module
    from tli_recipe.source.arch import ArchError

    with pytest.raises(ArchError, match="num_layers_key must be a non-empty string"):
        arch_module._required({}, "num_layers_key", "x.yaml")
