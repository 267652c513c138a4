"""Emitted training configs: exact parameter selection for Axolotl, LLaMA-Factory and the built-in trainer.

The selection checks use each trainer's matching rule written out here, independently of
tli_recipe.emit, on the real parameter names of transformers models. When Axolotl or
LLaMA-Factory is installed, the last tests also run their own validation and freezing code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from tiny_text import write_text

from tli_recipe.execute.verify import load_plan

STAGES = """stages:
  - name: injected-only
    trainable: [injected]
    precision: float32
  - name: layer-one
    trainable: [{layers: [1, 2]}]
    precision: float32
  - name: top-and-head
    trainable: [{layers: [10, 12]}, head]
    precision: float32
  - name: embeddings
    trainable: [embeddings, {layers: [0, 1]}]
    precision: float32
  - name: lora
    trainable: [all]
    lora: {r: 4, alpha: 8, targets: [q_proj, o_proj, down_proj]}
    precision: float32
"""

# The same stages with those LLaMA-Factory expresses first: a stage after a refused one is refused too.
_PARTS = STAGES.split("  - name: ")
STAGES_LF = "  - name: ".join([_PARTS[0], _PARTS[1], _PARTS[4], _PARTS[5], _PARTS[2], _PARTS[3]])


def grown(tmp_path, tiny, inject: str, stages: str = STAGES, layers: int = 12, name: str = "grown", cli=None) -> Path:
    base = tiny(layers=layers)
    stages = (
        stages
        if "inject" in inject
        else stages.replace("  - name: injected-only\n    trainable: [injected]\n    precision: float32\n", "")
    )
    recipe = write_recipe(
        tmp_path, f"base_model: {base}\n{inject}\noutput: {tmp_path / name}\n{stages}", f"{name}.yaml"
    )
    from tli_recipe import compile_plan, execute_plan, load_recipe

    return execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)


def real_names(folder: Path) -> list[str]:
    """The parameter names transformers gives the model (what Axolotl and LLaMA-Factory match against)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return [n for n, _ in model.named_parameters()]


def axolotl_rule(patterns: list[str], name: str) -> bool:
    """Axolotl's documented rule: every '.' not followed by '+' is literal; re.match (anchored at the start)."""
    return any(re.match(re.sub(r"\.(?!\+)", "\\\\.", p), name) for p in patterns)


def emitted(folder: Path, trainer: str, configs: str = "training") -> dict[str, dict]:
    out = {}
    for path in sorted((folder / configs / trainer).glob("[0-9][0-9]-*.yaml")):
        if not path.name.endswith(".merge.yaml"):
            out[path.stem.split("-", 1)[1]] = yaml.safe_load(path.read_text())
    return out


# --- Axolotl -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inject", ["", "inject: {every: 4}", "inject: {every: 1}"], ids=["12-layers", "k4-15-layers", "k1-24-layers"]
)
def test_axolotl_patterns_select_exactly_the_stage(tmp_path, tiny, inject):
    out = grown(tmp_path, tiny, inject)
    plan = load_plan(out)
    names = real_names(out)
    assert len(plan.layers) in (12, 15, 24) and any(".layers.1." in n for n in names)
    assert any(".layers.10." in n for n in names) and any(".layers.11." in n for n in names)
    configs = emitted(out, "axolotl")
    assert set(configs) == {s.name for s in plan.stages}
    for stage in plan.stages:
        cfg = configs[stage.name]
        assert set(stage.parameters) <= set(names), stage.name
        if stage.lora is not None:
            assert "unfrozen_parameters" not in cfg and cfg["adapter"] == "lora"
            assert (
                cfg["lora_target_modules"] == ["q_proj", "o_proj", "down_proj"]
                and "peft_layers_to_transform" not in cfg
            )
            continue
        selected = {n for n in names if axolotl_rule(cfg["unfrozen_parameters"], n)}
        assert selected == set(stage.parameters), stage.name
        if stage.trainable_layers and stage.trainable_groups == []:
            assert cfg["unfrozen_parameters"] == [f"^model.layers.({'|'.join(map(str, stage.trainable_layers))})."]


