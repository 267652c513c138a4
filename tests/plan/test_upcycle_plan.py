"""Upcycle plans from stored configs: output architecture, config rewrite, counts, verdict, the plan
text and the trainer configs of the MoE stage groups. No tensor is read here."""

from __future__ import annotations

import pytest
from conftest import CONFIGS, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.errors import RecipeError

LLAMA_1B = CONFIGS / "meta-llama__Llama-3.2-1B"  # hidden 2048, intermediate 8192, 16 layers
QWEN3_4B = CONFIGS / "Qwen__Qwen3-4B"  # hidden 2560, intermediate 9728, 36 layers


def plan_of(tmp_path, text: str, overrides=()):
    return compile_plan(load_recipe(write_recipe(tmp_path, text), overrides))


def test_counts_total_and_active_per_token(tmp_path):
    dense = plan_of(tmp_path, f"base_model: {LLAMA_1B}\n")
    plan = plan_of(tmp_path, f"base_model: {LLAMA_1B}\nupcycle: {{experts: 4, top_k: 2}}\n")
    mlp, router = 3 * 2048 * 8192, 4 * 2048  # one dense MLP (gate, up, down); one router
    before = dense.totals.parameters_after
    assert plan.upcycle.parameters_total == plan.totals.parameters_after == before + 16 * (3 * mlp + router)
    assert plan.upcycle.parameters_active == before + 16 * (1 * mlp + router)  # k = 2 copies of 4 are active
    assert plan.function_preserving and plan.upcycle.renormalised and not plan.upcycle.breaks_preservation


def test_default_outputs_are_the_moe_siblings(tmp_path):
    assert (
        plan_of(tmp_path, f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1}}\n").upcycle.output_architecture
        == "mixtral"
    )
    assert (
        plan_of(
            tmp_path, f"base_model: {CONFIGS / 'mistralai__Mistral-7B-v0.1'}\nupcycle: {{experts: 2, top_k: 1}}\n"
        ).upcycle.output_architecture
        == "mixtral"
    )
    plan = plan_of(tmp_path, f"base_model: {QWEN3_4B}\nupcycle: {{experts: 2, top_k: 1}}\n")
    assert plan.upcycle.output_architecture == "qwen3_moe"
    assert plan.config["moe_intermediate_size"] == 9728 and plan.config["norm_topk_prob"] is True
    assert plan.config["mlp_only_layers"] == [] and plan.config["architectures"] == ["Qwen3MoeForCausalLM"]


def test_an_moe_base_model_and_a_foreign_output_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="already a Mixture-of-Experts model"):
        plan_of(
            tmp_path, f"base_model: {CONFIGS / 'mistralai__Mixtral-8x7B-v0.1'}\nupcycle: {{experts: 2, top_k: 1}}\n"
        )
    with pytest.raises(RecipeError, match=r"upcycle\.output: qwen3_moe is the MoE sibling of qwen3 models"):
        plan_of(tmp_path, f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1, output: qwen3_moe}}\n")


def test_biased_llama_cannot_become_mixtral(tmp_path):
    folder = tmp_path / "biased"
    folder.mkdir()
    (folder / "config.json").write_text(
        (LLAMA_1B / "config.json").read_text().replace('"attention_bias": false', '"attention_bias": true')
    )
    with pytest.raises(RecipeError, match="Mixtral attention projections have no bias"):
        plan_of(tmp_path, f"base_model: {folder}\nupcycle: {{experts: 2, top_k: 1}}\n")


def test_router_loss_keys_can_be_set_but_expert_keys_cannot(tmp_path):
    plan = plan_of(
        tmp_path,
        f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1}}\n"
        "output_config: {output_router_logits: true, router_aux_loss_coef: 0.02}\n",
    )
    assert plan.upcycle.aux_loss == {"output_router_logits": True, "router_aux_loss_coef": 0.02}
    with pytest.raises(
        RecipeError, match=r"output_config\.num_local_experts: num_local_experts belongs to the plan \(the upcycle"
    ):
        plan_of(
            tmp_path,
            f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1}}\noutput_config: {{num_local_experts: 8}}\n",
        )


def test_turning_renormalisation_off_breaks_preservation(tmp_path):
    plan = plan_of(
        tmp_path,
        f"base_model: {QWEN3_4B}\nupcycle: {{experts: 4, top_k: 2}}\noutput_config: {{norm_topk_prob: false}}\n",
    )
    assert not plan.function_preserving and not plan.upcycle.renormalised
    assert "does not renormalise" in plan.upcycle.breaks_preservation[0]


