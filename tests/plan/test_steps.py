"""Each step of compile_plan called alone, on its own inputs (plan/compile.py lists the steps)."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe

from tli_recipe import load_recipe
from tli_recipe.errors import RecipeError
from tli_recipe.plan.compile import (
    assign_tensor_ops,
    build_layer_map,
    judge_preservation,
    resolve_sources,
    resolve_stages,
    rewrite_config,
)
from tli_recipe.plan.problems import Problems
from tli_recipe.plan.tensor_ops import choose_policies
from tli_recipe.recipe.schema import Inject, Policy
from tli_recipe.source.arch import load_architectures

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "torch_dtype": "float32",
}
#: Elements of one tiny llama layer: q, o (32x32), k, v (16x32), gate, up, down (64x32), two norms (32).
LAYER = 2 * 1024 + 2 * 512 + 3 * 2048 + 2 * 32


def config_dir(tmp_path, layers=8, name=None, **extra):
    folder = tmp_path / (name or f"llama{layers}")
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA, "num_hidden_layers": layers, **extra}))
    return folder


def loaded(tmp_path, text):
    return load_recipe(write_recipe(tmp_path, text))


def steps_upto_ops(tmp_path, text):
    recipe = loaded(tmp_path, text)
    problems = Problems(recipe)
    sources = resolve_sources(recipe.recipe, problems)
    layers, _ = build_layer_map(sources.stack, recipe.recipe.inject)
    policies = choose_policies(recipe.recipe.inject, sources.arch, problems)
    ops, _ = assign_tensor_ops(recipe.recipe, sources, layers, policies, problems)
    return recipe, problems, sources, layers, ops


def test_resolve_sources_builds_the_stack_of_the_slices(tmp_path):
    a, b = config_dir(tmp_path, 8, "a"), config_dir(tmp_path, 4, "b")
    recipe = loaded(
        tmp_path, f"base_model: {a}\nslices:\n  - layer_range: [0, 2]\n  - model: {b}\n    layer_range: [1, 3]\n"
    )
    problems = Problems(recipe)
    sources = resolve_sources(recipe.recipe, problems)
    assert problems.items == []
    assert sources.stack == [(str(a), 0, 0), (str(a), 1, 0), (str(b), 1, 1), (str(b), 2, 1)]
    assert sources.where == {str(a): ("base_model",), str(b): ("slices", 1, "model")}
    assert sources.models[str(b)].num_layers == 4 and sources.base_layers == 8


def test_resolve_sources_adds_slice_problems_without_raising(tmp_path):
    recipe = loaded(tmp_path, f"base_model: {config_dir(tmp_path)}\nslices:\n  - layer_range: [0, 9]\n")
    problems = Problems(recipe)
    resolve_sources(recipe.recipe, problems)
    assert [p.message for p in problems.items] == [
        f"[0, 9] ends past the 8 layers of {config_dir(tmp_path)}; expected end <= 8 (half-open range)"
    ]


def test_build_layer_map_follows_algorithm_1():
    stack = [("m", i, None) for i in range(8)]
    layers, warnings = build_layer_map(stack, Inject(every=4, copies=2))
    assert [(e.layer, e.role) for e in layers][3:7] == [
        (3, "original"),
        (3, "injected"),
        (3, "injected"),
        (4, "original"),
    ]
    assert [e.output for e in layers if e.role == "injected"] == [4, 5, 10, 11]
    assert layers[4].next_layer == 4 and layers[-1].next_source is None and warnings == []
    assert build_layer_map(stack, None)[0] == [e for e in build_layer_map(stack, None)[0] if e.role == "original"]


def test_assign_tensor_ops_zeroes_the_output_projections_of_injected_layers(tmp_path):
    _, problems, _, layers, ops = steps_upto_ops(
        tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n"
    )
    assert problems.items == []
    injected = {op.name: op.op for op in ops if op.layer == 4}
    assert injected["model.layers.4.self_attn.o_proj.weight"] == "zero"
    assert injected["model.layers.4.mlp.down_proj.weight"] == "zero"
    assert {v for k, v in injected.items() if "o_proj" not in k and "down_proj" not in k} == {"copy"}
    assert (
        next(op for op in ops if op.name == "model.layers.4.mlp.up_proj.weight").source_name
        == "model.layers.3.mlp.up_proj.weight"
    )
    assert len(ops) == 3 + 9 * len(layers)


def test_rewrite_config_follows_the_layer_map(tmp_path):
    _, problems, sources, layers, _ = steps_upto_ops(
        tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n"
    )
    arch = load_architectures()["llama"]
    injected = [e.output for e in layers if e.role == "injected"]
    configs = {
        sources.base: {
            **sources.configs[sources.base],
            "layer_types": ["full_attention"] * 6 + ["sliding_attention"] * 2,
        }
    }
    config, changes, blocking, _ = rewrite_config(
        sources.base_config, configs, arch, layers, injected, "float32", {"rope_theta": 5}, sources.where, problems
    )
    assert problems.items == [] and blocking == []
    assert config["num_hidden_layers"] == 10 and config["requires_grad_layers"] == [4, 9] and config["rope_theta"] == 5
    assert config["layer_types"] == ["full_attention"] * 7 + ["sliding_attention"] * 3
    assert {c.key for c in changes} == {"num_hidden_layers", "layer_types", "requires_grad_layers", "rope_theta"}


def test_rewrite_config_locates_a_source_config_it_cannot_grow(tmp_path):
    recipe, problems, sources, layers, _ = steps_upto_ops(
        tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4}}\n"
    )
    arch = load_architectures()["llama"]
    configs = {sources.base: {**sources.configs[sources.base], "layer_types": ["full_attention"] * 7}}
    rewrite_config(sources.base_config, configs, arch, layers, [4, 9], "float32", {}, sources.where, problems)
    assert [str(p) for p in problems.items] == [
        f"{recipe.file}:1:13: base_model: {sources.base}: config.json layer_types has 7 entries for 8 layers; "
        "the config is inconsistent"
    ]


def test_resolve_stages_counts_what_trains(tmp_path):
    recipe, problems, sources, layers, ops = steps_upto_ops(
        tmp_path,
        f"""base_model: {config_dir(tmp_path)}
