#!/usr/bin/env python3
"""The computed path of ``tli-recipe run`` against a plain safetensors loop, on the same model.

Every tensor of the synthetic ~1.1B bf16 Llama of ``run_benchmark.py`` is cast to float16, once
by ``tli-recipe run`` (a recipe with ``dtype: float16`` and no growth, so both write the same
tensors) and once by the loop a user would write by hand::

    for shard: tensors = {n: safe_open(shard).get_tensor(n).to(float16) for n in shard}; save_file(tensors)

Rounds alternate the two (warm page cache before each); prints wall time and peak RSS of
each, and the ratio of medians and of minima (target: run/loop <= 1.3x). The loop holds a
whole shard in memory; ``run`` streams one tensor at a time, which the RSS column shows.

    .venv/bin/python benchmarks/computed_benchmark.py [--work-dir .bench] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import (  # noqa: E402 - the same model, measurer and helpers as the run benchmark
    Measurer,
    build_checkpoint,
    default_tli_recipe,
    fmt_bytes,
    med_min,
    python_for,
    rm,
    sync,
    warm_page_cache,
)

LOOP = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for shard in sorted(src.glob("*.safetensors")):
    with safe_open(str(shard), "pt") as f:
        tensors = {name: f.get_tensor(name).to(torch.float16) for name in f.keys()}
    save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
    del tensors
(dst / "config.json").write_text((src / "config.json").read_text())
"""
TARGET = 1.3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default=Path(__file__).resolve().parent.parent / ".bench", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    tool = default_tli_recipe()
    py = python_for(tool)
    work = args.work_dir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    src = work / "synthetic-llama-1b"
    info = build_checkpoint(src)
    out_run, out_loop = work / "cast-run", work / "cast-loop"
    recipe = work / "recipe-cast.yaml"
    recipe.write_text(
        f"name: bench-cast\nbase_model: {json.dumps(str(src))}\ndtype: float16\noutput: {json.dumps(str(out_run))}\n"
    )
    m = Measurer(logs)
    res = {"run": [], "run_rss": [], "loop": [], "loop_rss": []}
    for r in range(1, args.rounds + 1):
        for label, argv_ in (
            ("loop", [py, "-c", LOOP, str(src), str(out_loop)]),
            ("run", [tool, "run", str(recipe), "--force", "--no-progress"]),
        ):
            rm(out_loop)
            rm(out_run)
            sync()
            warm_page_cache(src)
            got = m.measure(argv_, f"cast-r{r}-{label}")
            res[label].append(got["wall"])
            res[label + "_rss"].append(got["maxrss"])
        print(
            f"round {r}: loop {res['loop'][-1]:.2f} s ({fmt_bytes(res['loop_rss'][-1])}) | "
            f"run {res['run'][-1]:.2f} s ({fmt_bytes(res['run_rss'][-1])})",
            flush=True,
        )
    rm(out_loop)
    rm(out_run)
    (lm, lmin), (rmed, rmin) = med_min(res["loop"]), med_min(res["run"])
    print(f"\nmodel: {info['n_params'] / 1e9:.3f}B params bf16 -> float16, {args.rounds} rounds")
    print(
        f"plain loop (read -> cast -> save_file): median {lm:.2f} s, min {lmin:.2f} s, "
        f"peak RSS {fmt_bytes(max(res['loop_rss']))}"
    )
    print(
        f"tli-recipe run (dtype: float16):        median {rmed:.2f} s, min {rmin:.2f} s, "
        f"peak RSS {fmt_bytes(max(res['run_rss']))}"
    )
    ratio = rmed / lm
    print(
        f"ratio run/loop: {ratio:.2f}x (medians), {rmin / lmin:.2f}x (minima); "
        f"target <= {TARGET}x: {'PASS' if ratio <= TARGET else 'FAIL'}"
    )
    print(
        f"per round: loop {[round(x, 2) for x in res['loop']]} s, run {[round(x, 2) for x in res['run']]} s, "
        f"median of loop RSS {fmt_bytes(statistics.median(res['loop_rss']))}"
    )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
