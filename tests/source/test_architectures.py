"""Every supported architecture, exactly: tiny random model -> TLI -> reference tensors -> transformers logits.

The reference layer map and the function-preserving tensors are written here independently
of the architecture definitions, from each architecture's published structure.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import ROOT, logits_of, write_recipe
from safetensors.torch import load_file

from tli_recipe import compile_plan, execute_plan, load_recipe
from tli_recipe.source.arch import load_architectures

#: arch -> (layer prefix, extra config, {tensor-name pattern in an injected layer: value it must hold})
CASES = {
    "llama": ("model.layers.", {}, {r"self_attn\.o_proj\.": 0.0, r"mlp\.down_proj\.": 0.0}),
    "mistral": ("model.layers.", {}, {r"self_attn\.o_proj\.": 0.0, r"mlp\.down_proj\.": 0.0}),
    "granite": (
        "model.layers.",
        {"embedding_multiplier": 2.0, "residual_multiplier": 0.5},
        {r"self_attn\.o_proj\.": 0.0, r"mlp\.down_proj\.": 0.0},
    ),
    "qwen2": ("model.layers.", {}, {r"self_attn\.o_proj\.": 0.0, r"mlp\.down_proj\.": 0.0}),
    "qwen3": ("model.layers.", {"head_dim": 8}, {r"self_attn\.o_proj\.": 0.0, r"mlp\.down_proj\.": 0.0}),
    # sandwich norms: the recommended init zeroes the effective post-norm gains (stored 1 + w -> w = -1)
    "gemma2": (
        "model.layers.",
        {"head_dim": 8},
        {r"post_attention_layernorm\.": -1.0, r"post_feedforward_layernorm\.": -1.0},
    ),
    "gemma3": (
        "model.layers.",
        {"head_dim": 8},
        {r"post_attention_layernorm\.": -1.0, r"post_feedforward_layernorm\.": -1.0},
    ),
    "gemma3-vlm": (
        "language_model.model.layers.",
        {},
        {r"post_attention_layernorm\.": -1.0, r"post_feedforward_layernorm\.": -1.0},
    ),
    # post-norm, gains stored as is
    "olmo2": ("model.layers.", {}, {r"post_attention_layernorm\.": 0.0, r"post_feedforward_layernorm\.": 0.0}),
    "phi3": ("model.layers.", {}, {r"self_attn\.o_proj\.": 0.0, r"mlp\.down_proj\.": 0.0}),
    # every expert's down projection; an expert index is never taken for a layer index
    "qwen3_moe": (
        "model.layers.",
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        {r"self_attn\.o_proj\.": 0.0, r"mlp\.experts\.\d+\.down_proj\.": 0.0},
    ),
    "qwen3_moe-mixed": (
        "model.layers.",
        {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "mlp_only_layers": [0, 5],
            "decoder_sparse_step": 1,
        },
        {r"self_attn\.o_proj\.": 0.0, r"mlp\.experts\.\d+\.down_proj\.": 0.0, r"mlp\.down_proj\.": 0.0},
    ),
    "mixtral": (
        "model.layers.",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        {r"self_attn\.o_proj\.": 0.0, r"block_sparse_moe\.experts\.\d+\.w2\.": 0.0},
    ),
}


def build(tiny, case: str, layers: int, tie: bool = False):
    arch = case.removesuffix("-mixed")
    return tiny(arch=arch, layers=layers, tie=tie, **CASES[case][1])


def load_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def reference(source: dict[str, torch.Tensor], prefix: str, layers: int, every: int, zeroed: dict[str, float]):
    """Algorithm 1, written out: what every output tensor must be."""
    pattern = re.compile("^" + re.escape(prefix) + r"(\d+)\.(.+)$")
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in source.items():
        m = pattern.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        else:
            out[name] = tensor
    j = 0
    for i in range(layers):
        out.update({f"{prefix}{j}.{k}": v for k, v in by_layer[i].items()})
        j += 1
        if (i + 1) % every == 0:
            for k, v in by_layer[i].items():
                fill = next((value for pat, value in zeroed.items() if re.match(pat, k)), None)
                out[f"{prefix}{j}.{k}"] = v if fill is None else torch.full_like(v, fill)
            j += 1
    return out


def grow(tmp_path, base, body, name="grown"):
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / name}\n{body}", f"{name}.yaml")
    plan = compile_plan(load_recipe(recipe))
    return plan, execute_plan(plan, progress=False, log=lambda m: None)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tli_is_exact(tmp_path, tiny, case, tie):
    layers, every = 6, 3
    base = build(tiny, case, layers, tie)
    plan, out = grow(tmp_path, base, f"inject: {{every: {every}}}\n")
    assert plan.function_preserving
    prefix, _, zeroed = CASES[case]
    expected, got = reference(load_all(base), prefix, layers, every, zeroed), load_all(out)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert ("lm_head.weight" in got) == ("lm_head.weight" in load_all(base))
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dus_layer_map(tmp_path, tiny, case):
    base = build(tiny, case, 6)
    plan, out = grow(tmp_path, base, "slices:\n  - layer_range: [0, 4]\n  - layer_range: [2, 6]\n")
    assert [e.layer for e in plan.layers] == [0, 1, 2, 3, 2, 3, 4, 5]
    prefix = CASES[case][0]
    src, got = load_all(base), load_all(out)
    for j, i in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        mine = sorted(k[len(f"{prefix}{j}.") :] for k in got if k.startswith(f"{prefix}{j}."))
        theirs = sorted(k[len(f"{prefix}{i}.") :] for k in src if k.startswith(f"{prefix}{i}."))
        assert mine == theirs and mine
        for k in mine:
            assert torch.equal(got[f"{prefix}{j}.{k}"], src[f"{prefix}{i}.{k}"])
    logits_of(out)  # loads with no missing or unexpected keys


def test_layer_types_follow_the_map_for_gemma3(tmp_path, tiny):
    base = tiny(
        arch="gemma3", layers=6, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 3
    )
    plan, out = grow(tmp_path, base, "inject: {every: 3}\n")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
        "full_attention",
    ]
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)


def test_vlm_nested_config_is_updated(tmp_path, tiny):
    base = build(tiny, "gemma3-vlm", 6)
    plan, out = grow(tmp_path, base, "inject: {every: 3}\n")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 8 and "num_hidden_layers" not in config
    assert len(config["text_config"]["layer_types"]) == 8
    src, got = load_all(base), load_all(out)
    others = [k for k in src if ".layers." not in k or "vision" in k]
    assert others and all(torch.equal(got[k], src[k]) for k in others)


def test_mixed_moe_lists_dense_layers_explicitly(tmp_path, tiny):
    base = build(tiny, "qwen3_moe-mixed", 6)
    plan, _ = grow(tmp_path, base, "inject: {every: 3}\n")
    # source dense layers 0 and 5 -> outputs 0 and 6, and the copy of 5 -> 7
    assert plan.config["mlp_only_layers"] == [0, 6, 7] and plan.config["decoder_sparse_step"] == 1


def test_stale_threshold_blocks_run_until_the_recipe_chooses(tmp_path, tiny, cli):
    base = tiny(arch="gemma3", layers=6, head_dim=8, sliding_window=4)
    config = json.loads((base / "config.json").read_text())
    config.pop("layer_types", None)
    config["sliding_window_pattern"] = 3
    grown_base = tmp_path / "hub-style"
    grown_base.mkdir()
    for f in base.iterdir():
        (grown_base / f.name).write_bytes(f.read_bytes())
    (grown_base / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, f"base_model: {grown_base}\noutput: {tmp_path / 'out'}\ninject: {{every: 3}}\n")
    planned = cli("plan", recipe)
    assert planned.exit_code == 0 and "blocking    config.json sliding_window_pattern=3" in planned.stdout
    refused = cli("run", recipe, "--no-progress")
    assert refused.exit_code == 2 and "output_config: {sliding_window_pattern: null}" in refused.stderr
    assert not (tmp_path / "out").exists()
    ok = cli("run", recipe, "--no-progress", "--set", "output_config.sliding_window_pattern=null")
    assert ok.exit_code == 0, ok.stderr
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "sliding_window_pattern" not in written and len(written["layer_types"]) == 8


@pytest.mark.parametrize("arch,extra", [("gemma2", {"head_dim": 8}), ("olmo2", {})])
def test_post_norm_gain_init_moves_less_after_one_step(tmp_path, tiny, arch, extra):
    """Zero o_proj/down_proj and zero post-norm gains are both exact at init; after one SGD step on
    random data, the post-norm rescales the zero projections' first update to unit RMS, while a
    zero gain grows from 0. Compare the change of the logits."""
    from transformers import AutoModelForCausalLM

    base = tiny(arch=arch, layers=4, **extra)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    changes = {}
    for name, init in (
        ("proj", "{o_proj: zero, down_proj: zero}"),
        ("gain", "{post_attention_layernorm: zero_gain, post_feedforward_layernorm: zero_gain}"),
    ):
        plan, out = grow(tmp_path, base, f"inject:\n  every: 2\n  init: {init}\n", name=name)
        assert plan.function_preserving
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        before = model(input_ids=ids).logits.detach()
        torch.testing.assert_close(before, logits_of(base, ids), atol=1e-5, rtol=0)
        trainable = [
            p for n, p in model.named_parameters() if any(f"layers.{i}." in n for i in plan.requires_grad_layers)
        ]
        for _n, p in model.named_parameters():
            p.requires_grad_(any(p is q for q in trainable))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.optim.SGD(trainable, lr=1e-2).step()
        changes[name] = float((model(input_ids=ids).logits.detach() - before).abs().max())
    print(
        f"{arch}: max |logit change| after one SGD step: zero o_proj/down_proj {changes['proj']:.4g}, "
        f"zero post-norm gain {changes['gain']:.4g}"
    )
    assert changes["gain"] < changes["proj"] / 5, (
        f"max |logit change| after one step: zero o_proj/down_proj {changes['proj']:.3g}, "
        f"zero post-norm gain {changes['gain']:.3g}"
    )


def test_plan_shows_the_recommended_init(tmp_path, tiny, cli):
    base = tiny(arch="olmo2", layers=4)
    result = cli("plan", write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\n"))
    assert "recommended for olmo2" in result.stdout and "post_attention_layernorm=zero_gain" in result.stdout


def test_unknown_architecture_is_inferred_with_a_warning(tmp_path, tiny):
    base = tiny(layers=4)
    alien = tmp_path / "alien"
    alien.mkdir()
    for f in base.iterdir():
        (alien / f.name).write_bytes(f.read_bytes())
    config = json.loads((alien / "config.json").read_text())
    config["architectures"], config["model_type"] = ["NewLlamaLikeForCausalLM"], "newllama"
    (alien / "config.json").write_text(json.dumps(config))
    plan = compile_plan(load_recipe(write_recipe(tmp_path, f"base_model: {alien}\ninject: {{every: 2}}\n")))
    assert plan.architecture == "inferred:NewLlamaLikeForCausalLM"
    assert any("has no definition" in w and "model.layers.{layer}." in w for w in plan.warnings)
    assert plan.requires_grad_layers == [2, 5] and plan.function_preserving
    zero = {op.name for op in plan.tensors if op.op == "zero"}
    assert zero == {f"model.layers.{i}.{p}.weight" for i in (2, 5) for p in ("self_attn.o_proj", "mlp.down_proj")}


def test_unknown_architecture_without_layers_fails_clearly(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["OddModel"], "num_hidden_layers": 2}))
    recipe = write_recipe(tmp_path, f"base_model: {folder}\ninject: {{every: 2}}\n")
    from tli_recipe.errors import RecipeError

    with pytest.raises(RecipeError, match="architecture OddModel has no definition.*Adding an architecture"):
        compile_plan(load_recipe(recipe))


def test_docs_table_matches_the_definitions():
    from tli_recipe.plan.report import architecture_table

    page = (ROOT / "docs" / "architectures.md").read_text()
    assert architecture_table() in page, (
        "docs/architectures.md's architecture table is stale: paste `tli-recipe architectures --markdown`"
    )


def test_every_definition_is_tested():
    definition_of = {
        "llama": "llama",
        "mistral": "llama",
        "granite": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gemma2": "gemma2",
        "gemma3": "gemma3",
        "gemma3-vlm": "gemma3-vlm",
        "olmo2": "olmo2",
        "phi3": "phi3",
        "qwen3_moe": "qwen3_moe",
        "mixtral": "mixtral",
    }
    assert {c.removesuffix("-mixed") for c in CASES} == set(definition_of)
    assert set(load_architectures()) == set(definition_of.values())


@pytest.mark.parametrize(
    "model,params,arch",
    [
        ("Qwen__Qwen3-30B-A3B", 30_532_122_624, "qwen3_moe"),  # "30.5B" on the model card
        ("mistralai__Mixtral-8x7B-v0.1", 46_702_792_704, "mixtral"),  # "46.7B"
        ("microsoft__Phi-3-mini-4k-instruct", 3_821_079_552, "phi3"),  # "3.8B"
        ("allenai__OLMo-2-1124-7B", 7_298_617_344, "olmo2"),  # "7.30B"
        ("google__gemma-3-1b-pt", 999_885_952, "gemma3"),  # "1B"
        ("google__gemma-3-4b-pt", 3_880_263_168, "gemma3-vlm"),  # text decoder of the 4.3B VLM
        ("Qwen__Qwen3-8B", 8_190_735_360, "qwen3"),  # "8.2B"
        ("Qwen__Qwen2.5-7B", 7_615_616_512, "qwen2"),  # "7.61B"
    ],
)
def test_published_configs_give_published_parameter_counts(tmp_path, model, params, arch):
    """Shapes derived from config.json alone (no weights) add up to the published counts."""
    from conftest import CONFIGS

    plan = compile_plan(
        load_recipe(
            write_recipe(
                tmp_path,
                f"base_model: {CONFIGS / model}\ninject: {{every: 4}}\n"
                "output_config: {sliding_window_pattern: null}\n",
            )
        )
    )
    assert plan.architecture == arch
    assert plan.totals.parameters_before == params
    assert not plan.blocking


def test_inferred_architecture_without_a_known_output_projection_is_not_called_exact(tmp_path, tiny, cli):
    from safetensors.torch import save_file

    base = tiny(layers=4)
    alien = tmp_path / "alien2"
    alien.mkdir()
    tensors = {k.replace("self_attn.o_proj", "self_attn.out_proj"): v for k, v in load_all(base).items()}
    save_file(tensors, str(alien / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["architectures"], config["model_type"] = ["OutProjForCausalLM"], "outproj"
    (alien / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(
        tmp_path,
        f"base_model: {alien}\noutput: {tmp_path / 'out'}\ninject: {{every: 2}}\n"
        "stages:\n  - name: new\n    trainable: [injected]\n",
    )
    plan = compile_plan(load_recipe(recipe))
    assert not plan.function_preserving
    assert {op.projection for op in plan.tensors if op.op == "zero"} == {"down_proj"}
    result = cli("run", recipe, "--no-progress")  # emitting training configs needs no definition either
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "training" / "axolotl" / "01-new.yaml").is_file()


def test_lora_after_a_full_stage_on_the_injected_layers_is_not_refused(tmp_path, tiny):
    base = tiny(arch="gemma2", layers=4, head_dim=8)
    lora = "  - name: lora\n    trainable: [all]\n    lora: {r: 4, alpha: 8, targets: [q_proj, o_proj, down_proj]}\n"
    alone = plan_of_text(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\nstages:\n" + lora)
    assert any("never move" in w for w in alone.warnings)
    after = plan_of_text(
        tmp_path,
        f"base_model: {base}\ninject: {{every: 2}}\nstages:\n  - name: new\n    trainable: [injected]\n" + lora,
    )
    assert not any("never move" in w for w in after.warnings)
    from tli_recipe.training.emit import frozen_injected_problem, stage_specs

    specs = stage_specs(after)
    assert frozen_injected_problem(specs[1]) is None
    assert frozen_injected_problem(stage_specs(alone)[0]) is not None


def plan_of_text(tmp_path, text):
    return compile_plan(load_recipe(write_recipe(tmp_path, text, "stages.yaml")))
