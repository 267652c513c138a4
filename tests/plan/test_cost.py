"""The LESA estimate `plan` prints before a run that fits SVDs: from the plan's shapes, by formula."""

from __future__ import annotations

import json

import pytest
from conftest import CONFIGS, write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.plan.cost import CPU_FLOPS, human_seconds, lesa_cost
from tli_recipe.plan.model import Plan
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


# Memory per device before training, from the plan's counts: Llama-3-8B grown to 40 layers (K = 4), by hand.
H, MLP, V, KV = 4096, 14336, 128256, 8 * 128  # hidden, MLP, vocabulary, key/value width (8 heads of 128)
LAYER = 2 * H * H + 2 * H * KV + 3 * H * MLP + 2 * H  # q, o; k, v; gate, up, down; two norms
TOTAL = 40 * LAYER + 2 * V * H + H  # embeddings and an untied head, the final norm
INJECTED = 8 * LAYER
MATRICES = 40 * (LAYER - 2 * H)  # the decoder layers' 2-D weights (all but the norms)
ADAPTERS = 40 * 16 * ((H + H) + (H + KV))  # LoRA r=16 on q_proj [H, H] and v_proj [KV, H]: r * (in + out)
GIB = 2**30

STAGES = """
stages:
  - name: new
    trainable: [injected]
  - name: all
    trainable: [all]
    distributed: {strategy: fsdp}
  - name: zero2
    trainable: [all]
    distributed: {strategy: deepspeed, zero_stage: 2}
  - name: zero3
    trainable: [all]
    distributed: {strategy: deepspeed, zero_stage: 3, offload: true}
  - name: tune
    trainable: [all]
    lora: {r: 16, alpha: 32, targets: [q_proj, v_proj]}
  - name: fp32
    trainable: [injected]
    precision: float32
    distributed: {strategy: fsdp}
  - name: qlora
    trainable: [all]
    lora: {r: 16, alpha: 32, targets: [q_proj, v_proj], quantize: 4}
"""


def llama3_8b_k4(tmp_path):
    base = CONFIGS / "meta-llama__Meta-Llama-3-8B"
    return write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 4}}\n" + STAGES)


def per_device(n: int = 1) -> dict:
    """Weights, gradients, Adam state per device, by the rules of docs/training.md, for bfloat16 weights."""

    def shard(b):
        return -(-b // n)

    return {
        # ddp: bf16 weights, bf16 gradients and two bf16 moments of the injected layers
        "new": (TOTAL * 2, INJECTED * 2, INJECTED * 2 * 2),
        # fsdp, bf16 autocast: the trainable weights upcast to fp32; fp32 gradients and moments; all sharded
        "all": (shard(TOTAL * 4), shard(TOTAL * 4), shard(TOTAL * 4 * 2)),
        # ZeRO-2: bf16 weights whole; bf16 gradients and fp32 master + 2 moments sharded
        "zero2": (TOTAL * 2, shard(TOTAL * 2), shard(TOTAL * (4 + 4 + 4))),
        # ZeRO-3 with offload: weights and optimizer state in CPU memory; bf16 gradients sharded
        "zero3": (0, shard(TOTAL * 2), 0),
        # LoRA: bf16 base weights + fp32 adapters; fp32 gradients and moments of the adapters
        "tune": (TOTAL * 2 + ADAPTERS * 4, ADAPTERS * 4, ADAPTERS * 4 * 2),
        # fsdp without autocast: nothing upcast, everything bf16 and sharded
        "fp32": (shard(TOTAL * 2), shard(INJECTED * 2), shard(INJECTED * 2 * 2)),
        # QLoRA: the decoder layers' matrices at 4 bits, every other weight (norms, embeddings, head) in fp32
        "qlora": (MATRICES // 2 + (TOTAL - MATRICES) * 4 + ADAPTERS * 4, ADAPTERS * 4, ADAPTERS * 4 * 2),
    }


def test_plan_json_gives_each_stages_memory_per_device_as_counted_by_hand(tmp_path, cli):
    recipe = llama3_8b_k4(tmp_path)
    for gpus in (None, 8):
        result = cli("plan", recipe, "--json", *(["--gpus", str(gpus)] if gpus else []))
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        estimates = data["estimates"]
        assert estimates["activations_counted"] is False and estimates["world_size"] == gpus
        got = {s["stage"]: s["per_device_bytes"] for s in estimates["stages"]}
        for stage, (weights, gradients, optimizer) in per_device(gpus or 1).items():
            expected = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
            assert got[stage] == expected | {"total": weights + gradients + optimizer}, (stage, gpus)
        trainable = {s["stage"]: s["trainable_parameters"] for s in estimates["stages"]}
        assert trainable["new"] == INJECTED and trainable["all"] == TOTAL and trainable["tune"] == ADAPTERS
        # the estimates are derived: the JSON still reads back as the plan
        assert Plan.model_validate(data).totals.parameters_after == TOTAL
    with pytest.raises(ValueError, match="estimate"):  # any other unknown key is refused as before
        Plan.model_validate(data | {"estimate": 1})


def test_plan_prints_memory_per_gpu_and_verifys_peak(tmp_path, cli):
    result = cli("plan", llama3_8b_k4(tmp_path))
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "activations are not counted" in text
    weights, gradients, optimizer = per_device()["new"]
    assert (
        f"stage new (ddp, 8 B per trainable parameter): {weights / GIB:.1f} GiB weights + {gradients / GIB:.1f} GiB "
        f"gradients + {optimizer / GIB:.1f} GiB Adam state = {(weights + gradients + optimizer) / GIB:.1f} GiB\n"
    ) in text
    total = sum(per_device()["all"]) / GIB
    assert "stage all (fsdp, 16 B per trainable parameter): " in text and f"= {total:.1f} GiB on 1 GPU\n" in text
    assert "sharded: divide weights, gradients, Adam state by the number of GPUs" in text
    assert "in CPU memory instead: weights, Adam state" in text
    # verify, streamed in float32 on 2 x 24 tokens: the embedding is the largest unit, plus one slice's copies
    unit = V * H * 4 + 4 * (16 << 20)
    activations = (32 + 40 + 4) * 48 * H * 4 + 2 * 3 * 48 * V * 4
    assert f"memory      verify: ~{(unit + activations) / GIB:.1f} GiB at its peak" in text
    assert f"(model.embed_tokens.weight) {unit / GIB:.1f} GiB + activations {activations / 2**20:.1f} MiB" in text
    on8 = cli("plan", llama3_8b_k4(tmp_path), "--gpus", "8").stdout
    assert "train, per GPU of 8, from" in on8 and "divide" not in on8
    assert f"= {sum(per_device(8)['all']) / GIB:.1f} GiB\n" in on8


def test_the_docs_show_the_memory_lines_plan_prints(cli):
    """docs/distributed-training.md shows the memory lines of `plan recipes/llama3-8b-k4.yaml`: what it prints."""
    root = CONFIGS.parents[2]
    page = (root / "docs" / "distributed-training.md").read_text()
    shown = page.split("## Memory per GPU, before you train")[1].split("```text\n")[1].split("```")[0]
    result = cli(
        "plan", root / "recipes" / "llama3-8b-k4.yaml", "--set", f"base_model={CONFIGS / 'meta-llama__Meta-Llama-3-8B'}"
    )
    assert result.exit_code == 0, result.stderr
    printed = result.stdout.split("\nmemory ", 1)[1].split("\nwarning ")[0]
    assert shown == "memory " + printed + "\n"
