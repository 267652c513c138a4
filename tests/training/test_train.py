"""The built-in trainer on a tiny grown model: freezing, LoRA merge, resume, outputs, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny, write_recipe
from safetensors.torch import load_file
from tiny_text import add_char_tokenizer, write_text

from tli_recipe import compile_plan, execute_plan, load_recipe
from tli_recipe.training.train import stage_configs, train_output, train_stage

FAST = """    datasets: [{{path: {data}}}]
    max_steps: {steps}
    learning_rate: 0.01
    batch_size: 4
    sequence_length: 32
    precision: float32
    validation_fraction: 0.1
    eval_steps: 4
    save_steps: {save}
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny 8-layer Llama with a character tokenizer."""
    return add_char_tokenizer(build_tiny(tmp_path_factory.mktemp("base"), layers=8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("data") / "train.txt", 200)  # about 5 KB


def grow(tmp_path: Path, base: Path, stages: str) -> Path:
    recipe = write_recipe(
        tmp_path, f"base_model: {base}\ninject: {{every: 4}}\noutput: {tmp_path / 'grown'}\nstages:\n{stages}"
    )
    return execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def quiet(msg: str) -> None:
    pass


def test_injected_only_stage_trains_exactly_the_injected_layers(tmp_path, base, data, monkeypatch):
    import os
    import stat

    from tli_recipe.execute import output as output_module
    from tli_recipe.training import finish

    grown = grow(
        tmp_path,
        base,
        "  - name: injected-only\n    trainable: [injected]\n" + FAST.format(data=data, steps=12, save=100),
    )
    swap, being_written = output_module.swap_into_place, []

    def swapping(tmp, out, **kw):  # what a second Ctrl-C would remove at this moment
        being_written.append(set(finish.WRITING))
        return swap(tmp, out, **kw)

    monkeypatch.setattr(output_module, "swap_into_place", swapping)
    umask = os.umask(0o027)
    try:
        [out] = train_output(grown, progress=False, log=quiet)
    finally:
        os.umask(umask)
    assert [{p.parent for p in w} for w in being_written] == [{out.parent}] and not finish.WRITING
    assert all(p.name.startswith(f".{out.name}.tmp-") for p in being_written[0])
    # The output follows the umask (not mkdtemp's private 0700), as every file in it does.
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o640}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n# base_model: the hub id of") and "stage 1 of 1, 'injected-only'" in card
    assert "library_name: transformers\n" in card and "12 optimizer steps" in card and "unchanged" in card
    assert f"from `{grown.name}`" in card and str(tmp_path) not in card  # the folder's name, not its path
    assert out == tmp_path / "grown-injected-only"
    before, after = tensors(grown), tensors(out)
    trainable = set(json.loads((grown / "plan.json").read_text())["stages"][0]["parameters"])
    assert trainable and all(n.startswith(("model.layers.4.", "model.layers.9.")) for n in trainable)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        if name in trainable:
            assert not torch.equal(after[name], tensor), f"{name} did not change"
        else:
            assert after[name].numpy().tobytes() == tensor.numpy().tobytes(), f"{name} changed but is frozen"
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["trainable_parameters"] == sum(before[n].numel() for n in trainable)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    rows = list(csv.DictReader((out / "losses.csv").open()))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert rows[0]["step"] == "0" and float(rows[0]["eval_loss"]) == pytest.approx(metrics["eval_loss_before"])
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "plan.json").read_text()) == json.loads((grown / "plan.json").read_text())
    assert (out / "tokenizer.json").is_file() and (out / "training_config.yaml").is_file()
    assert not (tmp_path / "grown-injected-only.partial").exists()


def test_lora_stage_merges_and_changes_only_the_adapted_weights(tmp_path, base, data):
    from transformers import AutoModelForCausalLM

    grown = grow(
        tmp_path,
        base,
        "  - name: lora\n    trainable: [injected]\n"
        "    lora: {r: 4, alpha: 8, targets: [q_proj, o_proj, down_proj]}\n"
        + FAST.format(data=data, steps=6, save=100),
    )
    [out] = train_output(grown, progress=False, log=quiet)
    AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint: no peft needed to load it
    before, after = tensors(grown), tensors(out)
    assert sorted(before) == sorted(after)
    adapted = {
        f"model.layers.{i}.{m}.weight"
        for i in (4, 9)
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
    }
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == adapted
    assert (out / "adapter" / "adapter_config.json").is_file()
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["lora"]["layers"] == [4, 9] and metrics["global_step"] == 6


class _Interrupt:
    """A TrainerCallback that stops the process (as Ctrl-C would) after ``at`` optimizer steps."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.slow  # trains the tiny model twice
