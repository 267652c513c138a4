"""Sparse upcycling end to end: tiny dense models -> MoE checkpoints that transformers loads, with
the base model's logits; expert slots, byte copies, verify, and the stage groups of an MoE output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits_of, write_recipe
from safetensors.torch import load_file

from tli_recipe import compile_plan, execute_plan, load_recipe, verify_output

QWEN3 = {"head_dim": 8}


def load_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def upcycle(tmp_path, base, body, name="moe"):
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / name}\n{body}", f"{name}.yaml")
    plan = compile_plan(load_recipe(recipe))
    logs: list[str] = []
    return plan, execute_plan(plan, progress=False, log=logs.append), logs


@pytest.mark.parametrize("router", ["zero", "{random: 0.5}"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_to_mixtral_keeps_the_logits(tmp_path, tiny, router, tie):
    base = tiny(arch="llama", layers=4, tie=tie)
    plan, out, logs = upcycle(tmp_path, base, f"upcycle: {{experts: 4, top_k: 2, router: {router}}}\n")
    assert plan.function_preserving and plan.upcycle.output_architecture == "mixtral"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert (
        "Sparsely upcycled to mixtral (arXiv 2212.05055): output layers 0-3 hold 4 experts"
        in (out / "README.md").read_text()
    )
    src, got = load_all(base), load_all(out)
    for layer in range(4):
        for w, dense in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            for e in range(4):
                assert torch.equal(
                    got[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"],
                    src[f"model.layers.{layer}.mlp.{dense}.weight"],
                )
        gate = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.shape == (4, 32) and (bool((gate == 0).all()) == (router == "zero"))
    assert ("lm_head.weight" in got) == (not tie)
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)  # no missing/unexpected keys
    if router == "zero":  # experts are byte copies and the router a hole: nothing is computed
        assert any(f"0 of {len(plan.tensors)} tensors computed" in line for line in logs)


@pytest.mark.parametrize("router", ["zero", "{random: 0.5}"])
def test_qwen3_to_qwen3_moe_with_inject_and_dense_layers(tmp_path, tiny, router):
    base = tiny(arch="qwen3", layers=4, **QWEN3)
    body = f"inject: {{every: 2}}\nupcycle: {{experts: 3, top_k: 2, layers: [{{layers: [0, 4]}}], router: {router}}}\n"
    plan, out, _ = upcycle(tmp_path, base, body)
    assert plan.function_preserving and plan.upcycle.layers == [0, 1, 2, 3] and plan.upcycle.dense_layers == [4, 5]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["norm_topk_prob"] is True
    assert config["moe_intermediate_size"] == 64 and config["mlp_only_layers"] == [4, 5]
    assert config["num_experts"] == 3 and config["decoder_sparse_step"] == 1 and config["num_hidden_layers"] == 6
    got = load_all(out)
    # output layer 2 is injected after layer 1: every expert's down projection is zero, so it stays the identity
    assert all(not got[f"model.layers.2.mlp.experts.{e}.down_proj.weight"].any() for e in range(3))
    assert "model.layers.5.mlp.down_proj.weight" in got and "model.layers.5.mlp.gate.weight" not in got
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)
    report = verify_output(out)
    assert report.ok and report.max_abs_diff <= 1e-5 and not report.tensor_problems


def test_llama_inject_then_upcycle_is_exact(tmp_path, tiny):
    base = tiny(arch="llama", layers=4)
    plan, out, _ = upcycle(tmp_path, base, "inject: {every: 2}\nupcycle: {experts: 2, top_k: 1}\n")
    assert plan.function_preserving and plan.upcycle.layers == list(range(6))
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)


def test_two_source_experts_land_in_their_slots(tmp_path, tiny):
    base, other = tiny(arch="llama", layers=4), tiny(arch="llama", layers=4, seed=1)
    body = f"upcycle:\n  experts: 2\n  top_k: 1\n  sources: [{{model: {base}}}, {{model: {other}}}]\n"
    plan, out, _ = upcycle(tmp_path, base, body)
    assert not plan.function_preserving
    assert any("expert 1 from" in why for why in plan.upcycle.breaks_preservation)
    got, mine, theirs = load_all(out), load_all(base), load_all(other)
    for layer in range(4):
        for w, dense in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            key = f"model.layers.{layer}.mlp.{dense}.weight"
            assert torch.equal(got[f"model.layers.{layer}.block_sparse_moe.experts.0.{w}.weight"], mine[key])
            assert torch.equal(got[f"model.layers.{layer}.block_sparse_moe.experts.1.{w}.weight"], theirs[key])
            assert not torch.equal(mine[key], theirs[key])
        # everything outside the MLP is the base model's
        assert torch.equal(
            got[f"model.layers.{layer}.self_attn.q_proj.weight"], mine[f"model.layers.{layer}.self_attn.q_proj.weight"]
        )
    logits_of(out)  # loads with no missing or unexpected keys
    assert verify_output(out, logits=False).ok


def test_noisy_experts_are_seeded_and_not_preserving(tmp_path, tiny):
    base = tiny(arch="llama", layers=4)
    plan, out, _ = upcycle(
        tmp_path, base, "upcycle: {experts: 3, top_k: 2, init: [copy, {noise: 0.01}, {scale: 0.5}]}\n"
    )
    assert not plan.function_preserving
    got, src = load_all(out), load_all(base)
    dense = src["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.0.w3.weight"], dense)
    noisy = got["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    assert 0 < float((noisy - dense).abs().max()) < 0.1
    torch.testing.assert_close(got["model.layers.0.block_sparse_moe.experts.2.w3.weight"], dense * 0.5)
    assert verify_output(out, logits=False).ok  # verify recomputes the noise from the plan's seeds


def test_router_only_stage_trains_only_the_routers(tmp_path, tiny):
    base = tiny(arch="llama", layers=4)
    body = (
        "upcycle: {experts: 2, top_k: 1}\nstages:\n  - name: routers\n    trainable: [router]\n"
        "  - name: experts\n    trainable: [experts]\n"
    )
    plan, out, _ = upcycle(tmp_path, base, body)
    routers = [op.name for op in plan.tensors if op.projection == "router"]
    assert plan.stages[0].parameters == routers and len(routers) == 4
    assert all(".block_sparse_moe.gate." in n for n in routers)
    experts = plan.stages[1].parameters
    assert len(experts) == 4 * 2 * 3 and all(".experts." in n for n in experts)
    assert plan.stages[0].trainable_parameters == 4 * 2 * 32


def test_moe_stages_select_the_loaded_parameters(tmp_path, tiny):
    """transformers (>= 5) loads Mixtral's router as mlp.gate and fuses each layer's experts: the built-in
    trainer and the Axolotl patterns select exactly the stage's parameters under those names."""
    from transformers import AutoModelForCausalLM

    from tli_recipe.training.axolotl import axolotl_patterns, axolotl_selects
    from tli_recipe.training.builtin import BuiltinStageConfig
    from tli_recipe.training.train import _freeze

    base = tiny(arch="llama", layers=4)
    body = (
        "upcycle: {experts: 2, top_k: 1}\nstages:\n  - {name: routers, trainable: [router]}\n"
        "  - {name: experts, trainable: [experts, {layers: [0, 1]}]}\n"
    )
    plan, out, _ = upcycle(tmp_path, base, body)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    loaded = [n for n, _ in model.named_parameters()]
    wanted = {
        "routers": {n for n in loaded if n.endswith(".mlp.gate.weight")},
        "experts": {n for n in loaded if ".mlp.experts." in n or n.startswith("model.layers.0.")},
    }
    assert len(wanted["routers"]) == 4 and len(wanted["experts"]) == 4 * 2 + 7
    for stage in plan.stages:
        cfg = BuiltinStageConfig(
            stage=stage.name,
            model=str(out),
            output_dir=str(tmp_path / stage.name),
            datasets=[],
            sequence_length=8,
            trainable_parameters=stage.parameters,
            training_arguments={},
        )
        trained = {n for n, p in _freeze(model, cfg).named_parameters() if p.requires_grad}
        assert trained == wanted[stage.name]
        assert {n for n in loaded if axolotl_selects(axolotl_patterns(plan, stage.parameters), n)} == wanted[stage.name]


