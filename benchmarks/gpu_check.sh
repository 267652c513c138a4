#!/usr/bin/env bash
# The CUDA path, on a machine with a GPU (about 3 minutes on one H200; nothing here runs without CUDA):
#   1. the CUDA tests: cpu and cuda runs write the same bytes (scale, noise, interpolate, random, cast);
#   2. `run` of the synthetic ~1.1B bf16 Llama with a computed policy on every injected layer
#      (and a cast of every tensor), --device cuda against --device cpu, wall time;
#   3. LESA on Llama-3.2-1B shapes on the GPU (2 epochs, scaled to the default 10).
#
#   bash benchmarks/gpu_check.sh            # from the repo root, with the venv set up (make setup TORCH=torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TOOL=${TOOL:-.venv/bin/tli-recipe}
WORK=${WORK:-.bench}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "== 1. CUDA tests"
$PY -m pytest -q -p no:cacheprovider -m gpu tests
echo "== 2. run --device cuda vs cpu (synthetic 1.1B bf16, computed policies)"
$PY - <<PY
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
from run_benchmark import build_checkpoint
print(build_checkpoint(Path("$WORK") / "synthetic-llama-1b")["n_params"], "parameters")
PY
SRC=$(realpath "$WORK/synthetic-llama-1b")
cat > "$WORK/recipe-gpu.yaml" <<YAML
name: bench-gpu
base_model: "$SRC"
dtype: float16
inject:
  every: 4
  init: {q_proj: {interpolate: 0.5}, o_proj: {scale: 0.0}, down_proj: {noise: 0.001}}
YAML
for device in cuda cpu cuda cpu; do
  start=$(date +%s.%N)
  $TOOL run "$WORK/recipe-gpu.yaml" --output "$WORK/out-gpu-$device" --device $device --force --no-progress 2>&1 | tail -1
  echo "device $device: $(echo "$(date +%s.%N) - $start" | bc) s"
done
$TOOL verify "$WORK/out-gpu-cuda" --no-logits | tail -2
$PY - <<PY
import glob, torch
from safetensors.torch import load_file
def tensors(d):
    out = {}
    for f in sorted(glob.glob(d + "/model-*.safetensors")):
        out.update(load_file(f))
    return out
a, b = tensors("$WORK/out-gpu-cuda"), tensors("$WORK/out-gpu-cpu")
same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
print(f"cuda and cpu outputs: {len(a)} tensors, {'identical' if same else 'DIFFERENT'}")
PY
rm -rf "$WORK"/out-gpu-*
echo "== 3. LESA on Llama-3.2-1B shapes, cuda"
$PY benchmarks/lesa_benchmark.py --device cuda --epochs 2
