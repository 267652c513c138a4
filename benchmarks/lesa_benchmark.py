#!/usr/bin/env python3
"""LESA at real size: every projection type of a Llama-3.2-1B-shaped random model, on this machine.

For each of q/k/v/o/gate/up/down (16 layers, hidden 2048, MLP 8192, 8 KV heads of 64) it runs
tli-recipe's own LESA steps (the SVD of the stacked layers, then the predictor's training) on
random float32 weights of those shapes, and reports per type: seconds of the SVD
(``svd_basis``), seconds of the predictor's training per epoch (``train_predictor``), the time at the
recipe's epochs (a type of a shape measured already, up_proj after gate_proj, reuses that time), peak
RSS, and the flops the estimate in ``tli_recipe/plan/cost.py`` counts, hence the rate this machine
sustains. ``--epochs N`` trains N epochs and scales the training part to the default 10 epochs
(training time is linear in the epochs: the same rows each epoch); the SVD is always measured whole.
Then the same estimate for the shapes of Llama-3-8B and Llama-3.2-3B, from their stored configs.

    .venv/bin/python benchmarks/lesa_benchmark.py [--epochs 1] [--types q_proj,gate_proj] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # [out, in] of Llama-3.2-1B
    "q_proj": (2048, 2048),
    "k_proj": (512, 2048),
    "v_proj": (512, 2048),
    "o_proj": (2048, 2048),
    "gate_proj": (8192, 2048),
    "up_proj": (8192, 2048),
    "down_proj": (2048, 8192),
}
LAYERS = 16


def flops(out: int, width: int, layers: int, hidden: int, epochs: int) -> tuple[float, float]:
    """(SVD flops, training flops) as plan/cost.py counts them."""
    m, n = sorted((out, layers * width))
    k = min(out, layers * width)
    return 4 * m * m * n + 8 * m**3, epochs * k * max(layers - 2, 0) * 6 * hidden * (3 * width + hidden)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=1, help="epochs to train (scaled to --target-epochs)")
    ap.add_argument("--target-epochs", type=int, default=10, help="the recipe default (inject.lesa.epochs)")
    ap.add_argument("--types", default=",".join(SHAPES), help="comma-separated projection types")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from tli_recipe.execute.lesa import svd_basis, train_predictor
    from tli_recipe.plan.cost import CPU_FLOPS, human_seconds
    from tli_recipe.recipe.schema import Lesa

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
        f"baseline RSS {peak_rss() / 2**20:.0f} MiB",
        flush=True,
    )
    settings = Lesa(epochs=args.epochs)
    total_measured, total_flops = 0.0, 0.0
    rows = []
    measured: dict = {}
    for name in args.types.split(","):
        out, width = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(out, width, generator=gen) * 0.02 for _ in range(LAYERS)]
        started = time.perf_counter()
        if (out, width) in measured:  # the same shape as a type measured already (up_proj is gate_proj's)
            svd, per_epoch = measured[(out, width)]
        else:
            t = time.perf_counter()
            _, blocks = svd_basis(weights, args.device)
            svd = time.perf_counter() - t
            t = time.perf_counter()
            train_predictor(blocks, settings, args.device)
            per_epoch = (time.perf_counter() - t) / args.epochs
            measured[(out, width)] = (svd, per_epoch)
            del blocks
        at_target = svd + per_epoch * args.target_epochs
        f_svd, f_train = flops(out, width, LAYERS, settings.hidden, args.target_epochs)
        total_measured += at_target
        total_flops += f_svd + f_train
        rows.append((name, out, width, svd, per_epoch, at_target, (f_svd + f_train) / at_target, peak_rss()))
        print(
            f"{name:>9} [{out} x {width}] x {LAYERS}: SVD {svd:6.1f} s, training {per_epoch:6.1f} s/epoch -> "
            f"{at_target:7.1f} s at {args.target_epochs} epochs, {(f_svd + f_train) / at_target / 1e9:5.1f} GFLOP/s, "
            f"peak RSS {peak_rss() / 2**30:.2f} GiB (measured {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        del weights
    rate = total_flops / total_measured
    print(
        f"\nall {len(rows)} types: {human_seconds(total_measured)} at {args.target_epochs} epochs "
        f"({total_flops / 1e12:.1f} TFLOP, {rate / 1e9:.1f} GFLOP/s sustained; plan/cost.py assumes "
        f"{CPU_FLOPS / 1e9:.0f} GFLOP/s, so its estimate would be {human_seconds(total_flops / CPU_FLOPS)}); "
        f"peak RSS {peak_rss() / 2**30:.2f} GiB"
    )
    from tli_recipe import compile_plan, load_recipe
    from tli_recipe.plan.cost import lesa_cost

    init = "{" + ", ".join(f"{t}: lesa" for t in SHAPES) + "}"
    for model in ("meta-llama__Llama-3.2-1B", "meta-llama__Llama-3.2-3B", "meta-llama__Meta-Llama-3-8B"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp) / "r.yaml"
            recipe.write_text(
                f"base_model: {ROOT / 'tli_recipe/_data/configs' / model}\ninject: {{every: 4, init: {init}}}\n"
            )
            cost = lesa_cost(compile_plan(load_recipe(recipe)))
        print(
            f"{model}: {cost.flops / 1e12:.1f} TFLOP, SVD up to {cost.largest[0]} x {cost.largest[1]}, "
            f"~{cost.peak_bytes / 2**30:.1f} GiB: {human_seconds(cost.flops / rate)} at this machine's rate"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
