"""widen: target sizes resolved against stored configs, refusals at their recipe line with the sizes
that work, the config keys written, the plan printout. No tensor is read here."""

from __future__ import annotations

import pytest
from conftest import CONFIGS, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.errors import RecipeError

LLAMA_1B = CONFIGS / "meta-llama__Llama-3.2-1B"  # hidden 2048, intermediate 8192, 32 heads / 8 kv, tied
QWEN3_4B = CONFIGS / "Qwen__Qwen3-4B"  # hidden 2560, 32 heads / 8 kv, head_dim 128


def plan_of(tmp_path, text: str):
    return compile_plan(load_recipe(write_recipe(tmp_path, text)))


def refusal(tmp_path, text: str) -> str:
    with pytest.raises(RecipeError) as info:
        plan_of(tmp_path, text)
    return str(info.value)


def test_hidden_x2_is_a_4b_class_llama_with_explicit_head_dim(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{hidden_size: 4096}}\n")
    assert plan.config["hidden_size"] == 4096 and plan.config["intermediate_size"] == 16384
    assert (plan.config["num_attention_heads"], plan.config["num_key_value_heads"]) == (64, 16)
    assert plan.config["head_dim"] == 64 and plan.function_preserving
    assert 4.0e9 < plan.totals.parameters_after < 5.5e9
    assert plan.widen.tied_fold == 0.5 and "lm_head.weight" not in {op.name for op in plan.tensors}
    norm = next(op for op in plan.tensors if op.name == "model.norm.weight")
    assert norm.op == "widen" and norm.value == 0.5


def test_refusals_are_located_and_name_sizes_that_work(tmp_path):
    text = refusal(
        tmp_path,
        f"base_model: {LLAMA_1B}\nwiden:\n  hidden_size: 3000\n  num_attention_heads: 34\n  intermediate_size: 100\n",
    )
    assert "recipe.yaml:3:16: widen.hidden_size: 3000 is not an integer multiple of the source's 2048" in text
    assert "expected 2048 or 4096" in text
    assert "recipe.yaml:4:24: widen.num_attention_heads: 34 heads break the GQA grouping" in text
    assert "expected a multiple of 4: 32 or 36" in text
    assert "recipe.yaml:5:22: widen.intermediate_size: 100 is smaller than the source's 8192" in text


def test_llama_heads_must_divide_the_hidden_size(tmp_path):
    text = refusal(tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{num_attention_heads: 36}}\n")
    assert "widen.num_attention_heads: 36 heads do not divide hidden_size 2048" in text
    assert "expected 32 or 64" in text


def test_heads_breaking_gqa_and_a_changed_ratio_are_refused(tmp_path):
    text = refusal(tmp_path, f"base_model: {QWEN3_4B}\nwiden: {{num_attention_heads: 42}}\n")
    assert "widen.num_attention_heads: 42 heads break the GQA grouping (32 heads / 8 KV heads = 4 per KV head)" in text
    assert "expected a multiple of 4: 40 or 44" in text
    text = refusal(tmp_path, f"base_model: {QWEN3_4B}\nwiden: {{num_attention_heads: 40, num_key_value_heads: 12}}\n")
    assert "widen.num_key_value_heads: 12 KV heads with 40 heads change the GQA ratio 4; expected 10" in text
    plan = plan_of(tmp_path, f"base_model: {QWEN3_4B}\nwiden: {{num_key_value_heads: 10}}\n")
    assert (plan.config["num_attention_heads"], plan.config["num_key_value_heads"]) == (40, 10)


def test_unsupported_architectures_and_the_hidden_router_are_refused_at_widen(tmp_path):
    for name in ("google__gemma-3-4b-pt", "microsoft__Phi-3-mini-4k-instruct", "allenai__OLMo-2-1124-7B"):
        text = refusal(tmp_path, f"base_model: {CONFIGS / name}\nwiden: {{intermediate_size: 99999}}\n")
        assert "recipe.yaml:2:1: widen: widening" in text and "is not supported" in text
    text = refusal(
        tmp_path,
        f"base_model: {LLAMA_1B}\nwiden: {{intermediate_size: 9000}}\nupcycle: {{experts: 2, top_k: 1, router: hidden, "
        "prompts: [{positive: [a]}, {positive: [b]}]}\n",
    )
    assert "widen: widen together with the hidden router init is not supported" in text


def test_widen_then_upcycle_writes_the_widened_expert_width(tmp_path):
    plan = plan_of(
        tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{hidden_size: 4096}}\nupcycle: {{experts: 2, top_k: 1}}\n"
    )
    assert plan.config["model_type"] == "mixtral" and plan.config["intermediate_size"] == 16384
    assert plan.config["hidden_size"] == 4096 and plan.function_preserving
    router = next(op for op in plan.tensors if op.name.endswith("layers.0.block_sparse_moe.gate.weight"))
    expert = next(op for op in plan.tensors if op.name.endswith("layers.0.block_sparse_moe.experts.1.w2.weight"))
    assert router.shape == (2, 4096) and expert.op == "widen" and expert.shape == (4096, 16384)


def test_output_config_cannot_set_a_width_the_plan_writes(tmp_path):
    text = refusal(
        tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{intermediate_size: 9000}}\noutput_config: {{head_dim: 32}}\n"
    )
    assert "output_config.head_dim" in text