def test_the_naive_axolotl_pattern_is_the_trap_it_looks_like(tmp_path, tiny):
    """The hand-written `model.layers.1.*` also unfreezes layers 10-19; the emitted pattern does not."""
    out = grown(tmp_path, tiny, "inject: {every: 1}")
    names = real_names(out)
    naive = {n for n in names if axolotl_rule(["model.layers.1.*"], n)}
    assert {n.split(".")[2] for n in naive} == {"1", *(str(i) for i in range(10, 20))}
    emitted_layer_one = emitted(out, "axolotl")["layer-one"]["unfrozen_parameters"]
    assert emitted_layer_one == ["^model.layers.(1)."]
    assert {n.split(".")[2] for n in names if axolotl_rule(emitted_layer_one, n)} == {"1"}


def test_axolotl_config_keys(tmp_path, tiny):
    out = grown(
        tmp_path,
        tiny,
        "inject: {every: 4}",
        stages="""stages:
  - name: injected-only
    trainable: [injected]
    datasets: [{path: data.jsonl}]
    max_steps: 100
    warmup_steps: 10
    scheduler: constant
    gradient_checkpointing: true
  - name: qlora
    trainable: [injected]
    lora: {r: 8, alpha: 16, targets: [o_proj, down_proj], quantize: 4}
    epochs: 2
""",
    )
    first, second = emitted(out, "axolotl").values()
    # Paths relative to the grown checkpoint's folder: the configs move with it.
    assert first["base_model"] == "." and first["output_dir"] == "../grown-injected-only-axolotl"
    assert first["datasets"] == [{"path": "../data.jsonl", "ds_type": "json", "type": "completion", "field": "text"}]
    assert first["lr_scheduler"] == "constant_with_warmup" and first["max_steps"] == 100
    assert first["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert first["bf16"] == "auto" and first["fp16"] is False  # bfloat16 where the GPU has it, float32 elsewhere
    assert second["base_model"] == first["output_dir"]
    assert second["adapter"] == "qlora" and second["load_in_4bit"] is True and second["num_epochs"] == 2
    assert second["peft_layers_to_transform"] == [4, 9, 14] and second["lora_alpha"] == 16


def test_precision_runs_anywhere_and_each_header_says_how_to_turn_it_off(tmp_path, tiny):
    out = grown(
        tmp_path,
        tiny,
        "inject: {every: 4}",
        stages="""stages:
  - name: auto
    trainable: [injected]
  - name: bf
    trainable: [injected]
    precision: bfloat16
  - name: half
    trainable: [injected]
    precision: float16
  - name: lora
    trainable: [all]
    lora: {r: 4, alpha: 8, targets: [o_proj, down_proj]}
    precision: float32
""",
    )
    ax, lf, trl = (emitted(out, t) for t in ("axolotl", "llamafactory", "builtin"))
    assert (ax["auto"]["bf16"], ax["auto"]["fp16"]) == ("auto", False)  # the default: Axolotl's own auto
    assert (ax["bf"]["bf16"], ax["bf"]["fp16"]) == ("auto", False)
    assert (ax["half"]["bf16"], ax["half"]["fp16"]) == (False, True)
    assert (ax["lora"]["bf16"], ax["lora"]["fp16"]) == (False, False)
    # LLaMA-Factory's bf16 is transformers' boolean (no auto): true, with the way out in the header.
    assert lf["auto"]["bf16"] is True and lf["auto"]["fp16"] is False
    assert lf["bf"]["bf16"] is True and lf["bf"]["fp16"] is False and trl["bf"]["training_arguments"]["bf16"] is True
    # The built-in trainer chooses when it starts: no bf16 or fp16 key, precision: auto.
    auto_args = trl["auto"]["training_arguments"]
    assert trl["auto"]["precision"] == "auto" and "bf16" not in auto_args and "fp16" not in auto_args
    assert trl["bf"]["precision"] is None
    # Axolotl's auto-enabled fused LoRA kernels are Triton (CUDA): off, so the config also runs on a CPU.
    assert {k: ax["lora"][k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")} == dict.fromkeys(
        ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"), False
    )
    assert not any("kernel" in k for k in ax["bf"])
    head = {
        t: {p.name: p.read_text().split("\n---", 1)[0] for p in (out / "training" / t).glob("0*.yaml")}
        for t in ("axolotl", "llamafactory", "builtin")
    }
    header = lambda t, f: " ".join(line for line in head[t][f].splitlines() if line.startswith("#"))  # noqa: E731
    assert "Precision off: bf16: false" in header("axolotl", "01-auto.yaml")
    assert "Precision off: bf16: false" in header("axolotl", "02-bf.yaml")
    assert "Precision off (float32): fp16: false" in header("axolotl", "03-half.yaml")
    assert "needs a CUDA GPU" in header("axolotl", "04-lora.yaml") and "set them to true" in header(
        "axolotl", "04-lora.yaml"
    )
    assert "bf16=false" in header("llamafactory", "01-auto.yaml") and "no auto" in header(
        "llamafactory", "01-auto.yaml"
    )
    assert "On a CPU or a" in header("llamafactory", "01-auto.yaml")
    assert "bf16=false" in header("llamafactory", "02-bf.yaml") and "no auto" in header("llamafactory", "02-bf.yaml")
    assert "float32 elsewhere" in header("builtin", "01-auto.yaml")
    assert "many times slower than float32" in header("builtin", "02-bf.yaml")
    assert "precision=float32" in header("builtin", "02-bf.yaml")
    # No header recommends bfloat16 on a CPU (the old built-in one said it "also runs bfloat16 on a CPU").
    for trainer, files in head.items():
        for name in files:
            assert "bfloat16 on a CPU" not in header(trainer, name), (trainer, name)


# --- LLaMA-Factory ----------------------------------------------------------------------------------


def llamafactory_freeze(cfg: dict, names: list[str], num_layers: int) -> set[str]:
    """LLaMA-Factory's freeze rule (model/adapter.py _setup_freeze_tuning), written out."""
    n = cfg["freeze_trainable_layers"]
    if cfg.get("use_llama_pro"):
        stride = num_layers // n
        ids = range(stride - 1, num_layers + stride - 1, stride)
    elif n > 0:
        ids = range(max(0, num_layers - n), num_layers)
    else:
        ids = range(min(-n, num_layers))
    keys = [f".{i}." for i in ids] + (cfg.get("freeze_extra_modules") or "").split(",") * bool(
        cfg.get("freeze_extra_modules")
    )
    return {name for name in names if any(k in name for k in keys)}


def test_llamafactory_expresses_evenly_spaced_injected_layers(tmp_path, tiny):
    out = grown(
        tmp_path, tiny, "inject: {every: 4}", stages=STAGES_LF
    )  # 15 layers, injected 4, 9, 14 = range(4, 15, 5)
    plan = load_plan(out)
    configs = emitted(out, "llamafactory")
    cfg = configs["injected-only"]
    assert cfg["finetuning_type"] == "freeze" and cfg["use_llama_pro"] is True and cfg["freeze_trainable_layers"] == 3
    names = real_names(out)
    assert llamafactory_freeze(cfg, names, 15) == set(plan.stages[0].parameters)
    assert (
        configs["embeddings"]["freeze_trainable_layers"] == -1
        and configs["embeddings"]["freeze_extra_modules"] == "embed_tokens"
    )
    assert configs["lora"]["finetuning_type"] == "lora" and configs["lora"]["lora_target"] == "q_proj,o_proj,down_proj"
    assert (out / "training" / "llamafactory" / "03-lora.merge.yaml").is_file()


def test_llamafactory_refuses_what_it_cannot_express(tmp_path, tiny, cli):
    # 10 layers, K = 4: 12 output layers, injected 4 and 9; use_llama_pro would train 5 and 11.
    out = grown(
        tmp_path,
        tiny,
        "inject: {every: 4}",
        layers=10,
        stages="""stages:
  - name: injected-only
    trainable: [injected]
  - name: top-and-head
    trainable: [{layers: [8, 12]}, head]
  - name: lora-injected
    trainable: [injected]
    lora: {r: 4, alpha: 8, targets: [o_proj, down_proj]}
  - name: half-alpha
    trainable: [all]
    lora: {r: 4, alpha: 8.5, targets: [o_proj, down_proj]}
""",
    )
    folder = out / "training" / "llamafactory"
    assert not list(folder.glob("*.yaml"))
    reasons = {p.name: p.read_text() for p in folder.glob("*.refused.txt")}
    assert set(reasons) == {
        "01-injected-only.refused.txt",
        "02-top-and-head.refused.txt",
        "03-lora-injected.refused.txt",
        "04-half-alpha.refused.txt",
    }
    assert (
        "output layers [4, 9] (the injected layers) are neither the first N, the last N, nor LLaMA Pro's"
        in reasons["01-injected-only.refused.txt"]
    )
    assert "model.layers.0.input_layernorm.weight" in reasons["02-top-and-head.refused.txt"]
    assert "evenly spaced" in reasons["03-lora-injected.refused.txt"]
    assert "8.5 is not an integer" in reasons["04-half-alpha.refused.txt"]
    result = cli("emit", out, "--format", "llamafactory", "--stage", "injected-only", "-o", tmp_path / "again")
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # the only config asked for was refused
    assert result.stderr.startswith("warning: llamafactory: stage 'injected-only': output layers [4, 9]")
    assert "no config is written" in result.stderr and not list((tmp_path / "again").rglob("*.yaml"))
    assert "error: nothing could be written: each of the 1 stage configs asked for was refused" in result.stderr
    # Some written, some refused: the written ones are listed, each refusal is a warning, exit 0 (as run's notes).
    result = cli("emit", out, "--stage", "injected-only", "-o", tmp_path / "mixed")
    assert result.exit_code == 0, result.stderr
    assert f"wrote {tmp_path / 'mixed' / 'axolotl' / '01-injected-only.yaml'}" in result.stdout
    assert result.stderr.startswith("warning: llamafactory: stage 'injected-only': output layers [4, 9]")
    assert "error" not in result.stderr
    strict = cli("emit", out, "--stage", "injected-only", "-o", tmp_path / "strict", "--strict")
    assert strict.exit_code == 2
    assert "error: 1 of 3 stage configs were refused (reasons above) and --strict is given" in strict.stderr
    # The other trainers express all of it.
    assert len(emitted(out, "axolotl")) == 3 and (out / "training" / "axolotl" / "04-half-alpha.refused.txt").is_file()
    assert len(emitted(out, "builtin")) == 4


# --- the zero-initialised projections ----------------------------------------------------------------


ALLOW = "stages[0].lora.allow_frozen_injected=true"


def test_lora_leaving_out_zeroed_projections_is_refused_unless_intended(tmp_path, tiny, cli):
    stages = """stages:
  - name: lora
    trainable: [all]
    lora: {r: 4, alpha: 8, targets: [q_proj, v_proj]%s}
"""
    out = grown(tmp_path, tiny, "inject: {every: 4}", stages=stages % "", layers=8)
    for trainer in ("axolotl", "llamafactory", "builtin"):
        text = (out / "training" / trainer / "01-lora.refused.txt").read_text()
        assert "leave out down_proj, o_proj, which are zero in the injected layers [4, 9]" in text
        assert "allow_frozen_injected: true" in text
    result = cli("emit", out, "--format", "builtin", "-o", tmp_path / "cfg")
    assert result.exit_code == 2 and "never move" in result.stderr
    result = cli("train", out, "--data", write_text(tmp_path / "t.txt", 10))
    assert result.exit_code == 2 and "never move" in result.stderr and "Traceback" not in result.stderr
    # judged once by compile_plan and stored in plan.json; emit reads it and the stage's allow flag
    lora = load_plan(out).stages[0].lora
    assert (lora.frozen_injected, lora.frozen_by) == ([4, 9], ["down_proj", "o_proj"])
    result = cli("emit", out, "--format", "builtin", "-o", tmp_path / "allowed", "--set", ALLOW)
    assert result.exit_code == 0 and (tmp_path / "allowed" / "builtin" / "01-lora.yaml").is_file(), result.stderr
    plan_json = out / "plan.json"
    stored = json.loads(plan_json.read_text())
    stored["stages"][0]["lora"]["frozen_injected"] = []
    plan_json.write_text(json.dumps(stored))
    assert load_plan(out).stages[0].lora.frozen_injected == []
    result = cli("emit", out, "--format", "builtin", "-o", tmp_path / "stored")
    assert result.exit_code == 0 and (tmp_path / "stored" / "builtin" / "01-lora.yaml").is_file(), result.stderr
    meant = grown(
        tmp_path, tiny, "inject: {every: 4}", stages=stages % ", allow_frozen_injected: true", layers=8, name="meant"
    )
    assert not list((meant / "training").rglob("*.refused.txt")) and len(emitted(meant, "builtin")) == 1
    assert not [w for w in load_plan(meant).warnings if "never move" in w]


# --- the built-in trainer's config; the command ----------------------------------------------------------


def test_builtin_config_is_valid_training_arguments(tmp_path, tiny):
    from transformers import TrainingArguments

    out = grown(tmp_path, tiny, "inject: {every: 4}")
    plan = load_plan(out)
    for stage, cfg in zip(plan.stages, emitted(out, "builtin").values()):
        TrainingArguments(output_dir=str(tmp_path / "x"), **cfg["training_arguments"])
        assert cfg["trainable_parameters"] == stage.parameters
        listed = (
            out / "training" / "builtin" / f"{plan.stages.index(stage) + 1:02d}-{stage.name}.parameters.txt"
        ).read_text()
        assert listed.split() == stage.parameters
    lora = emitted(out, "builtin")["lora"]["lora"]
    assert (
        lora["targets"] == ["q_proj", "o_proj", "down_proj"]
        and lora["all_layers"]
        and lora["layers_pattern"] == "layers"
    )


def test_emit_command(tmp_path, tiny, cli):
    base = tiny(layers=8)
    recipe = write_recipe(
        tmp_path,
        f"base_model: {base}\ninject: {{every: 4}}\noutput: {tmp_path / 'm'}\n"
        "stages:\n  - name: new\n    trainable: [injected]\n",
    )
    result = cli("emit", recipe)
    assert result.exit_code == 2 and "needs --output DIR" in result.stderr
    data = write_text(tmp_path / "d.txt", 5)
    result = cli("emit", recipe, "-o", tmp_path / "cfg", "--format", "axolotl", "--data", data)
    assert result.exit_code == 0, result.stderr
    cfg = yaml.safe_load((tmp_path / "cfg" / "axolotl" / "01-new.yaml").read_text())
    assert cfg["datasets"][0]["path"] == "../d.txt" and cfg["base_model"] == "."  # relative to the checkpoint, m/
    assert not (tmp_path / "cfg" / "builtin").exists()
    result = cli("emit", recipe, "-o", tmp_path / "cfg", "--stage", "nw")
    assert result.exit_code == 2 and "--stage nw: no such stage (did you mean 'new'?)" in result.stderr
    assert cli("run", recipe, "--no-progress").exit_code == 0
    assert (tmp_path / "m" / "training" / "builtin" / "01-new.yaml").is_file()
    readme = (tmp_path / "m" / "training" / "axolotl" / "README.txt").read_text()
    assert "axolotl train" in readme and "name no datasets" in readme


def test_chat_and_instruction_data_get_the_trainers_own_formats(tmp_path, tiny, cli):
    """The built-in trainer renders chats with the chat template and trains on every token; Axolotl is told
    the same (chat_template with every role trained, alpaca with train_on_inputs); LLaMA-Factory's pt stage
    reads plain text only, so it refuses with the reason."""
    import json as _json

    chat, instruction = tmp_path / "chat.jsonl", tmp_path / "inst.jsonl"
    chat.write_text(
        _json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    instruction.write_text(_json.dumps({"instruction": "add", "input": "1 2", "output": "3"}) + "\n")
    recipe = write_recipe(
        tmp_path,
        f"base_model: {tiny(layers=8)}\ninject: {{every: 4}}\noutput: {tmp_path / 'm'}\n"
        "stages:\n  - name: new\n    trainable: [injected]\n",
    )
    for data, expected in (
        (
            chat,
            {"type": "chat_template", "field_messages": "messages", "roles_to_train": ["system", "user", "assistant"]},
        ),
        (instruction, {"type": "alpaca"}),
    ):
        out = tmp_path / f"cfg-{data.stem}"
        result = cli("emit", recipe, "-o", out, "--data", data)
        assert result.exit_code == 0 and "warning: llamafactory: stage 'new'" in result.stderr  # a stage was refused
        cfg = yaml.safe_load((out / "axolotl" / "01-new.yaml").read_text())
        assert expected.items() <= cfg["datasets"][0].items()
        assert cfg.get("train_on_inputs") is (True if data == instruction else None)
        refused = (out / "llamafactory" / "01-new.refused.txt").read_text()
        assert f"{data.name} holds {'chat' if data == chat else 'instruction'} records" in refused
        assert (out / "builtin" / "01-new.yaml").is_file()


def test_recipe_rejects_steps_and_epochs_together(tmp_path, tiny, cli):
    recipe = write_recipe(
        tmp_path,
        f"base_model: {tiny(layers=8)}\nstages:\n  - name: a\n    trainable: [all]\n    max_steps: 10\n    epochs: 2\n",
    )
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert result.stderr.endswith(
        ":6:13: stages[0].epochs: both max_steps (10) and epochs (2) are given; expected one of them\n"
    )


# --- the trainers' own code, when installed ------------------------------------------------------------


def _external_case(tmp_path, tiny):
    data = write_text(tmp_path / "train.txt", 20)
    out = grown(
        tmp_path,
        tiny,
        "inject: {every: 4}",
        stages=STAGES_LF.replace("precision: float32", f"precision: float32\n    datasets: [{{path: {data}}}]"),
    )
    return out, load_plan(out)


def test_axolotl_own_validation_and_freezing(tmp_path, tiny):
    pytest.importorskip("axolotl")
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.freeze import freeze_layers_except
    from transformers import AutoModelForCausalLM

    out, plan = _external_case(tmp_path, tiny)
    configs = emitted(out, "axolotl")
    for stage in plan.stages:
        validate_config(DictDefault(configs[stage.name]))
        if stage.lora is None:
            model = AutoModelForCausalLM.from_pretrained(out)
            freeze_layers_except(model, configs[stage.name]["unfrozen_parameters"])
            assert {n for n, p in model.named_parameters() if p.requires_grad} == set(stage.parameters), stage.name


def test_llamafactory_own_validation_and_freezing(tmp_path, tiny):
    pytest.importorskip("llamafactory")
    from llamafactory.hparams import get_train_args
    from llamafactory.model.adapter import init_adapter
    from transformers import AutoModelForCausalLM

    out, plan = _external_case(tmp_path, tiny)
    configs = emitted(out, "llamafactory")
    assert set(configs) == {"injected-only", "embeddings", "lora"}  # layer-one, top-and-head: refused
    for stage in plan.stages:
        if stage.name not in configs:
            continue
        model_args, _, _, finetuning_args, _ = get_train_args(dict(configs[stage.name]))
        model = AutoModelForCausalLM.from_pretrained(out)
        model = init_adapter(model.config, model, model_args, finetuning_args, is_trainable=True)
        if stage.lora is None:
            assert {n for n, p in model.named_parameters() if p.requires_grad} == set(stage.parameters), stage.name
        else:
            adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
            assert adapted == {p.removesuffix(".weight") for p in stage.parameters}


def test_emit_set_changes_stage_settings_of_a_grown_checkpoint(tmp_path, tiny, cli):
    out = grown(
        tmp_path,
        tiny,
        "inject: {every: 4}",
        stages="""stages:
  - name: one
    trainable: [injected]
    epochs: 2
  - name: two
    trainable: [all]
    lora: {r: 4, alpha: 8, targets: [o_proj, down_proj]}
""",
    )
    result = cli(
        "emit",
        out,
        "-o",
        tmp_path / "cfg",
        "--set",
        "stages[*].precision=float32",
        "--set",
        "stages[1].lora.r=16",
        "--set",
        "stages[*].max_steps=7",
        "--set",
        "stages[*].epochs=null",
    )
    assert result.exit_code == 0, result.stderr
    ax, trl = emitted(tmp_path, "axolotl", "cfg"), emitted(tmp_path, "builtin", "cfg")
    assert [(c["bf16"], c["fp16"], c["max_steps"]) for c in ax.values()] == [(False, False, 7), (False, False, 7)]
    assert ax["two"]["lora_r"] == 16 and trl["two"]["lora"]["r"] == 16 and "num_epochs" not in ax["one"]
    assert not any(t["training_arguments"].get("bf16") for t in trl.values())
    for bad, why in (
        (["--set", "inject.every=2"], "only the stages' training settings can change there"),
        (["--set", "stages[0].trainable=[all]"], "trainable decides which parameters train"),
        (["--set", "stages[1].lora.targets=[q_proj]"], "lora.targets decides which parameters train"),
        (["--set", "stages[*].precision=fp8"], "--set stages[*].precision=fp8: stages[0].precision"),
        (["--set", "stages[0].max_steps=3"], "both max_steps (3) and epochs (2) are given"),
    ):
        result = cli("emit", out, "-o", tmp_path / "bad", *bad)
        assert result.exit_code == 2 and why in result.stderr and "Traceback" not in result.stderr, (bad, result.stderr)


def test_every_path_is_relative_to_the_checkpoint_folder(tmp_path, tiny, cli):
    import json

    (tmp_path / "data").mkdir()
    data = write_text(tmp_path / "data" / "train.txt", 5)
    out = grown(
        tmp_path,
        tiny,
        "inject: {every: 4}",
        stages=STAGES.replace("precision: float32", f"precision: float32\n    datasets: [{{path: {data}}}]"),
    )
    for trainer in ("axolotl", "llamafactory", "builtin"):
        for path in (out / "training" / trainer).glob("0*.yaml"):
            text = path.read_text()
            assert str(tmp_path) not in text, path  # no absolute path, in the values or the comments
            assert "relative to the grown checkpoint's folder" in text
        assert str(tmp_path) not in (out / "training" / trainer / "README.txt").read_text()
    ax, lf, trl = (emitted(out, t) for t in ("axolotl", "llamafactory", "builtin"))
    assert ax["layer-one"]["datasets"][0]["path"] == "../data/train.txt"
    assert (out / ax["injected-only"]["base_model"] / "config.json").is_file()
    assert ax["layer-one"]["base_model"] == "../grown-injected-only-axolotl"
    assert (out / ax["lora"]["output_dir"]).resolve() == (tmp_path / "grown-lora-axolotl").resolve()
    # LLaMA-Factory joins dataset_info.json's file_name to dataset_dir.
    cfg = lf["injected-only"]
    info = json.loads((out / cfg["dataset_dir"] / "dataset_info.json").read_text())
    assert (out / cfg["dataset_dir"] / info[cfg["dataset"]]["file_name"]).resolve() == data.resolve()
    assert trl["lora"]["root"] == "../.." and trl["lora"]["model"] == "../grown-embeddings"
    from tli_recipe.training.train import load_stage_config

    loaded = load_stage_config(out / "training" / "builtin" / "05-lora.yaml")
    assert Path(loaded.model) == (tmp_path / "grown-embeddings").resolve() and loaded.root is None
    assert Path(loaded.datasets[0].path) == data.resolve() and Path(loaded.plan) == (out / "plan.json").resolve()


def test_a_stage_whose_input_no_config_produces_is_refused(tmp_path, tiny, cli):
    # 10 layers, K = 4: LLaMA-Factory cannot select the injected layers 4 and 9, so stage 1 is refused; stage 2
    # (all weights) it could express, but it would start from a folder nothing writes.
    stages = "stages:\n  - name: new\n    trainable: [injected]\n  - name: all\n    trainable: [all]\n"
    out = grown(tmp_path, tiny, "inject: {every: 4}", layers=10, stages=stages)
    folder = out / "training" / "llamafactory"
    assert sorted(p.name for p in folder.iterdir()) == ["01-new.refused.txt", "02-all.refused.txt", "README.txt"]
    why = (folder / "02-all.refused.txt").read_text()
    assert "starts from ../grown-new-llamafactory, the output of stage 1 'new', which no LLaMA-Factory config" in why
    assert "01-new.refused.txt" in why
    assert set(emitted(out, "axolotl")) == {"new", "all"}  # Axolotl expresses stage 1, so stage 2 is written there
    # Emitting stage 2 alone still knows that stage 1 is refused.
    result = cli("emit", out, "--format", "llamafactory", "--stage", "all", "-o", tmp_path / "two")
    assert result.exit_code == 2 and "no LLaMA-Factory config produces" in result.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "llamafactory").iterdir()) == ["02-all.refused.txt", "README.txt"]