def test_interrupted_stage_resumes_to_the_same_final_step(tmp_path, base, data):
    # 4 steps, a checkpoint after each, stopped after step 3 (before its checkpoint): checkpoints 1 and 2
    grown = grow(
        tmp_path, base, "  - name: injected-only\n    trainable: [injected]\n" + FAST.format(data=data, steps=4, save=1)
    )
    [cfg] = stage_configs(grown)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, progress=False, log=quiet, callbacks=[_Interrupt(3)])
    partial = tmp_path / "grown-injected-only.partial"
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "grown-injected-only").exists()
    # What a crash while writing leaves (files of an older version, or a save cut short): half a JSON.
    for half in (partial / "initial_eval.json", partial / "checkpoint-2" / "trainer_state.json"):
        half.write_text(half.read_text()[: len(half.read_text()) // 2])
    messages = []
    out = train_stage(cfg, progress=False, log=messages.append)
    assert any("resuming from checkpoint-1" in m for m in messages)
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["resumed_from"] == "checkpoint-1"  # checkpoint-2 is incomplete
    assert metrics["eval_loss_before"] is not None  # the step-0 evaluation, done again
    steps = [int(r["step"]) for r in csv.DictReader((out / "losses.csv").open())]
    assert steps == list(range(5))
    # The same run without the interruption ends on the same step with the same weights.
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "straight")})
    straight = train_stage(cfg, progress=False, log=quiet)
    assert json.loads((straight / "training_metrics.json").read_text())["global_step"] == 4
    for name, tensor in tensors(straight).items():
        torch.testing.assert_close(tensors(out)[name], tensor, atol=1e-6, rtol=1e-5)
    assert "already trained" in "".join(_log_of(lambda log: train_stage(cfg, progress=False, log=log)))


def _log_of(call) -> list[str]:
    messages: list[str] = []
    call(messages.append)
    return messages


def test_train_command_errors(tmp_path, base, data, cli):
    grown = grow(
        tmp_path,
        base,
        "  - name: one\n    trainable: [injected]\n    max_steps: 2\n    precision: float32\n"
        "  - name: two\n    trainable: [all]\n    lora: {r: 2, alpha: 4, targets: [o_proj, down_proj], quantize: 4}\n",
    )
    result = cli("train", grown)
    assert result.exit_code == 2 and "error: stage 'one' has no training data: pass --data FILE" in result.stderr
    result = cli("train", grown, "--stage", "two", "--data", data)
    assert result.exit_code == 2 and "holds no config.json; expected the previous stage's output" in result.stderr
    result = cli("train", grown, "--stage", "tw", "--data", data)
    assert result.exit_code == 2 and "(did you mean 'two'?)" in result.stderr
    result = cli("train", grown, "--stage", "two", "--data", data, "--into", tmp_path / "stages")
    assert result.exit_code == 2
    result = cli("train", "--config", grown / "training" / "builtin" / "02-two.yaml", "--data", data)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    result = cli("train", grown, "--print-launch", "--data", data)
    assert result.exit_code == 0 and result.stdout.startswith(
        "accelerate launch --num_processes 1 -m tli_recipe train "
    )
    result = cli("train", grown, "--data", tmp_path / "missing.txt")
    assert result.exit_code == 2 and "missing.txt: no such file" in result.stderr


