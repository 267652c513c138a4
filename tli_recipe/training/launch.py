"""Several processes: the launch lines for ``tli-recipe train``, which process writes, and the command line
that every process runs.

``accelerate launch -m tli_recipe train ...`` (or ``torchrun ... -m tli_recipe train ...``) starts one
process per device, each running the same command line (tli_recipe/__main__.py); the Trainer does the
distribution (DDP, FSDP or DeepSpeed, from the stage's ``distributed`` setting), and only global rank 0
writes files or prints results.

accelerate's ``--num_processes`` is the total over all machines; torchrun's ``--nproc_per_node`` is per
machine. On a CPU, ``accelerate launch --cpu`` starts one process whatever ``--num_processes`` says:
``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu --num_processes N``) starts N, which
train over gloo.
"""

from __future__ import annotations

import os
import shlex
from typing import Optional, Sequence

#: The rendezvous port in the printed lines (any free port on machine 0).
PORT = 29500


def is_main_process() -> bool:
    """True in the process that writes files: the only one, or global rank 0 under a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched() -> bool:
    """True in a process that a launcher started (torchrun, accelerate launch), even a single one."""
    return "LOCAL_RANK" in os.environ


def train_argv(
    model_dir: Optional[str],
    config: Optional[str],
    *,
    data: Sequence[str] = (),
    stages: Sequence[str] = (),
    into: Optional[str] = None,
    tokenizer: Optional[str] = None,
    restart: bool = False,
    force: bool = False,
    no_progress: bool = False,
    overrides: Sequence[str] = (),
    max_steps: Optional[int] = None,
    learning_rate: Optional[float] = None,
    report_to: str = "none",
) -> list[str]:
    """The ``tli-recipe train`` arguments of this command, for a launcher that runs it in every process
    (``--device`` and ``--print-launch`` left out: each process takes its own device)."""
    return [
        "train",
        *([model_dir] if model_dir else ["--config", str(config)]),
        *(x for d in data for x in ("--data", d)),
        *(x for s in stages for x in ("--stage", s)),
        *(["--into", into] if into else []),
        *(["--tokenizer", tokenizer] if tokenizer else []),
        *(["--restart"] if restart else []),
        *(["--force"] if force else []),
        *(["--no-progress"] if no_progress else []),
        *(x for o in overrides for x in ("--set", o)),
        *(["--max-steps", str(max_steps)] if max_steps else []),
        *(["--learning-rate", repr(learning_rate)] if learning_rate else []),
        *(["--report-to", report_to] if report_to != "none" else []),
    ]


def _tail(argv: Sequence[str]) -> str:
    return "-m tli_recipe " + " ".join(shlex.quote(str(a)) for a in argv)


def launch_command(argv: Sequence[str], gpus: int) -> str:
    """The ``accelerate launch`` line that runs ``tli-recipe <argv>`` on ``gpus`` GPUs of this machine
    (``python -m tli_recipe`` is the command line; see tli_recipe/__main__.py)."""
    parts = ["accelerate", "launch", "--num_processes", str(gpus)] + (["--multi_gpu"] if gpus > 1 else [])
    return " ".join(parts) + " " + _tail(argv)


def torchrun_command(argv: Sequence[str], per_machine: int, machines: int = 1) -> str:
    """The ``torchrun`` line for ``machines`` machines of ``per_machine`` processes each (run on every machine)."""
    parts = ["torchrun", "--nproc_per_node", str(per_machine)]
    if machines > 1:
        parts += [
            "--nnodes",
            str(machines),
            "--node_rank",
            "$MACHINE_RANK",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"$MAIN_HOST:{PORT}",
        ]
    return " ".join(parts) + " " + _tail(argv)


def multi_machine_command(argv: Sequence[str], machines: int, per_machine: int) -> str:
    """The ``accelerate launch`` line for ``machines`` machines of ``per_machine`` GPUs: ``--num_processes``
    is the total over all machines."""
    parts = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_machines",
        str(machines),
        "--num_processes",
        str(machines * per_machine),
        "--machine_rank",
        "$MACHINE_RANK",
        "--main_process_ip",
        "$MAIN_HOST",
        "--main_process_port",
        str(PORT),
    ]
    return " ".join(parts) + " " + _tail(argv)


def launch_lines(argv: Sequence[str], gpus: int, machines: int = 1, per_machine: Optional[int] = None) -> list[str]:
    """What ``train --print-launch`` prints: the lines for this machine's ``gpus`` GPUs (first: the
    ``accelerate launch`` line), then for ``machines`` machines of ``per_machine`` GPUs each, with comments."""
    here = max(1, gpus)
    lines = [
        launch_command(argv, here),
        torchrun_command(argv, here),
        f"# {gpus} GPU{'s' * (gpus != 1)} visible on this machine."
        + (
            " On CPUs, torchrun --nproc_per_node N starts N processes (gloo); accelerate launch --cpu starts one."
            if gpus == 0
            else ""
        ),
    ]
    if machines > 1:
        each = per_machine or here
        lines += [
            f"# {machines} machines of {each} GPUs ({machines * each} processes): run one of these on every machine, "
            f"with MACHINE_RANK 0..{machines - 1} and MAIN_HOST the address of machine 0 (port {PORT} open there).",
            multi_machine_command(argv, machines, each),
            torchrun_command(argv, each, machines),
        ]
    else:
        lines.append("# Several machines: add --machines N [--gpus-per-machine G] to --print-launch.")
    lines.append(
        "# Every machine needs the same paths (checkpoint, data, output folder on a shared file system); only "
        "global rank 0 writes. The stage's distributed setting (ddp, fsdp, deepspeed) needs no launcher flag."
    )
    return lines
