"""The stage's `distributed` setting: the recipe's forms and errors, the plan's refusals, and what each
trainer's config carries for it (checked by Axolotl's and LLaMA-Factory's own validators where installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from tiny_text import write_text

from tli_recipe.execute.verify import load_plan

STAGES = """stages:
  - name: sharded
    trainable: [injected]
    precision: float32
    distributed: fsdp
  - name: zero3
    trainable: [all]
    precision: float32
    distributed: {strategy: deepspeed, offload: true}
  - name: zero2
    trainable: [all]
    precision: float32
    distributed: {strategy: deepspeed, zero_stage: 2}
  - name: plain
    trainable: [injected]
    precision: float32
"""


def grown(tmp_path: Path, tiny, stages: str = STAGES) -> Path:
    from tli_recipe import compile_plan, execute_plan, load_recipe

    data = write_text(tmp_path / "train.txt", 20)  # the trainers' validators want a dataset
    stages = stages.replace("    precision: float32\n", f"    precision: float32\n    datasets: [{{path: {data}}}]\n")

    recipe = write_recipe(
        tmp_path, f"base_model: {tiny(layers=4)}\ninject: {{every: 2}}\noutput: {tmp_path / 'grown'}\n{stages}"
    )
    return execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)


def configs(folder: Path, trainer: str) -> dict[str, dict]:
    return {
        p.stem.split("-", 1)[1]: yaml.safe_load(p.read_text())
        for p in sorted((folder / "training" / trainer).glob("[0-9][0-9]-*.yaml"))
        if not p.name.endswith(".merge.yaml")
    }


def test_the_plan_resolves_the_setting(tmp_path, tiny):
    plan = load_plan(grown(tmp_path, tiny))
    got = {s.name: s.distributed.model_dump() for s in plan.stages}
    assert got == {
        "sharded": {"strategy": "fsdp", "zero_stage": None, "offload": False},
        "zero3": {"strategy": "deepspeed", "zero_stage": 3, "offload": True},  # ZeRO-3 unless said
        "zero2": {"strategy": "deepspeed", "zero_stage": 2, "offload": False},
        "plain": {"strategy": "ddp", "zero_stage": None, "offload": False},
    }


def test_every_trainer_carries_the_setting(tmp_path, tiny):
    out = grown(tmp_path, tiny)
    builtin = {k: v["training_arguments"] for k, v in configs(out, "builtin").items()}
    assert builtin["sharded"]["fsdp"] == "full_shard auto_wrap"
    assert builtin["sharded"]["fsdp_config"]["version"] == 2  # FSDP2: per-parameter sharding
    zero3 = builtin["zero3"]["deepspeed"]["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["offload_optimizer"]["device"] == "cpu" and zero3["offload_param"]
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True
    assert builtin["zero2"]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in builtin["zero2"]["deepspeed"]["zero_optimization"]
    assert not {"fsdp", "deepspeed"} & set(builtin["plain"])

    axolotl = configs(out, "axolotl")
    assert axolotl["sharded"]["fsdp_version"] == 2
    assert axolotl["sharded"]["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert not {"fsdp_version", "fsdp_config", "deepspeed"} & set(axolotl["plain"])
    for trainer in ("axolotl", "llamafactory"):
        emitted = configs(out, trainer)
        for stage, zero in (("zero3", 3), ("zero2", 2)):
            if stage not in emitted:  # LLaMA-Factory refuses what it cannot select exactly
                continue
            path = emitted[stage]["deepspeed"]  # relative to the grown checkpoint, where the commands run
            assert path == f"training/{trainer}/{'02' if stage == 'zero3' else '03'}-{stage}.deepspeed.json"
            ds = json.loads((out / path).read_text())
            assert ds["zero_optimization"]["stage"] == zero and ds["train_micro_batch_size_per_gpu"] == "auto"
    lf = configs(out, "llamafactory")
    assert lf["sharded"]["fsdp"] == "full_shard auto_wrap" and lf["sharded"]["fsdp_config"]["version"] == 2


@pytest.mark.parametrize(
    "setting, message",
    [
        ("fdsp", "'fdsp' is not a strategy (did you mean 'fsdp'?); expected one of: ddp, fsdp, deepspeed"),
        ("{strategy: fsdp, zero_stage: 2}", "zero_stage is a DeepSpeed setting and the strategy is fsdp"),
        ("{offload: true}", "offload needs a sharded strategy; expected strategy: fsdp or deepspeed"),
        ("{strategy: deepspeed, zero_stage: 1}", "zero_stage"),
    ],
)
def test_recipe_errors(tmp_path, tiny, cli, setting, message):
    recipe = write_recipe(
        tmp_path,
        f"base_model: {tiny(layers=4)}\ninject: {{every: 2}}\noutput: {tmp_path / 'g'}\nstages:\n"
        f"  - name: a\n    trainable: [injected]\n    distributed: {setting}\n",
    )
    result = cli("validate", recipe)
    assert result.exit_code == 2 and f"{recipe}:7:" in result.stderr and ": stages[0].distributed" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    "stage, message",
    [
        (
            "lora: {r: 2, alpha: 4, targets: [o_proj, down_proj], quantize: 4}\n    distributed: fsdp",
            "fsdp shards the parameters, and lora.quantize (4-bit QLoRA) loads the quantized base on each "
            "process's GPU; expected strategy ddp, or deepspeed with zero_stage: 2",
        ),
        (
            "objective: mod\n    distributed: deepspeed",
            "deepspeed with zero_stage 3 partitions the MoD head's parameters too",
        ),
    ],
)
def test_plan_refuses_what_cannot_work(tmp_path, tiny, cli, stage, message):
    recipe = write_recipe(
        tmp_path,
        f"base_model: {tiny(layers=4)}\ninject: {{every: 2}}\noutput: {tmp_path / 'g'}\nstages:\n"
        f"  - name: a\n    trainable: [injected]\n    {stage}\n",
    )
    result = cli("plan", recipe)
    assert result.exit_code == 2 and f"stages[0].distributed: {message}" in result.stderr, result.stderr


def test_the_builtin_trainer_refuses_lora_under_zero3(tmp_path, tiny, cli):
    lora = "    lora: {r: 2, alpha: 4, targets: [q_proj, o_proj, down_proj]}\n    distributed: {strategy: deepspeed"
    out = grown(tmp_path, tiny, STAGES.replace("    distributed: {strategy: deepspeed", lora, 1))
    result = cli("emit", out, "--format", "builtin", "-o", tmp_path / "c", "--strict")
    assert result.exit_code == 2 and "stage 'zero3': LoRA with deepspeed zero_stage 3 is not supported" in result.stderr
    result = cli("emit", out, "--format", "builtin", "-o", tmp_path / "d")  # the other stages are written
    assert result.exit_code == 0 and "stage 'zero3': LoRA with deepspeed zero_stage 3 is not supported" in result.stderr
    assert configs(out, "axolotl")["zero3"]["adapter"] == "lora"  # Axolotl merges it itself
    # QLoRA set on the grown checkpoint: ZeRO-3 would shard the quantized base
    result = cli("emit", out, "-o", tmp_path / "e", "--set", "stages[1].lora.quantize=4")
    assert result.exit_code == 2 and "stages[1].distributed: deepspeed with zero_stage 3 shards" in result.stderr


def test_set_changes_the_setting_of_a_grown_checkpoint(tmp_path, tiny, cli):
    out = grown(tmp_path, tiny)
    result = cli("emit", out, "--format", "builtin", "-o", tmp_path / "c", "--set", "stages[*].distributed=ddp")
    assert result.exit_code == 0, result.stderr
    for path in sorted((tmp_path / "c").glob("0*.yaml")):
        assert not {"fsdp", "deepspeed"} & set(yaml.safe_load(path.read_text())["training_arguments"])
    result = cli("emit", out, "-o", tmp_path / "d", "--set", "stages[3].distributed={strategy: deepspeed}")
    assert result.exit_code == 0, result.stderr
    assert (
        "deepspeed" in yaml.safe_load((tmp_path / "d" / "builtin" / "04-plain.yaml").read_text())["training_arguments"]
    )


def test_axolotl_own_validation(tmp_path, tiny):
    pytest.importorskip("axolotl")
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    out = grown(tmp_path, tiny)
    emitted = configs(out, "axolotl")
    os.chdir(out)  # the deepspeed path is relative to the grown checkpoint
    for name in ("sharded", "zero2", "zero3"):
        cfg = validate_config(DictDefault(emitted[name]))
        assert (cfg.fsdp_version == 2) if name == "sharded" else cfg.deepspeed


def test_llamafactory_own_validation(tmp_path, tiny):
    pytest.importorskip("llamafactory")
    from llamafactory.hparams import get_train_args

    out = grown(tmp_path, tiny)
    emitted = configs(out, "llamafactory")
    os.chdir(out)
    _, _, training_args, _, _ = get_train_args(dict(emitted["sharded"]))
    assert training_args.fsdp_config["version"] == 2