inject: {{every: 4}}
stages:
  - {{name: all, trainable: [all]}}
  - {{name: original, trainable: [original]}}
  - {{name: new, trainable: [injected]}}
  - {{name: lora, trainable: [all], lora: {{r: 2, alpha: 4, targets: [q_proj, v_proj]}}, learning_rate: 0.5}}
""",
    )
    full, original, new, lora = resolve_stages(recipe.recipe, problems, layers, ops, sources.arch, [])
    assert problems.items == []
    # [all]: every layer plus embeddings, final norm and head (2048 + 32 + 2048 elements)
    assert full.trainable_groups == ["embeddings", "head"]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(full.parameters)
    assert full.trainable_parameters == 10 * LAYER + 2048 + 32 + 2048 and len(full.parameters) == len(ops)
    # [original]: the 8 copied layers and none of the injected ones
    assert original.trainable_layers == [0, 1, 2, 3, 5, 6, 7, 8]
    assert not [p for p in original.parameters if p.startswith(("model.layers.4.", "model.layers.9."))]
    assert original.trainable_parameters == 8 * LAYER and original.trainable_groups == []
    assert new.trainable_layers == [4, 9] and new.trainable_parameters == 2 * LAYER
    assert lora.trainable_parameters == 10 * lora.lora.r * (32 + 32 + 32 + 16) and lora.lora.layers == list(range(10))
    assert lora.settings.learning_rate == 0.5 and lora.settings.lora.r == 2


@pytest.mark.parametrize(
    "init, exact",
    [
        ("{o_proj: zero, down_proj: zero}", True),
        ("{o_proj: {scale: 0}, down_proj: zero}", True),
        ("{o_proj: zero}", False),
        ("{o_proj: {noise: 0.01}, down_proj: zero}", False),
    ],
)
def test_judge_preservation_reads_the_ops(tmp_path, init, exact):
    _, _, sources, layers, ops = steps_upto_ops(
        tmp_path, f"base_model: {config_dir(tmp_path)}\ninject: {{every: 4, init: {init}}}\n"
    )
    assert judge_preservation(sources, layers, ops) is exact


def test_judge_preservation_needs_the_base_stack(tmp_path):
    _, _, sources, layers, ops = steps_upto_ops(
        tmp_path, f"base_model: {config_dir(tmp_path)}\nslices:\n  - layer_range: [0, 4]\n  - layer_range: [2, 8]\n"
    )
    assert judge_preservation(sources, layers, ops) is False


def test_choose_policies_defaults_to_the_recommended_init(tmp_path):
    recipe = loaded(tmp_path, f"base_model: {config_dir(tmp_path)}\n")
    arch = load_architectures()["llama"]
    assert choose_policies(Inject(every=4), arch, Problems(recipe)) == {
        "o_proj": Policy(kind="zero"),
        "down_proj": Policy(kind="zero"),
    }


def test_independent_problems_are_reported_together(tmp_path):
    from tli_recipe import compile_plan

    recipe = loaded(
        tmp_path,
        f"""base_model: {config_dir(tmp_path)}
inject: {{every: 4, init: {{qkv_proj: zero}}}}
stages:
  - name: s
    trainable: [{{layers: [0, 99]}}]
""",
    )
    with pytest.raises(RecipeError) as err:
        compile_plan(recipe)
    assert [p.path for p in err.value.problems] == [
        ("inject", "init", "qkv_proj"),
        ("stages", 0, "trainable", 0, "layers"),
    ]