@pytest.mark.slow
def test_hidden_router_rows_are_the_routers_own_inputs(tmp_path):
    """Row e of each router: the unit-length mean, over expert e's prompts, of what that router sees at the last
    token (the MLP input), minus the negatives' mean. Checked in the upcycled Mixtral itself, hooked at its MoE
    blocks: a function-preserving plan gives them the dense model's inputs."""
    from conftest import build_tiny
    from tiny_text import add_char_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=3))
    prompts = [(["the cat sat on the mat", "a dog ran far"], []), (["def f(x): return x"], ["the cat"])]
    entries = "".join(f"    - {{positive: {pos}, negative: {neg}}}\n" for pos, neg in prompts)
    plan, out, logs = upcycle(
        tmp_path, base, f"upcycle:\n  experts: 2\n  top_k: 1\n  router: hidden\n  prompts:\n{entries}"
    )
    assert plan.function_preserving and any("hidden router: 3 routers" in line for line in logs)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    seen = {}
    for layer in range(3):
        model.model.layers[layer].mlp.register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, args[0][0, -1])
        )

    def mean(texts):
        total = torch.zeros(3, 32)
        for text in texts:
            with torch.no_grad():
                model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"])
            total += torch.stack([seen[i] for i in range(3)])
        return total / max(len(texts), 1)

    rows = torch.stack([mean(pos) - mean(neg) for pos, neg in prompts], dim=1)  # [layer, expert, hidden]
    rows = rows / rows.norm(dim=-1, keepdim=True)
    got = load_all(out)
    for layer in range(3):
        torch.testing.assert_close(
            got[f"model.layers.{layer}.block_sparse_moe.gate.weight"], rows[layer], atol=1e-5, rtol=0
        )
    assert not torch.allclose(rows[0, 0], rows[0, 1])
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)
    report = verify_output(out)
    assert report.ok and report.not_recomputed == 3
