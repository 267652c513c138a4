#!/usr/bin/env python3
"""Peak memory and wall time of `tli-recipe verify`: layer-streamed (the default) against --whole.

Three parts (``--parts``, default all):

``1b``      The synthetic ~1.1B bf16 Llama of ``run_benchmark.py`` grown with K=4 (16 -> 20 layers).
            Alternating rounds of ``verify OUT`` and ``verify OUT --whole`` (both with the tensor
            check, as a user runs them), each in a fresh process: wall time and peak RSS of the
            child (``/usr/bin/time -v``), median and min of ``--rounds``. The load average is printed
            before and after: the ratio streamed/whole is only meaningful when it stayed flat.
``smollm2`` The real SmolLM2-135M-Instruct (``scripts/make_smollm2.py``, offline) grown four ways: TLI
            K=4, DUS to 36 layers ([0, 18) + [12, 30)), K=4 copies (o_proj and down_proj copied, not
            zeroed), and upcycled to 4 experts (top-2, random router). ``verify --json`` on real text
            (this repository's docs, tokenised by SmolLM2's tokenizer): the first layer where output
            and base part, by how much, and the logits' max |difference|, KL and top-1 agreement.
``paper``   Expected peak memory of streamed and whole verify for Llama-3-8B, 70B and 405B grown with
            K=4, from their configs alone (config-only folders, `plan` needs no weights): the same
            formula `verify` prints before it starts.

Usage::

    python benchmarks/verify_benchmark.py [--parts 1b,smollm2,paper] [--rounds 3] [--work-dir .bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import run_benchmark as rb  # noqa: E402  (the synthetic checkpoint and the measuring helpers)

TOOL = [sys.executable, "-m", "tli_recipe"]
SMOLLM2 = ROOT / ".demo" / "smollm2-135m-instruct"

#: Llama 3 / 3.1 shapes (published config.json values); vocab 128256, untied head.
LLAMA3 = {
    "Llama-3-8B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32),
    "Llama-3-70B": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64),
    "Llama-3.1-405B": dict(num_hidden_layers=126, hidden_size=16384, intermediate_size=53248, num_attention_heads=128),
}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def gb(n) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, text=True, capture_output=True, **kw)


def grow(recipe: Path) -> None:
    p = run([*TOOL, "run", str(recipe), "--force", "--no-progress"])
    if p.returncode:
        raise SystemExit(f"error: run {recipe} failed:\n{p.stderr[-3000:]}")


def part_1b(work: Path, rounds: int) -> None:
    print("== 1.1B synthetic Llama, K=4: verify streamed vs --whole ==", flush=True)
    src = work / "synthetic-llama-1b"
    info = rb.build_checkpoint(src)
    out = work / "verify-out-k4"
    recipe = work / "verify-recipe-k4.yaml"
    recipe.write_text(
        f"name: verify-k4\nbase_model: {json.dumps(str(src))}\ninject:\n  every: 4\noutput: {json.dumps(str(out))}\n"
    )
    if not (out / "plan.json").is_file():
        grow(recipe)
    print(f"  model: {info['n_params'] / 1e9:.3f}B params, output {gb(rb.dir_bytes(out))} on disk", flush=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    m = rb.Measurer(logs)
    baseline = m.measure([sys.executable, "-c", "import tli_recipe.cli, torch, transformers"], "verify-baseline")
    print(f"  interpreter with tli_recipe, torch and transformers imported: {gb(baseline['maxrss'])} RSS")
    rb.warm_page_cache(src)
    rb.warm_page_cache(out)
    results: dict[str, list[dict]] = {"streamed": [], "whole": []}
    print(f"  load average before: {load_average()} ({os.cpu_count()} CPUs); RSS via {m.method}", flush=True)
    for i in range(rounds):
        for mode, extra in (("streamed", []), ("whole", ["--whole"])):
            r = m.measure([*TOOL, "verify", str(out), *extra], f"verify-{mode}-{i}")
            results[mode].append(r)
            print(f"  round {i + 1} {mode:<8}: {r['wall']:7.1f} s, peak RSS {gb(r['maxrss'])}", flush=True)
    print(f"  load average after: {load_average()}")
    expected = [line for line in Path(results["streamed"][0]["log"]).read_text().splitlines() if "expected" in line]
    if expected:
        print(f"  streamed verify printed: {expected[0]}")
    med = {
        k: (statistics.median(r["wall"] for r in v), statistics.median(r["maxrss"] for r in v))
        for k, v in results.items()
    }
    print(f"  median of {rounds}: streamed {med['streamed'][0]:.1f} s / {gb(med['streamed'][1])}, "
          f"whole {med['whole'][0]:.1f} s / {gb(med['whole'][1])}")  # fmt: skip
    print(
        f"  streamed/whole: wall x{med['streamed'][0] / med['whole'][0]:.2f}, "
        f"peak RSS x{med['streamed'][1] / med['whole'][1]:.2f} (target: RSS under 1.5 GB, wall no more than whole)"
    )


def make_text(path: Path) -> Path:
    """Real English prose: this repository's docs, as plain text."""
    parts = [(ROOT / "docs" / "ARCHITECTURE.md").read_text()]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        parts.append(doc.read_text())
    path.write_text("\n".join(parts))
    return path


