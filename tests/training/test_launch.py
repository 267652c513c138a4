"""Several processes: the `accelerate launch` line that `train --print-launch` prints really runs
(2 processes on the CPU, DDP over gloo), and only rank 0 writes files."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, build_tiny, write_recipe
from tiny_text import add_char_tokenizer, write_text

from tli_recipe.training.launch import is_main_process, launch_command, launch_lines, under_launcher

STAGE = """stages:
  - name: new
    trainable: [injected]
    datasets: [{{path: {data}}}]
    max_steps: 3
    learning_rate: 0.01
    batch_size: 2
    sequence_length: 16
    precision: float32
    validation_fraction: 0.2
    eval_steps: 2
    save_steps: 2
"""


def test_launch_line_runs_the_package_module():
    line = launch_command(["train", "/m dir", "--stage", "new"], 2)
    assert line == "accelerate launch --num_processes 2 --multi_gpu -m tli_recipe train '/m dir' --stage new"
    assert launch_command(["train", "x"], 1) == "accelerate launch --num_processes 1 -m tli_recipe train x"


def test_launch_lines_for_several_machines():
    argv = ["train", "/m", "--stage", "new"]
    lines = launch_lines(argv, 8, machines=4)
    assert lines[0] == "accelerate launch --num_processes 8 --multi_gpu -m tli_recipe train /m --stage new"
    assert lines[1] == "torchrun --nproc_per_node 8 -m tli_recipe train /m --stage new"
    # accelerate counts the processes of all machines; torchrun counts per machine.
    assert (
        "accelerate launch --multi_gpu --num_machines 4 --num_processes 32 --machine_rank $MACHINE_RANK "
        "--main_process_ip $MAIN_HOST --main_process_port 29500 -m tli_recipe train /m --stage new"
    ) in lines
    assert (
        "torchrun --nproc_per_node 8 --nnodes 4 --node_rank $MACHINE_RANK --rdzv_backend c10d "
        "--rdzv_endpoint $MAIN_HOST:29500 -m tli_recipe train /m --stage new"
    ) in lines
    assert any("only global rank 0 writes" in line and "same paths" in line for line in lines)
    assert "32 processes" in " ".join(launch_lines(argv, 0, machines=4, per_machine=8))
    # On CPUs: torchrun starts the processes (accelerate launch --cpu would start one).
    assert "torchrun --nproc_per_node N" in launch_lines(argv, 0)[2]


def test_rank_zero_is_the_main_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert is_main_process() and not under_launcher()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_main_process() and under_launcher()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()


@pytest.mark.slow
def test_printed_launch_line_trains_with_two_processes(tmp_path, cli, monkeypatch):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt", 30)
    recipe = write_recipe(
        tmp_path, f"base_model: {base}\ninject: {{every: 2}}\noutput: {tmp_path / 'grown'}\n" + STAGE.format(data=data)
    )
    assert cli("run", recipe, "--no-progress").exit_code == 0
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what a 2-GPU machine prints
    printed = cli("train", tmp_path / "grown", "--no-progress", "--print-launch")
    assert printed.exit_code == 0, printed.stderr
    lines = printed.stdout.splitlines()
    argv = shlex.split(lines[0])
    assert lines[1].startswith("torchrun --nproc_per_node 2 -m tli_recipe train ")
    assert argv[:6] == ["accelerate", "launch", "--num_processes", "2", "--multi_gpu", "-m"] and argv[6] == "tli_recipe"
    # The printed line, run as it is on this machine without a GPU: torchrun starts 2 processes and the
    # Trainer runs DDP on the CPU over gloo. (`--cpu` would not do: accelerate then starts one process.)
    argv[2:2] = [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
    ]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [str(accelerate), *argv[1:]], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "grown-new"
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["eval_loss_before"] is not None and (out / "README.md").is_file()
    # Two processes of 2 sequences each per step: an epoch takes half the steps one process would.
    assert metrics["epochs"] == pytest.approx(3 / math.ceil(metrics["train_sequences"] / 4))
    # Rank 0 wrote everything once; the other rank wrote nothing (no JSON cut short by a second writer).
    assert result.stderr.count("data: ") == 1, result.stderr[-4000:]
    assert result.stderr.count("wrote ") == 1
    assert not (tmp_path / "grown-new.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert result.stdout.strip().splitlines()[-1] == str(out)


@pytest.mark.slow
def test_a_process_other_than_rank_0_writes_nothing(tmp_path, monkeypatch):
    """Every process trains; only rank 0 writes initial_eval.json, the work directory and the stage output."""
    import transformers

    from tli_recipe import compile_plan, execute_plan, load_recipe
    from tli_recipe.training.train import stage_configs, train_stage

    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt", 30)
    recipe = write_recipe(
        tmp_path,
        f"base_model: {base}\ninject: {{every: 2}}\noutput: {tmp_path / 'grown'}\n"
        + STAGE.format(data=data).replace("save_steps: 2", "save_steps: 100"),
    )
    grown = execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)
    [cfg] = stage_configs(grown)
    monkeypatch.setenv("RANK", "1")
    # What the Trainer sees in the process of rank 1 (its own writes follow these two).
    monkeypatch.setattr(transformers.Trainer, "is_world_process_zero", lambda self: False)
    monkeypatch.setattr(transformers.TrainingArguments, "should_save", property(lambda self: False))
    before = sorted(p.name for p in tmp_path.iterdir())
    said: list[str] = []
    assert train_stage(cfg, progress=False, log=said.append) == tmp_path / "grown-new"
    assert said == [] and not (tmp_path / "grown-new").exists()
    new = sorted(p.name for p in tmp_path.iterdir() if p.name not in before)
    assert new in ([], ["grown-new.partial"])
    # Only the Trainer's own per-process checkpoint state (each rank saves its random state).
    work = [
        p.relative_to(tmp_path / "grown-new.partial")
        for p in (tmp_path / "grown-new.partial").rglob("*")
        if p.is_file()
    ]
    assert all(p.name.startswith("rng_state") for p in work), work
