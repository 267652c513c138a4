"""Hostile cases for what `train` and `emit` read back: plan.json, stage configs, resume checkpoints.

A grown checkpoint is shared like a recipe: its plan.json and emitted configs decide where
`train` and `emit` write, so every name and path read from them is checked first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

STAGE = "stages:\n  - name: warm\n    trainable: [injected]\n    max_steps: 2\n    precision: float32\n"


@pytest.fixture
def grown(tmp_path, tiny, hostile_cli) -> Path:
    base = tiny(layers=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {base}\noutput: {tmp_path / 'grown'}\ninject: {{every: 2}}\n{STAGE}")
    result = hostile_cli("run", recipe, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return tmp_path / "grown"


def tamper_stage_name(grown: Path, name: str) -> None:
    plan = json.loads((grown / "plan.json").read_text())
    plan["stages"][0]["name"] = name
    plan["stages"][0]["settings"]["name"] = name
    (grown / "plan.json").write_text(json.dumps(plan))


ESCAPE = "../../../../E09-escaped"


@pytest.mark.parametrize("command", [("train",), ("emit", "--format", "builtin")])
def test_a_stage_name_that_climbs_out_is_refused(tmp_path, grown, hostile_cli, refused, snapshot, command):
    tamper_stage_name(grown, ESCAPE)
    inputs = snapshot(tmp_path)
    result = hostile_cli(*command, grown, *(["--data", grown / "plan.json"] if command[0] == "train" else []))
    refused(result, "plan.json: not a plan of this tli-recipe version (stages.0.name: String should match pattern")
    assert ESCAPE not in result.output
    inputs.unchanged()
    assert not any(p.name.startswith("E09") for p in tmp_path.parents[3].iterdir())


def test_a_stage_name_different_from_its_settings_is_refused(grown, hostile_cli, refused):
    plan = json.loads((grown / "plan.json").read_text())
    plan["stages"][0]["name"] = "other"
    (grown / "plan.json").write_text(json.dumps(plan))
    refused(hostile_cli("emit", grown), "stages.0: Value error, the stage is named 'other' but its settings 'warm'")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("learning_rate", -1.0, "stages.0.settings.learning_rate: Input should be greater than 0"),
        (
            "precision",
            "int4",
            "stages.0.settings.precision: Input should be 'auto', 'bfloat16', 'float16' or 'float32'",
        ),
        ("datasets", [{"path": ""}], "stages.0.settings.datasets.0.path: String should have at least 1 character"),
        ("shell", "rm -rf", "stages.0.settings.shell: Extra inputs are not permitted"),
    ],
)
def test_edited_stage_settings_are_refused(grown, hostile_cli, refused, field, value, problem):
    """The plan's own stage settings keep the recipe's bounds: an edited plan.json is refused, located."""
    plan = json.loads((grown / "plan.json").read_text())
    plan["stages"][0]["settings"][field] = value
    (grown / "plan.json").write_text(json.dumps(plan))
    refused(hostile_cli("emit", grown), f"plan.json: not a plan of this tli-recipe version ({problem}")


def test_a_plan_name_with_a_newline_is_refused(grown, hostile_cli, refused):
    plan = json.loads((grown / "plan.json").read_text())
    plan["name"] = "x\nmodel: /etc"
    (grown / "plan.json").write_text(json.dumps(plan))
    refused(hostile_cli("emit", grown), "name: String should match pattern")


@pytest.fixture
def config(grown, hostile_cli) -> Path:
    result = hostile_cli("emit", grown, "--format", "builtin")
    assert result.exit_code == 0, result.output
    return grown / "training" / "builtin" / "01-warm.yaml"


def edit(config: Path, **changes) -> None:
    data = yaml.safe_load(config.read_text())
    data.update(changes)
    config.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stage": ESCAPE}, "stage: string should match pattern"),
        ({"output_dir": "../../../../E09-escaped"}, "output_dir: stage 'warm' of "),
        ({"output_dir": "/tmp/E09-escaped"}, "output_dir: stage 'warm' of "),
        ({"model": "../../../somewhere"}, "model: a stage starts from the grown checkpoint"),
        ({"plan": "../../etc/passwd"}, "plan: expected the grown checkpoint's plan.json"),
    ],
)
def test_a_tampered_stage_config_does_not_decide_where_train_writes(
    tmp_path, config, hostile_cli, refused, snapshot, changes, message
):
    edit(config, **changes)
    inputs = snapshot(tmp_path)
    result = hostile_cli("train", "--config", config, "--data", config)
    refused(result, message, inputs=inputs)
    grown = config.parents[2]
    assert not (grown.parents[3] / "E09-escaped").exists() and not Path("/tmp/E09-escaped").exists()


def test_an_emitted_config_moved_with_its_checkpoint_still_passes_the_check(tmp_path, config):
    from tli_recipe.training.train import load_stage_config

    moved = tmp_path / "elsewhere" / "grown"
    moved.parent.mkdir()
    config.parents[2].rename(moved)
    cfg = load_stage_config(moved / "training" / "builtin" / "01-warm.yaml")
    assert Path(cfg.output_dir) == tmp_path / "elsewhere" / "grown-warm"


# --- a folder created while a stage trains --------------------------------------------------------


def test_a_folder_created_while_a_stage_trains_survives(tmp_path, grown, leftovers):
    from tiny_text import add_char_tokenizer, write_text
    from transformers import TrainerCallback

    from tli_recipe.errors import TliError
    from tli_recipe.training.train import train_output

    out = tmp_path / "grown-warm"
    seen = []

    class UserMakesTheFolder(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)
            out.mkdir()
            (out / "thesis.txt").write_text("years of work")

    tok = add_char_tokenizer(tmp_path / "tok")
    data = write_text(tmp_path / "train.txt", 100)
    with pytest.raises(TliError, match="grown-warm appeared while stage 'warm' was training; it was left as it is"):
        train_output(
            grown, data=[data], tokenizer=tok, progress=False, log=lambda m: None, callbacks=[UserMakesTheFolder()]
        )
    assert seen == [2]  # the folder came at the end of training, after the check at the start
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]
    assert (out / "thesis.txt").read_text() == "years of work"
    assert [n for n in leftovers(out) if ".tmp-" in n] == []


def test_a_head_beside_the_model_a_stage_starts_from_is_said_to_be_unused(grown, hostile_cli):
    (grown / "mod_head.safetensors").write_bytes(b"not read")
    result = hostile_cli("train", grown)  # no tokenizer: stops right after the start checks
    assert result.exit_code == 2
    assert f"stage 'warm': {grown / 'mod_head.safetensors'} (a MoD head) is not used: this stage trains the " in (
        result.stderr
    )
    assert "needs one to read the data" in result.stderr  # it stopped at the tokenizer, after saying so


# --- resume checkpoints -------------------------------------------------------------------------------


class _Pwn:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def resume_from(tmp_path, grown, files: dict):
    """Train the stage with an interrupted run's ``checkpoint-5`` holding ``files`` (name -> bytes or object)."""
    import torch
    from tiny_text import add_char_tokenizer, write_text

    from tli_recipe.training.train import train_output

    ckpt = tmp_path / "grown-warm.partial" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 5}')
    for name, content in files.items():
        if isinstance(content, bytes):
            (ckpt / name).write_bytes(content)
        else:
            torch.save(content, ckpt / name)
    tok = add_char_tokenizer(tmp_path / "tok")
    data = write_text(tmp_path / "train.txt", 100)
    return lambda: train_output(grown, data=[data], tokenizer=tok, progress=False, log=lambda m: None)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"pytorch_model.bin": b"pickle"}, "checkpoint-5: holds pytorch_model.bin, which this tool's trainer does not"),
        ({"model.safetensors": b"x", "optimizer.pt": b"\x80\x04K\x01."}, "optimizer.pt: not a torch.save archive"),
        ({"model.safetensors": b"x", "optimizer.pt": "PWN"}, "optimizer.pt: refused by torch's safe loader"),
        ({"model.safetensors": b"x", "rng_state.pth": "PWN"}, "rng_state.pth: refused by torch's safe loader"),
        ({"config.json": b"{}"}, "checkpoint-5: no model.safetensors or adapter_model.safetensors"),
    ],
)
def test_a_resume_checkpoint_the_trainer_did_not_write_is_refused_in_one_line(tmp_path, grown, files, message):
    from tli_recipe.errors import TliError

    marker = tmp_path / "pwned"
    files = {k: (_Pwn(str(marker)) if v == "PWN" else v) for k, v in files.items()}
    train = resume_from(tmp_path, grown, files)
    with pytest.raises(TliError, match=re.escape(message)) as err:
        train()
    assert "pass --restart to discard the interrupted run" in str(err.value)
    assert "\n" not in str(err.value) and not marker.exists()
    assert not (tmp_path / "grown-warm").exists()


def test_into_replaces_a_config_output_dir_it_would_refuse(tmp_path, config):
    from tli_recipe.training.train import load_stage_config

    edit(config, output_dir="../../../../E09-escaped")
    cfg = load_stage_config(config, into=True)  # the CLI then writes into/<stage>
    assert cfg.stage == "warm"
