"""The built-in trainer on a tiny grown model: freezing, LoRA merge, resume, outputs, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
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
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 4}}\noutput: {tmp_path / 'grown'}\nstages:\n{stages}")
    return execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def quiet(msg: str) -> None:
    pass


def test_injected_only_stage_trains_exactly_the_injected_layers(tmp_path, base, data):
    grown = grow(tmp_path, base, "  - name: injected-only\n    trainable: [injected]\n" + FAST.format(data=data, steps=12, save=100))
    [out] = train_output(grown, progress=False, log=quiet)
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

    grown = grow(tmp_path, base, "  - name: lora\n    trainable: [injected]\n"
                                 "    lora: {r: 4, alpha: 8, targets: [q_proj, o_proj, down_proj]}\n"
                                 + FAST.format(data=data, steps=6, save=100))
    [out] = train_output(grown, progress=False, log=quiet)
    AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint: no peft needed to load it
    before, after = tensors(grown), tensors(out)
    assert sorted(before) == sorted(after)
    adapted = {f"model.layers.{i}.{m}.weight" for i in (4, 9) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")}
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


def test_interrupted_stage_resumes_to_the_same_final_step(tmp_path, base, data):
    grown = grow(tmp_path, base, "  - name: injected-only\n    trainable: [injected]\n" + FAST.format(data=data, steps=8, save=3))
    [cfg] = stage_configs(grown)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, progress=False, log=quiet, callbacks=[_Interrupt(5)])
    partial = tmp_path / "grown-injected-only.partial"
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "grown-injected-only").exists()
    messages = []
    out = train_stage(cfg, progress=False, log=messages.append)
    assert any("resuming from checkpoint-3" in m for m in messages)
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 8 and metrics["resumed_from"] == "checkpoint-3"
    steps = [int(r["step"]) for r in csv.DictReader((out / "losses.csv").open())]
    assert steps == list(range(9))
    # The same run without the interruption ends on the same step with the same weights.
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "straight")})
    straight = train_stage(cfg, progress=False, log=quiet)
    assert json.loads((straight / "training_metrics.json").read_text())["global_step"] == 8
    for name, tensor in tensors(straight).items():
        torch.testing.assert_close(tensors(out)[name], tensor, atol=1e-6, rtol=1e-5)
    assert "already trained" in "".join(_log_of(lambda log: train_stage(cfg, progress=False, log=log)))


def _log_of(call) -> list[str]:
    messages: list[str] = []
    call(messages.append)
    return messages


def test_train_command_errors(tmp_path, base, data, cli):
    grown = grow(tmp_path, base, "  - name: one\n    trainable: [injected]\n    max_steps: 2\n    precision: float32\n"
                                 "  - name: two\n    trainable: [all]\n    lora: {r: 2, alpha: 4, targets: [o_proj, down_proj], quantize: 4}\n")
    result = cli("train", grown)
    assert result.exit_code == 2 and "error: stage 'one' has no training data: pass --data FILE" in result.stderr
    result = cli("train", grown, "--stage", "two", "--data", data)
    assert result.exit_code == 2 and "holds no config.json; expected the previous stage's output" in result.stderr
    result = cli("train", grown, "--stage", "tw", "--data", data)
    assert result.exit_code == 2 and "(did you mean 'two'?)" in result.stderr
    result = cli("train", grown, "--stage", "two", "--data", data, "--into", tmp_path / "stages")
    assert result.exit_code == 2
    result = cli("train", "--config", grown / "training" / "trl" / "02-two.yaml", "--data", data)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    result = cli("train", grown, "--print-launch", "--data", data)
    assert result.exit_code == 0 and result.stdout.startswith("accelerate launch --num_processes 1 -m tli_recipe train ")
    result = cli("train", grown, "--data", tmp_path / "missing.txt")
    assert result.exit_code == 2 and "missing.txt: no such file" in result.stderr


def test_train_from_an_emitted_config(tmp_path, base, data, cli):
    grown = grow(tmp_path, base, "  - name: new\n    trainable: [injected]\n" + FAST.format(data=data, steps=3, save=100))
    config = grown / "training" / "trl" / "01-new.yaml"
    result = cli("train", "--config", config, "--into", tmp_path / "stages", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "stages" / "new")
    assert json.loads((tmp_path / "stages" / "new" / "training_metrics.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("missing", [("peft",), ("accelerate",), ("peft", "accelerate")])
def test_train_without_the_train_extra_says_how_to_install_it(tmp_path, cli, monkeypatch, missing):
    import sys

    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as when not installed
    result = cli("train", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: training needs the train extra (") and result.stderr.count("\n") == 1
    assert all(name in result.stderr.split("(")[1] for name in missing)  # peft also fails without accelerate
    assert result.stderr.endswith("not installed); expected `pip install 'tli-recipe[train]'` (peft, accelerate>=1.1, matplotlib)\n")
