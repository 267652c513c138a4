"""Hostile inputs that only the plan can judge: configs, headers and output_config keys that
depend on the architecture. Each case runs `plan` through the harness (``refused``): exit
status 2, no traceback, the located message, the inputs byte-identical.

The broken implementations these catch: a traceback on ``architectures: 5``, a period of 0
or ``"six"``, a dotted output_config key into an int or a list; output_config overriding
the keys the plan writes (the layer count, per-layer lists, index lists, requires_grad_layers,
also under a VLM's text_config); unlocated config errors; a projection missing from one layer
accepted; quantized or ``.bin``-only sources accepted; an unbounded output built before it
is refused; independent problems reported one run at a time.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tli_recipe" / "_data" / "configs"
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "num_hidden_layers": 8,
    "torch_dtype": "float32",
}
GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 64,
    "num_hidden_layers": 8,
    "torch_dtype": "float32",
}


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


def model(folder: Path, name: str, config: dict) -> Path:
    path = folder / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def plan_refused(hostile_cli, refused, snapshot, folder: Path, text: str, message, *extra: Path):
    path = recipe(folder, text)
    snap = snapshot(folder, *extra)
    result = hostile_cli("plan", path)
    refused(result, message, inputs=snap)
    return result


# --- source configs ---------------------------------------------------------------------------


def test_architectures_that_is_not_a_list(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "m", {**LLAMA, "architectures": 5})
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\n",
        re.compile(
            r"recipe\.yaml:1:13: base_model: config\.json architectures is 5; expected a list of model class names"
        ),
    )


def test_model_type_that_is_not_a_string(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "m", {**LLAMA, "architectures": [], "model_type": ["llama"]})
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\n",
        re.compile(r":1:13: base_model: config\.json model_type is a list; expected a string"),
    )


@pytest.mark.parametrize("period, shown", [(0, "0"), ("six", "'six'")])
def test_a_sliding_window_pattern_the_rule_cannot_use(inputs, hostile_cli, refused, snapshot, period, shown):
    base = model(inputs, "m", {**GEMMA3, "sliding_window_pattern": period})
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\n",
        f"recipe.yaml:1:13: base_model: {base}: config.json sliding_window_pattern={shown}: cannot compute layer_types",
    )


def test_a_per_layer_list_of_the_wrong_length_is_located_at_its_source(inputs, hostile_cli, refused, snapshot):
    other = model(inputs, "other", {**LLAMA, "layer_types": ["full_attention"] * 7})
    base = model(inputs, "typed", {**LLAMA, "layer_types": ["full_attention"] * 8})
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\nslices:\n  - layer_range: [0, 4]\n  - model: {other}\n    layer_range: [4, 8]\n",
        f"recipe.yaml:4:12: slices[1].model: {other}: config.json layer_types has 7 entries for 8 layers; "
        "the config is inconsistent",
    )


def test_a_vlm_text_config_that_is_not_a_mapping(inputs, hostile_cli, refused, snapshot):
    config = json.loads((CONFIGS / "google__gemma-3-4b-pt" / "config.json").read_text())
    base = model(inputs, "vlm", {**config, "text_config": 5})
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\n",
        ":1:13: base_model: config.json text_config is 5; expected the decoder's config as a mapping",
    )


def test_a_quantized_source_is_refused(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "q", {**LLAMA, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\n",
        f"recipe.yaml:1:13: base_model: {base} is quantized (gptq): zeroing packed weights does not give zero",
    )


def test_a_bin_only_source_is_refused(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "bin", LLAMA)
    (base / "pytorch_model.bin").write_bytes(b"not a pickle that anyone should load")
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\n",
        re.compile(r"recipe\.yaml:1:13: base_model: .*only PyTorch \.bin weights found"),
    )


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float32 safetensors file of zeros, written by hand (no torch needed to plan)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(offset))


def test_a_projection_missing_from_one_layer_is_named(inputs, hostile_cli, refused, snapshot):
    from tli_recipe.source.arch import load_architectures

    base = model(inputs, "holed", {**LLAMA, "num_hidden_layers": 4})
    shapes = load_architectures()["llama"].expected_tensors({**LLAMA, "num_hidden_layers": 4}, 4)
    del shapes["model.layers.2.self_attn.o_proj.weight"]
    write_safetensors(base / "model.safetensors", shapes)
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 2}}\n",
        f"recipe.yaml:1:13: base_model: {base}: layer 2 has no tensor 'model.layers.2.self_attn.o_proj.weight', "
        "which the other layers have (o_proj)",
    )


def test_the_same_checkpoint_without_the_hole_plans(inputs, hostile_cli):
    """The control of the case above: the hand-written checkpoint itself is accepted."""
    from tli_recipe.source.arch import load_architectures

    base = model(inputs, "whole", {**LLAMA, "num_hidden_layers": 4})
    write_safetensors(
        base / "model.safetensors", load_architectures()["llama"].expected_tensors({**LLAMA, "num_hidden_layers": 4}, 4)
    )
    result = hostile_cli("plan", recipe(inputs, f"base_model: {base}\ninject: {{every: 2}}\n"))
    assert result.exit_code == 0, result.stderr


def test_a_dense_layer_without_a_router_is_not_a_gap(tmp_path):
    """Qwen3-MoE: dense layers (mlp_only_layers) have no router and no experts; that is the layout."""
    from tli_recipe.plan.sources import missing_projections
    from tli_recipe.source.arch import load_architectures

    arch = load_architectures()["qwen3_moe"]
    config = {"num_experts": 2, "mlp_only_layers": [1], "decoder_sparse_step": 1}
    sparse = [
        "mlp.gate.weight",
        "mlp.experts.0.down_proj.weight",
        "mlp.experts.1.down_proj.weight",
        "self_attn.o_proj.weight",
    ]
    dense = ["mlp.down_proj.weight", "self_attn.o_proj.weight"]
    assert missing_projections(arch, config, {0: sparse, 1: dense, 2: sparse}, 3) == []
    assert missing_projections(arch, config, {0: sparse, 1: dense, 2: sparse[1:]}, 3) == [(2, "mlp.gate.weight")]


# --- output_config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, message",
    [
        ("num_hidden_layers.x", "descends into num_hidden_layers, which belongs to the plan"),
        ("layer_types.x", "descends into layer_types, which belongs to the plan"),
        (
            "hidden_size.x",
            "hidden_size is not a mapping in config.json; expected a dotted key that descends only through mappings",
        ),
    ],
)
def test_dotted_keys_into_values_that_are_not_mappings(inputs, hostile_cli, refused, snapshot, key, message):
    base = model(inputs, "m", LLAMA)
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\noutput_config:\n  {key}: 1\n",
        f"recipe.yaml:4:3: output_config.{key}: {message}",
    )


def test_an_index_list_of_the_architecture_belongs_to_the_plan(inputs, hostile_cli, refused, snapshot):
    base = CONFIGS / "Qwen__Qwen3-30B-A3B"
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\noutput_config:\n  mlp_only_layers: [1]\n  decoder_sparse_step: 2\n",
        re.compile(
            r"recipe\.yaml:4:3: output_config\.mlp_only_layers: mlp_only_layers belongs to the plan.*\n"
            r".*recipe\.yaml:5:3: output_config\.decoder_sparse_step: decoder_sparse_step belongs to the plan"
        ),
        base,
    )


def test_a_vlm_per_layer_list_under_text_config_belongs_to_the_plan(inputs, hostile_cli, refused, snapshot):
    base = CONFIGS / "google__gemma-3-4b-pt"
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\noutput_config:\n  text_config.layer_types.0: x\n",
        "recipe.yaml:4:3: output_config.text_config.layer_types.0: descends into text_config.layer_types, "
        "which belongs to the plan",
        base,
    )


@pytest.mark.parametrize(
    "entry", ["auto_map: {AutoModel: evil.Model}", "model_type: mistral", "text_config.model_type: x"]
)
def test_keys_that_pick_the_model_code_are_refused_once(inputs, hostile_cli, refused, snapshot, entry):
    base = model(inputs, "m", LLAMA)
    result = plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 4}}\noutput_config:\n  {entry}\n",
        re.compile(r"recipe\.yaml:4:3: output_config\.\S+: .*cannot set or remove"),
    )
    assert result.stderr.count("recipe.yaml:") == 1, result.stderr


# --- bounds and reporting together ----------------------------------------------------------------


def test_a_runaway_output_is_refused_with_a_bound(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "m", LLAMA)
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\ninject: {{every: 1, copies: 64}}\n",
        "recipe.yaml:2:28: inject.copies: 64 copies at 8 positions give 520 output layers; expected at most 128 "
        "(16x the 8 layers of base_model)",
    )


def test_a_runaway_stack_of_slices_is_refused_with_a_bound(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "m", LLAMA)
    slices = "".join("  - layer_range: [0, 8]\n" for _ in range(17))
    plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"base_model: {base}\nslices:\n{slices}",
        "recipe.yaml:3:3: slices: the slices stack 136 layers; expected at most 128 (16x the 8 layers of base_model)",
    )


def test_an_init_problem_and_a_stage_problem_are_reported_together(inputs, hostile_cli, refused, snapshot):
    base = model(inputs, "m", LLAMA)
    result = plan_refused(
        hostile_cli,
        refused,
        snapshot,
        inputs,
        f"""base_model: {base}
inject: {{every: 4, init: {{qkv_proj: zero}}}}
stages:
  - name: s
    trainable: [{{layers: [0, 99]}}]
""",
        "recipe.yaml:2:27: inject.init.qkv_proj: the llama architecture has no projection 'qkv_proj'",
    )
    assert "recipe.yaml:5:26: stages[0].trainable[0].layers: [0, 99] ends past the 10 output layers" in result.stderr
