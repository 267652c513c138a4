"""Several processes on the CPU (torchrun, gloo) train exactly what one process trains with the same
global batch, with the stages' default settings (validation on): a stage of injected layers, a full
stage, a LoRA stage and a MoD stage; only global rank 0 writes or prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, build_tiny, write_recipe
from tiny_text import add_char_tokenizer, write_text

#: name -> what the stage trains (every stage also gets COMMON).
STAGES = {
    "inj": "trainable: [injected]",
    "full": "trainable: [all]",
    "lora": "trainable: [all]\n    lora: {r: 2, alpha: 4, targets: [q_proj, v_proj, o_proj, down_proj]}",
    "mod": "trainable: [injected]\n    objective: mod\n    mod: {layers: 2, learning_rate: 0.0001}",
}
# The same settings for every stage; validation_fraction stays at its default (0.05). A small learning rate:
# AdamW divides by sqrt(v) + 1e-8, so a gradient near 1e-8 (a key projection of an injected layer at step 2)
# turns its last-bit rounding differences (a sum over 2 processes or over a batch of 2) into update
# differences of up to 0.4 % of the learning rate; unsynchronised replicas differ by the updates themselves.
COMMON = "max_steps: 3\n    learning_rate: 0.0001\n    sequence_length: 16\n    precision: float32\n    eval_steps: 2"


def grown(tmp_path: Path, cli) -> Path:
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt", 40)
    stages = "".join(
        f"  - name: {name}\n    {what}\n    datasets: [{{path: {data}}}]\n    {COMMON}\n"
        for name, what in STAGES.items()
    )
    text = f"base_model: {base}\ninject: {{every: 2}}\noutput: {tmp_path / 'grown'}\nstages:\n{stages}"
    result = cli("run", write_recipe(tmp_path, text), "--no-progress")
    assert result.exit_code == 0, result.stderr
    return tmp_path / "grown"


def torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``tli-recipe <args>`` in ``processes`` CPU processes (torchrun; the Trainer runs DDP over gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    port = str(29500 + os.getpid() % 1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", port, "-m", "tli_recipe", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(file))
    return out


def max_difference(a: Path, b: Path) -> float:
    ta, tb = tensors(a), tensors(b)
    assert ta and sorted(ta) == sorted(tb)
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


#: --set values of the strategies (ddp is the default).
STRATEGIES = {
    "ddp": None,
    "zero2": "{strategy: deepspeed, zero_stage: 2}",
    "zero3": "{strategy: deepspeed, zero_stage: 3}",
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_train_what_one_process_trains(tmp_path, cli, strategy):
    """ddp (the default), DeepSpeed ZeRO-2 and ZeRO-3 (where DeepSpeed is installed: `make test-trainers`).
    Not FSDP: accelerate runs it on GPUs only (on CPUs it would train DDP; benchmarks/gpu_check.sh runs it)."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    model = grown(tmp_path, cli)
    # ZeRO-3: the plan refuses MoD, the built-in trainer LoRA (its merge loads the base in rank 0 alone).
    stages = list(STAGES)[:2] if strategy == "zero3" else list(STAGES)
    chosen = [x for s in stages for x in ("--stage", s)]
    # One process, 2 sequences a step; two processes, 1 sequence each: the same global batch.
    one = cli("train", model, "--no-progress", "--into", tmp_path / "one", "--set", "stages[*].batch_size=2", *chosen)
    assert one.exit_code == 0, one.stderr
    shard = []
    if STRATEGIES[strategy]:
        shard = [x for i in range(len(stages)) for x in ("--set", f"stages[{i}].distributed={STRATEGIES[strategy]}")]
    two = torchrun(["train", str(model), "--no-progress", "--into", str(tmp_path / "two"), *chosen, *shard], tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    for stage in stages:
        assert max_difference(tmp_path / "one" / stage, tmp_path / "two" / stage) <= 1e-6, stage
        assert max_difference(model, tmp_path / "two" / stage) > 5e-5, stage  # and it did train
    if "mod" in stages:
        from safetensors.torch import load_file

        head_one = load_file(tmp_path / "one" / "mod" / "mod_head.safetensors")
        head_two = load_file(tmp_path / "two" / "mod" / "mod_head.safetensors")
        assert max((head_one[k] - head_two[k]).abs().max().item() for k in head_one) <= 1e-6
    # Rank 0 alone speaks and writes: one line per stage on stdout, one data line per stage.
    printed = [line for line in two.stdout.splitlines() if line.startswith(str(tmp_path))]  # less DeepSpeed's log
    assert printed == [str(tmp_path / "two" / s) for s in stages]
    assert two.stderr.count("data: ") == len(stages) and two.stderr.count("wrote ") == len(stages), two.stderr[-4000:]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, cli):
    """SIGTERM to both processes mid-stage (as SLURM sends it): a checkpoint at the next step, the resume note
    (rank 0 only), exit 143; the same command then finishes the stage as an uninterrupted run would."""
    import signal

    model = grown(tmp_path, cli)
    steps = ["--stage", "inj", "--max-steps", "20", "--set", "stages[*].save_steps=100"]
    command = ["train", str(model), "--no-progress", "--into", str(tmp_path / "two"), *steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    port = str(29500 + (os.getpid() + 1) % 1000)
    torchrun_line = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    run = subprocess.Popen(
        [*torchrun_line, "-m", "tli_recipe", *command],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in run.stderr:  # both processes are past the setup barrier once rank 0 says it starts
        seen.append(line)
        if "starting in" in line:
            os.killpg(run.pid, signal.SIGTERM)
            break
    out, err = run.communicate(timeout=300)
    err = "".join(seen) + err
    assert run.returncode != 0, err[-3000:]
    assert err.count("interrupted: SIGTERM: stage 'inj' stopped after step ") == 1, err[-3000:]
    assert "run the same command again to resume" in err and out == ""
    work = tmp_path / "two" / "inj.partial"
    [saved] = [p.name for p in work.glob("checkpoint-*")]
    assert 1 <= int(saved.split("-")[1]) < 20 and not (tmp_path / "two" / "inj").exists()

    again = torchrun(command, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from " + saved in again.stderr
    one = cli("train", model, "--no-progress", "--into", tmp_path / "one", "--set", "stages[*].batch_size=2", *steps)
    assert one.exit_code == 0, one.stderr
    assert max_difference(tmp_path / "one" / "inj", tmp_path / "two" / "inj") <= 1e-6


def test_one_process_trains_a_sharded_stage_whole(tmp_path, cli):
    """FSDP and DeepSpeed need a launcher's processes; `tli-recipe train` alone trains the stage unsharded."""
    model = grown(tmp_path, cli)
    result = cli(
        "train", model, "--stage", "inj", "--no-progress", "--into", tmp_path / "one", "--max-steps", "1",
        "--set", "stages[*].distributed=fsdp",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "stage 'inj': distributed: fsdp applies under a launcher" in result.stderr


def test_sharding_that_cannot_apply_is_said_not_silent():
    from tli_recipe.training.train import unsharded

    fsdp, ds = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}, {"deepspeed": {}}
    assert "applies under a launcher" in unsharded(fsdp, on_cpu=False, launched=False)
    assert "applies under a launcher" in unsharded(ds, on_cpu=True, launched=False)
    assert "fsdp needs GPUs" in unsharded(fsdp, on_cpu=True, launched=True)  # accelerate would run DDP silently
    assert unsharded(fsdp, on_cpu=False, launched=True) is None
    assert unsharded(ds, on_cpu=True, launched=True) is None  # DeepSpeed runs on CPUs (gloo)
    assert unsharded({}, on_cpu=True, launched=False) is None