def test_train_from_an_emitted_config(tmp_path, base, data, cli):
    grown = grow(
        tmp_path, base, "  - name: new\n    trainable: [injected]\n" + FAST.format(data=data, steps=3, save=100)
    )
    # The configs' paths are relative to the checkpoint's folder: they still work once it has moved.
    moved = tmp_path / "elsewhere" / "grown"
    moved.parent.mkdir()
    grown.rename(moved)
    config = moved / "training" / "builtin" / "01-new.yaml"
    assert (
        "/" not in yaml.safe_load(config.read_text())["model"] and yaml.safe_load(config.read_text())["root"] == "../.."
    )
    result = cli("train", "--config", config, "--into", tmp_path / "stages", "--no-progress", "--data", data)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "stages" / "new")
    assert json.loads((tmp_path / "stages" / "new" / "training_metrics.json").read_text())["global_step"] == 3


@pytest.mark.slow
def test_train_flags_change_the_stage_settings(tmp_path, base, data, cli):
    grown = grow(
        tmp_path,
        base,
        "  - name: new\n    trainable: [injected]\n    epochs: 3\n"
        + FAST.format(data=data, steps=50, save=100).replace("    max_steps: 50\n", ""),
    )
    result = cli("train", grown, "--report-to", "tensorboard")
    assert (
        result.exit_code == 2
        and "--report-to tensorboard: tensorboard is not installed; pip install tensorboard" in result.stderr
    )
    result = cli("train", grown, "--set", "inject.every=2")
    assert result.exit_code == 2 and "only the stages' training settings can change" in result.stderr
    result = cli("train", grown, "--print-launch", "--max-steps", "2", "--set", "stages[*].batch_size=2")
    assert "--set 'stages[*].batch_size=2' --max-steps 2" in result.stdout
    result = cli(
        "train",
        grown,
        "--no-progress",
        "--max-steps",
        "2",
        "--learning-rate",
        "0.003",
        "--set",
        "stages[*].batch_size=2",
    )
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "grown-new"
    metrics = json.loads((out / "training_metrics.json").read_text())
    args = yaml.safe_load((out / "training_config.yaml").read_text())["training_arguments"]
    assert metrics["global_step"] == 2 and "num_train_epochs" not in args
    assert (args["learning_rate"], args["per_device_train_batch_size"], args["max_steps"]) == (0.003, 2, 2)


