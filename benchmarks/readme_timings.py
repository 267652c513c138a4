"""The README's timing figures, measured: the start-up of `validate` and `plan` (a fresh process each, as a
user types them) and `make demo` with its packages installed. Prints each figure with the machine it ran on
(CPU, cores, load average before and after), so the README can quote them with their context.

    python benchmarks/readme_timings.py [--repeat 5] [--demo] [--venv .venv]

`validate` and `plan` run the venv's `tli-recipe` on committed recipes, planned from the configs stored in
the package (no network: HF_HUB_OFFLINE=1). `--demo` also times `make demo` once, into its own folder
(.bench/readme-demo, removed after), with the venv's packages already installed (pip has nothing to fetch);
a fresh clone adds the venv's creation and the package downloads, which depend on the network and are not
measured here. Medians and minima of --repeat runs; on a loaded machine (load average above the core
count) the figures are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "tli_recipe" / "_data" / "configs"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(command: list[str], env: dict, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return times


def show(label: str, times: list[float]) -> None:
    print(f"{label:<44} median {statistics.median(times):6.2f} s   min {min(times):6.2f} s   ({len(times)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--demo", action="store_true", help="also time `make demo` (about a minute or more)")
    parser.add_argument("--venv", default=".venv", help="the venv whose tli-recipe runs (default: .venv)")
    args = parser.parse_args()
    venv = (ROOT / args.venv).resolve()
    tool = venv / "bin" / "tli-recipe"
    if not tool.is_file():
        sys.exit(f"{tool} is missing: run `make setup` first (or give --venv)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout's code
    print(f"machine: {machine()}")
    print(f"before:  {load()}")
    base = f"base_model={STORED / 'meta-llama__Meta-Llama-3-8B'}"
    show("tli-recipe --version", timed([str(tool), "--version"], env, args.repeat))
    show(
        "tli-recipe validate recipes/llama3-8b-k4.yaml",
        timed([str(tool), "validate", "recipes/llama3-8b-k4.yaml"], env, args.repeat),
    )
    show(
        "tli-recipe plan recipes/llama3-8b-k4.yaml",
        timed([str(tool), "plan", "recipes/llama3-8b-k4.yaml", "--set", base], env, args.repeat),
    )
    show("tli-recipe plan qwen3-4b-k4 (stored config)", timed([str(tool), "plan", "qwen3-4b-k4"], env, args.repeat))
    if args.demo:
        folder = ROOT / ".bench" / "readme-demo"
        if folder.exists():
            sys.exit(f"{folder} exists (a run that did not finish?): remove it first")
        command = [
            "make",
            "--no-print-directory",
            "-o",
            f"{venv}/bin/tli-recipe",
            f"VENV={venv}",
            f"DEMO={folder}",
            "demo",
        ]
        try:
            show("make demo (packages installed)", timed(command, env, 1))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"after:   {load()}")


if __name__ == "__main__":
    main()
