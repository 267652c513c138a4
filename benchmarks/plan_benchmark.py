"""Plan time of Qwen3-30B-A3B (48 layers, 128 experts: 23,583 tensors) grown with TLI and a
full-weight training stage, from its stored config.json (no weights needed).

    python benchmarks/plan_benchmark.py [--repeat 3]

Prints the best wall time of load_recipe + compile_plan; the target is under 2 s. Plan time
must stay linear in the number of tensors (tests/plan/test_linear.py checks that by counting).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tli_recipe import compile_plan, load_recipe  # noqa: E402

CONFIG = ROOT / "tli_recipe" / "_data" / "configs" / "Qwen__Qwen3-30B-A3B"
RECIPE = f"""base_model: {CONFIG}
inject: {{every: 4}}
stages:
  - name: full
    trainable: [all]
  - name: new
    trainable: [injected]
  - name: lora
    trainable: [all]
    lora: {{r: 8, alpha: 16, targets: [q_proj, k_proj, v_proj, o_proj, down_proj]}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "qwen3-30b-a3b-tli.yaml"
        recipe.write_text(RECIPE)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            plan = compile_plan(load_recipe(recipe))
            times.append(time.perf_counter() - start)
    best = min(times)
    print(
        f"plan Qwen3-30B-A3B + TLI every 4 + 3 stages: {plan.totals.tensors} tensors, "
        f"{len(plan.stages[0].parameters)} trainable in the full stage: {best:.2f} s "
        f"(best of {args.repeat}; target < 2 s)"
    )


if __name__ == "__main__":
    main()
