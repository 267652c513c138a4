"""Several processes: the ``accelerate launch`` line for ``tli-recipe train``, and which process writes.

``accelerate launch -m tli_recipe train ...`` starts one process per device, each running
the command line (tli_recipe/__main__.py); the Trainer does the distribution, and only the
main process (rank 0) writes files.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence


def is_main_process() -> bool:
    """True in the process that writes files: the only one, or rank 0 under ``accelerate launch``."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_command(argv: Sequence[str], gpus: int) -> str:
    """The ``accelerate launch`` line that runs ``tli-recipe <argv>`` on ``gpus`` GPUs of this machine
    (``python -m tli_recipe`` is the command line; see tli_recipe/__main__.py)."""
    parts = ["accelerate", "launch", "--num_processes", str(gpus)] + (["--multi_gpu"] if gpus > 1 else [])
    return " ".join(parts) + " -m tli_recipe " + " ".join(shlex.quote(str(a)) for a in argv)


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