@pytest.mark.slow
def test_chat_data_trains_and_needs_a_chat_template(tmp_path, base, cli):
    grown = grow(
        tmp_path,
        base,
        "  - name: new\n    trainable: [injected]\n"
        + FAST.format(data="x", steps=2, save=100).replace("    datasets: [{path: x}]\n", ""),
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"question {i} " * 3},
                        {"role": "assistant", "content": f"answer {i} " * 3},
                    ]
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    result = cli("train", grown, "--data", chat, "--no-progress")
    assert result.exit_code == 2 and "chat.jsonl:1: a chat" in result.stderr and "has none" in result.stderr
    config = json.loads((grown / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    (grown / "tokenizer_config.json").write_text(json.dumps(config))
    result = cli("train", grown, "--data", chat, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "grown-new" / "training_metrics.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_verify_on_a_trained_stage_says_what_verify_checks(tmp_path, base, data, cli):
    grown = grow(
        tmp_path, base, "  - name: new\n    trainable: [injected]\n" + FAST.format(data=data, steps=1, save=100)
    )
    [out] = train_output(grown, progress=False, log=quiet)
    result = cli("verify", out)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "the output of a training stage (tli-recipe train), not of `run`" in result.stderr
    assert f"`tli-recipe verify {grown}`" in result.stderr and "use_cache" in result.stderr


def test_plan_counts_lora_parameters_as_peft_does(tmp_path, base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tli_recipe.execute.verify import load_plan

    grown = grow(
        tmp_path,
        base,
        "  - name: lora\n    trainable: [{layers: [2, 7]}]\n"
        "    lora: {r: 4, alpha: 8, targets: [q_proj, v_proj, down_proj]}\n",
    )
    stage = load_plan(grown).stages[0]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(grown),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=list(range(2, 7)),
            layers_pattern="layers",
        ),
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert stage.trainable_parameters == trainable > 0
    assert stage.trainable_parameters < sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) // 10


def test_every_progress_bar_names_its_stage_and_phase(tmp_path, base, data, capfd):
    grown = grow(
        tmp_path, base, "  - name: new\n    trainable: [injected]\n" + FAST.format(data=data, steps=4, save=100)
    )
    train_output(grown, progress=True, log=quiet)
    err = capfd.readouterr().err
    for label in ("stage 'new': validation before training", "stage 'new': training", "stage 'new': final validation"):
        assert label in err, label
    assert err.index("validation before training") < err.index("stage 'new': training") < err.index("final validation")
    # Loss, learning rate and tokens/s on the bar; the Trainer's raw log dicts nowhere.
    assert "loss=" in err and "lr=" in err and "tokens/s=" in err and "validation=" in err
    assert "{'loss'" not in err and "'learning_rate'" not in err


def test_without_progress_no_raw_log_dicts_are_printed(tmp_path, base, data, capfd):
    grown = grow(
        tmp_path, base, "  - name: new\n    trainable: [injected]\n" + FAST.format(data=data, steps=2, save=100)
    )
    messages = []
    train_output(grown, progress=False, log=messages.append)
    captured = capfd.readouterr()
    assert "'loss'" not in captured.out + captured.err and "learning_rate" not in captured.out + captured.err
    assert [m for m in messages if " took " in m] == [m for m in messages if m.startswith("stage 'new': step 1 took ")]
    assert len([m for m in messages if " took " in m]) == 1


@pytest.mark.parametrize("missing", [("peft",), ("accelerate",), ("peft", "accelerate")])
def test_train_without_the_train_extra_says_how_to_install_it(tmp_path, cli, monkeypatch, missing):
    import sys

    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as when not installed
    result = cli("train", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: training needs the train extra (") and result.stderr.count("\n") == 1
    assert all(name in result.stderr.split("(")[1] for name in missing)  # peft also fails without accelerate
    assert result.stderr.endswith(
        "not installed); expected `pip install 'tli-recipe[train]'` (peft, accelerate>=1.1, matplotlib)\n"
    )


@pytest.mark.parametrize(
    ("precision", "said"),
    [
        ("", "stage 'p': precision auto -> float32 (training on the CPU; bfloat16 is many times slower"),
        ("    precision: bfloat16\n", "stage 'p': warning: precision bfloat16 on the CPU: bfloat16 is many times"),
    ],
    ids=["default-auto", "explicit-bfloat16"],
)
def test_precision_auto_trains_in_float32_on_a_cpu_and_says_so(tmp_path, base, data, precision, said, monkeypatch):
    import transformers

    stage = FAST.format(data=data, steps=1, save=100).replace("    precision: float32\n", precision)
    grown = grow(tmp_path, base, "  - name: p\n    trainable: [injected]\n" + stage)
    seen = []
    real = transformers.Trainer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["args"].bf16)
        real(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "__init__", spy)
    messages: list[str] = []
    train_output(grown, progress=False, log=messages.append, device="cpu")
    assert any(m.startswith(said) for m in messages), messages
    assert seen == [bool(precision)]  # bf16 off unless the stage says bfloat16 (which keeps working on a CPU)


def test_choose_precision_on_each_device(tmp_path, base, data):
    from tli_recipe.training.train import choose_precision

    grown = grow(tmp_path, base, "  - name: p\n    trainable: [injected]\n")  # every setting at its default
    [cfg] = stage_configs(grown, data=[data])
    assert cfg.precision == "auto" and "bf16" not in cfg.training_arguments
    assert choose_precision(cfg, on_cpu=True) == (
        {"bf16": False},
        "precision auto -> float32 (training on the CPU; bfloat16 is many times slower than float32 on a CPU)",
    )
    assert choose_precision(cfg, False, ("NVIDIA H100", True)) == (
        {"bf16": True},
        "precision auto -> bfloat16 (the GPU, NVIDIA H100, has bfloat16)",
    )
    assert choose_precision(cfg, False, ("Tesla T4", False))[0] == {"bf16": False}
    # A config whose training_arguments set bf16 (an edited --config file) is not second-guessed.
    edited = cfg.model_copy(update={"training_arguments": {**cfg.training_arguments, "bf16": True}})
    assert choose_precision(edited, False, ("Tesla T4", False)) == ({}, "precision bfloat16 (the stage's setting)")