SMOL_RECIPES = {
    "TLI K=4": "inject:\n  every: 4\n",
    "DUS-36": "slices:\n  - layer_range: [0, 18]\n  - layer_range: [12, 30]\n",
    "K=4 copies": "inject:\n  every: 4\n  init: {o_proj: copy, down_proj: copy}\n",
    "MoE 4x top-2": "upcycle: {experts: 4, top_k: 2, router: {random: 0.02}}\n",
}


def part_smollm2(work: Path) -> None:
    print("== SmolLM2-135M-Instruct: where grown models part from the base (streamed verify, text) ==", flush=True)
    if not (SMOLLM2 / "config.json").is_file():
        p = run([sys.executable, str(ROOT / "scripts" / "make_smollm2.py"), str(SMOLLM2)])
        if p.returncode:
            raise SystemExit(f"error: scripts/make_smollm2.py failed:\n{p.stderr[-2000:]}")
    text = make_text(work / "verify-text.txt")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    m = rb.Measurer(logs)
    print(f"  load average: {load_average()}; text: {text.name} (docs/*.md), 2 rows of 128 tokens")
    header = (
        f"  {'recipe':<13} {'layers':>6} {'preserving':>10} {'first apart':>11} {'by (max |residual diff|)':>24} "
        f"{'logits max|diff|':>16} {'KL (nats)':>10} {'top-1':>7} {'wall':>7} {'peak RSS':>9}"
    )
    print(header)
    for label, body in SMOL_RECIPES.items():
        slug = label.lower().replace(" ", "-").replace("=", "").replace("/", "")
        out = work / f"verify-smollm2-{slug}"
        recipe = work / f"verify-smollm2-{slug}.yaml"
        recipe.write_text(
            f"name: {slug}\nbase_model: {json.dumps(str(SMOLLM2))}\n{body}output: {json.dumps(str(out))}\n"
        )
        grow(recipe)
        argv = [*TOOL, "verify", str(out), "--json", "--text", str(text), "--length", "128"]
        r = m.measure(argv, f"verify-smollm2-{slug}", check=False)
        log = Path(r["log"]).read_text()
        data = json.loads(log[log.index("{\n") : log.rindex("}") + 1])
        f = data["function"]
        first = f["first_divergent_layer"]
        by = "-" if first is None else f"{f['layers'][first]['max_abs_diff']:.3g}"
        rows = [x["max_abs_diff"] for x in f["layers"] if x["max_abs_diff"] is not None]
        injected = [x["max_abs_diff"] for x in f["layers"] if x["role"] == "injected"]
        print(
            f"  {label:<13} {len(f['layers']):>6} {str(data['function_preserving']):>10} "
            f"{'none' if first is None else first:>11} {by:>24} {f['logits_max_abs_diff']:>16.3g} "
            f"{f['kl_divergence']:>10.3g} {f['top1_agreement']:>7.1%} {r['wall']:>6.1f}s {gb(r['maxrss']):>9}"
        )
        if injected:
            print(f"  {'':<13} injected layers' max |residual diff|: {', '.join(f'{x:.3g}' for x in injected)}")
        print(
            f"  {'':<13} largest residual diff over all layers: {max(rows):.3g}; logits tolerance "
            f"{f['logits_tolerance']:.3g} (max |base logits| {f['logits_scale']:.3g}); verify exit {r['rc']}"
        )


def part_paper() -> None:
    from tli_recipe import compile_plan, load_recipe
    from tli_recipe.execute.layerwise import estimate_peak

    print("== On paper: expected peak memory of verify, K=4, 2 x 24 tokens (from the plan's shapes) ==")
    print(
        f"  {'model':<16} {'layers':>9} {'streamed fp32':>14} {'largest unit':>26} {'streamed bf16':>14} "
        f"{'whole fp32':>11}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in LLAMA3.items():
            folder = Path(tmp) / name
            folder.mkdir()
            config = dict(
                architectures=["LlamaForCausalLM"],
                model_type="llama",
                num_key_value_heads=8,
                vocab_size=128256,
                max_position_embeddings=8192,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                tie_word_embeddings=False,
                torch_dtype="bfloat16",
                **shape,
            )
            (folder / "config.json").write_text(json.dumps(config))
            recipe = Path(tmp) / f"{name}.yaml"
            recipe.write_text(f"name: x\nbase_model: {json.dumps(str(folder))}\ninject:\n  every: 4\n")
            plan = compile_plan(load_recipe(recipe))
            fp32 = estimate_peak(plan, batch=2, length=24)
            bf16 = estimate_peak(plan, batch=2, length=24, dtype="bfloat16")
            whole = estimate_peak(plan, batch=2, length=24, whole=True)
            layers = f"{shape['num_hidden_layers']}->{len(plan.layers)}"
            print(
                f"  {name:<16} {layers:>9} {gb(fp32.total):>14} {fp32.largest_unit:>26} {gb(bf16.total):>14} "
                f"{gb(whole.total):>11}"
            )
    print("  (plus the interpreter with torch and transformers: the baseline RSS measured in part 1b)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="1b,smollm2,paper", help="comma-separated: 1b, smollm2, paper")
    ap.add_argument("--rounds", type=int, default=3, help="alternating streamed/whole rounds of part 1b (default 3)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".bench", help="scratch dir (default: <repo>/.bench)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"1b", "smollm2", "paper"}
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if "paper" in parts:
        part_paper()
    if "smollm2" in parts:
        part_smollm2(work)
    if "1b" in parts:
        part_1b(work, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
