"""The LESA estimate `plan` prints before a run that fits SVDs: from the plan's shapes, by formula."""

from __future__ import annotations

from conftest import CONFIGS, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.plan.cost import CPU_FLOPS, human_seconds, lesa_cost
from tli_recipe.plan.report import plan_table

ALL = "{q_proj: lesa, k_proj: lesa, v_proj: lesa, o_proj: lesa, gate_proj: lesa, up_proj: lesa, down_proj: lesa}"


def plan_of(tmp_path, init: str, model="meta-llama__Llama-3.2-1B"):
    recipe = write_recipe(tmp_path, f"base_model: {CONFIGS / model}\ninject: {{every: 4, init: {init}}}\n")
    return compile_plan(load_recipe(recipe))


def by_hand(out: int, width: int, layers: int = 16, hidden: int = 256, epochs: int = 10) -> float:
    m, n = sorted((out, layers * width))
    k = min(out, layers * width)
    return 4 * m * m * n + 8 * m**3 + epochs * k * (layers - 2) * 6 * hidden * (3 * width + hidden)


def test_the_estimate_adds_one_svd_and_one_predictor_per_projection_type(tmp_path):
    plan = plan_of(tmp_path, ALL)
    cost = lesa_cost(plan)
    # Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192, 8 KV heads of 64
    expected = by_hand(2048, 2048) * 2 + by_hand(512, 2048) * 2 + by_hand(8192, 2048) * 2 + by_hand(2048, 8192)
    assert cost.groups == 7 and cost.largest == (8192, 16 * 2048)
    assert cost.flops == expected
    assert cost.cpu_seconds == expected / CPU_FLOPS
    one = lesa_cost(plan_of(tmp_path, "{q_proj: lesa}"))
    assert one.groups == 1 and one.flops == by_hand(2048, 2048)  # four injected layers share one fit


def test_plan_prints_the_estimate_only_for_lesa(tmp_path):
    text = plan_table(plan_of(tmp_path, ALL))
    [line] = [line for line in text.splitlines() if line.startswith("lesa ")]
    assert "7 projection types fitted before writing (SVD of up to 8192 x 32768" in line
    assert f"about {human_seconds(lesa_cost(plan_of(tmp_path, ALL)).cpu_seconds)} on a 2-core CPU" in line
    plain = plan_of(tmp_path, "{}")
    assert lesa_cost(plain) is None and "lesa " not in plan_table(plain)
    assert [human_seconds(s) for s in (12, 600, 7200)] == ["12 s", "10 min", "2.0 h"]