def test_plan_prints_the_new_widths(tmp_path, cli):
    recipe = write_recipe(tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{intermediate_size: 9216, noise: 0.01}}\n")
    result = cli("plan", recipe)
    assert result.exit_code == 0, result.stderr
    assert "widen       intermediate_size 8192 -> 9216 (head_dim 64; init split, noise 0.01, seed 0)" in result.stdout
    assert "preserving  yes" in result.stdout


def test_gemma_tied_folds_the_embedding_scale_into_the_final_norm(tmp_path):
    plan = plan_of(tmp_path, f"base_model: {CONFIGS / 'google__gemma-3-1b-pt'}\nwiden: {{hidden_size: 2304}}\n")
    w = plan.widen
    assert w.embed_factor == w.tied_fold == pytest.approx(0.5**0.5) and w.norm_offset == 1
    norm = next(op for op in plan.tensors if op.name == "model.norm.weight")
    assert (norm.op, norm.value, norm.value_offset) == ("widen", pytest.approx(0.5**0.5), 1)


def test_an_moe_output_needs_expert_rows_of_a_multiple_of_16_bytes(tmp_path):
    """transformers' grouped expert kernel fails on rows that are not a multiple of 16 bytes
    (tests/execute/test_widen.py checks that premise): widths of 4 in float32, of 8 in bfloat16."""
    up = "upcycle: {experts: 2, top_k: 1}\n"
    text = refusal(tmp_path, f"base_model: {LLAMA_1B}\ndtype: float32\nwiden: {{intermediate_size: 8194}}\n{up}")
    assert "recipe.yaml:3:28: widen.intermediate_size: 8194 is the expert width of an MoE output" in text
    assert "a multiple of 4 in float32; expected 8192 or 8196" in text
    # LLAMA_1B is bfloat16: 8196 works in float32 only
    text = refusal(tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{intermediate_size: 8196}}\n{up}")
    assert "a multiple of 8 in bfloat16; expected 8192 or 8200" in text
    plan = plan_of(tmp_path, f"base_model: {LLAMA_1B}\ndtype: float32\nwiden: {{intermediate_size: 8196}}\n{up}")
    assert plan.config["intermediate_size"] == 8196 and plan.upcycle is not None
    # a dense output has no grouped kernel: any width
    assert plan_of(tmp_path, f"base_model: {LLAMA_1B}\nwiden: {{intermediate_size: 8194}}\n").widen is not None


def test_a_base_model_whose_widths_misalign_is_refused_at_upcycle(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    config = (LLAMA_1B / "config.json").read_text().replace('"intermediate_size": 8192', '"intermediate_size": 8194')
    (folder / "config.json").write_text(config.replace('"hidden_size": 2048', '"hidden_size": 2050'))
    text = refusal(tmp_path, f"base_model: {folder}\ndtype: float32\nupcycle: {{experts: 2, top_k: 1}}\n")
    assert "recipe.yaml:3:1: upcycle: the hidden size 2050 of base_model is not a multiple of 4" in text
    assert "recipe.yaml:3:1: upcycle: the expert width would be base_model's intermediate_size 8194" in text
    assert "expected widen.intermediate_size 8196" in text
    # widen's hidden size: n x the source's and a multiple of 4
    folder = tmp_path / "odd-qwen3"
    folder.mkdir()
    config = (QWEN3_4B / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"hidden_size": 2560', '"hidden_size": 2562'))
    recipe = f"base_model: {folder}\ndtype: float32\nwiden: {{hidden_size: 7686}}\nupcycle: {{experts: 2, top_k: 1}}\n"
    text = refusal(tmp_path, recipe)
    assert "recipe.yaml:3:22: widen.hidden_size: 7686 is the hidden size of an MoE output" in text
    assert "expected a multiple of 5124: 5124 or 10248" in text


@pytest.mark.parametrize("name,added", [("widen-mlp", "+26.5M"), ("widen-heads", "+26.5M"), ("widen-h2", "481.4M")])
def test_benchmark_widen_recipes_plan_as_their_headers_say(name, added):
    """benchmarks/growth/widen-*.yaml: the sizes their headers state, exact, and stage `full` only, with
    the same settings as the other growth recipes' `full` stage (compare_growth.sh compares them)."""
    from conftest import ROOT

    growth = ROOT / "benchmarks" / "growth"
    smollm2 = f"base_model={CONFIGS / 'HuggingFaceTB__SmolLM2-135M'}"
    plan = compile_plan(load_recipe(growth / f"{name}.yaml", [smollm2]))
    tli = compile_plan(load_recipe(growth / "tli-k4.yaml", [smollm2]))
    grown = plan.totals.parameters_after - plan.totals.parameters_before
    shown = f"{plan.totals.parameters_after / 1e6:.1f}M" if name == "widen-h2" else f"+{grown / 1e6:.1f}M"
    assert shown == added and added in (growth / f"{name}.yaml").read_text() and plan.function_preserving
    assert plan.totals.layers_after == 30 and [s.name for s in plan.stages] == ["full"]
    full = next(s for s in tli.stages if s.name == "full")
    assert (
        plan.stages[0].settings == full.settings and plan.stages[0].trainable_parameters == plan.totals.parameters_after
    )
    if name != "widen-h2":  # about TLI K = 4's added parameters
        assert abs(grown - (tli.totals.parameters_after - tli.totals.parameters_before)) < 2e6
