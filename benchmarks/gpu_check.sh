#!/usr/bin/env bash
# The CUDA path, on a machine with a GPU (about 3 minutes on one H200; nothing here runs without CUDA):
#   1. the CUDA tests: cpu and cuda runs write the same bytes (scale, noise, interpolate, random, cast);
#   2. `run` of the synthetic ~1.1B bf16 Llama with a computed policy on every injected layer
#      (and a cast of every tensor), --device cuda against --device cpu, wall time;
#   3. LESA on Llama-3.2-1B shapes on the GPU (2 epochs, scaled to the default 10);
#   4. a 2-step stage on one GPU with FSDP2 and with DeepSpeed ZeRO-3 (skipped without deepspeed),
#      each against the same stage under ddp (the stage's default): max |difference| of the trained tensors.
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
echo "== 4. a 2-step stage with FSDP2 and with ZeRO-3 on one GPU, against ddp"
$PY - <<PY
import sys; sys.path[:0] = ["tests", "tests/training"]
from pathlib import Path
from conftest import build_tiny, write_recipe
from tiny_text import add_char_tokenizer, write_text
work = Path("$WORK") / "dist"
work.mkdir(parents=True, exist_ok=True)
base = add_char_tokenizer(build_tiny(work / "base", layers=4))
data = write_text(work / "train.txt", 40)
write_recipe(work, f"base_model: {base}\ninject: {{every: 2}}\noutput: {work / 'grown'}\nstages:\n"
    f"  - name: s\n    trainable: [injected]\n    datasets: [{{path: {data}}}]\n    max_steps: 2\n"
    "    learning_rate: 0.0001\n    sequence_length: 16\n    precision: float32\n")
PY
$TOOL run "$WORK/dist/recipe.yaml" --force --no-progress > /dev/null
declare -A STRATEGIES=([ddp]=ddp [fsdp]=fsdp)
if $PY -c "import deepspeed" 2>/dev/null; then
  STRATEGIES[zero3]="{strategy: deepspeed, zero_stage: 3}"
else
  echo "deepspeed not installed: ZeRO-3 skipped (pip install deepspeed)"
fi
for name in "${!STRATEGIES[@]}"; do
  rm -rf "${WORK:?}/dist/$name"
  $PY -m torch.distributed.run --nproc_per_node 1 -m tli_recipe train "$WORK/dist/grown" --no-progress \
    --into "$WORK/dist/$name" --set "stages[*].distributed=${STRATEGIES[$name]}" 2>&1 | tail -1
done
$PY - <<PY
import glob, torch
from safetensors.torch import load_file
def tensors(d):
    out = {}
    for f in sorted(glob.glob(d + "/model*.safetensors")):
        out.update(load_file(f))
    return out
ref = tensors("$WORK/dist/ddp/s")
for d in sorted(glob.glob("$WORK/dist/*/s")):
    t = tensors(d)
    diff = max((ref[k].float() - t[k].float()).abs().max().item() for k in ref) if sorted(t) == sorted(ref) else None
    print(f"{d.split('/')[-2]}: max |difference| from ddp {diff}")
PY