def test_injected_identity_layers_stay_exact_whatever_the_experts(tmp_path):
    body = "inject: {every: 12}\nupcycle: {experts: 2, top_k: 1, layers: [injected], init: {noise: 0.01}}\n"
    plan = plan_of(tmp_path, f"base_model: {QWEN3_4B}\n{body}")
    assert plan.upcycle.layers == [12, 25, 38] and plan.function_preserving  # every expert's down_proj is zero
    assert plan.config["mlp_only_layers"] == [i for i in range(39) if i not in (12, 25, 38)]


def test_plan_text_shows_the_expert_map_and_counts(tmp_path, cli):
    recipe = write_recipe(
        tmp_path,
        f"base_model: {LLAMA_1B}\nupcycle:\n  experts: 4\n  top_k: 2\n"
        "  init: [copy, {noise: 0.01}, copy, copy]\n  router: {random: 0.02}\n",
    )
    result = cli("plan", recipe)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "llama -> mixtral (upcycled)" in out
    assert "upcycle     llama -> mixtral: 4 experts, top-2, router random(0.02); output layers 0-15" in out
    assert "expert 1    noise(0.01) of the dense MLP of each layer's own source" in out
    assert "moe params  total 3.65B, active per token 2.04B" in out
    assert "moe exact   no: the experts are not all copies of the dense MLP (expert 1: noise(0.01))" in out
    assert "experts=4 (copy, noise(0.01), copy, copy), router=random(0.02)" in out


def test_moe_stage_groups_reach_the_trainer_configs(tmp_path):
    from tli_recipe.training.axolotl import axolotl_patterns, axolotl_selects

    plan = plan_of(
        tmp_path,
        f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1}}\nstages:\n"
        "  - {name: routers, trainable: [router]}\n  - {name: moe, trainable: [router, experts]}\n",
    )
    routers, moe = plan.stages
    assert routers.parameters == [op.name for op in plan.tensors if op.projection == "router"]
    assert set(moe.parameters) == {op.name for op in plan.tensors if op.projection == "router" or op.expert is not None}
    names = [op.name for op in plan.tensors]
    for stage in (routers, moe):
        patterns = axolotl_patterns(plan, stage.parameters)
        assert {n for n in names if axolotl_selects(patterns, n)} == set(stage.parameters)


def test_shared_and_lora_on_moe_groups_are_refused(tmp_path):
    with pytest.raises(RecipeError) as err:
        plan_of(
            tmp_path,
            f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1}}\nstages:\n"
            "  - {name: s, trainable: [shared]}\n"
            "  - {name: l, trainable: [all], lora: {r: 4, alpha: 8, targets: [q_proj, gate_proj]}}\n"
            "  - {name: d, trainable: [router]}\n",
        )
    text = str(err.value)
    assert "stages[0].trainable[0]: the mixtral architecture has no shared experts" in text
    assert "stages[1].lora.targets[1]: 'gate_proj' in upcycled layers is an MoE expert weight" in text
    with pytest.raises(RecipeError, match="'router' selects nothing: the output has no MoE layers"):
        plan_of(tmp_path, f"base_model: {LLAMA_1B}\nstages:\n  - {{name: d, trainable: [router]}}\n")


def test_llamafactory_refuses_moe_groups_and_axolotl_expresses_them(tmp_path, cli):
    recipe = write_recipe(
        tmp_path,
        f"base_model: {LLAMA_1B}\nupcycle: {{experts: 2, top_k: 1}}\nstages:\n"
        "  - {name: everything, trainable: [all]}\n  - {name: routers, trainable: [router]}\n",
    )
    cli("emit", recipe, "-o", tmp_path / "configs")
    refused = (tmp_path / "configs" / "llamafactory" / "02-routers.refused.txt").read_text()
    assert "it trains the MoE group router: LLaMA-Factory selects whole layers" in refused
    assert (tmp_path / "configs" / "llamafactory" / "01-everything.yaml").is_file()
    axolotl = (tmp_path / "configs" / "axolotl" / "02-routers.yaml").read_text()
    assert (
        "^model.layers.15.block_sparse_moe.gate.weight$" in axolotl and "^model.layers.15.mlp.gate.weight$" in axolotl
    )


@pytest.mark.parametrize("k", [1, 2])
def test_benchmark_moe_recipes_plan_as_their_headers_say(k):
    from conftest import ROOT

    path = ROOT / "benchmarks" / "growth" / f"moe-e2k{k}.yaml"
    plan = compile_plan(load_recipe(path, [f"base_model={CONFIGS / 'HuggingFaceTB__SmolLM2-135M'}"]))
    up, header = plan.upcycle, path.read_text()
    assert plan.function_preserving and (up.experts, up.top_k, up.layers) == (2, k, list(range(30)))
    added = up.parameters_total - plan.totals.parameters_before
    assert f"+{added / 1e6:.1f}M parameters in total" in header
    assert f"{up.parameters_active / 1e6:.1f}M active per token" in header
    assert plan.stages[0].trainable_parameters == 43_368_192 and "43.4M" in header
