#!/usr/bin/env bash
# The TLI paper's three-way comparison on a real model: SmolLM2-135M-Instruct grown by TLI (K = 4),
# by depth up-scaling (SOLAR-style, 36 layers) and by sparse upcycling to Mixtral (2 experts on
# every layer, top-1 and top-2), plus the base model; the same token budget of stage "new" for each
# (STEPS x 4 x 256 tokens of the Python docs). Reports held-out loss at init and after, total and
# active parameters, and tokens/s of a forward pass (the held-out pass at init).
#
#   apt-get install python3.11-doc && make setup demo
#   bash benchmarks/compare_moe.sh [STEPS]   # writes benchmarks/results/compare-moe.{md,csv,png}
. "$(dirname "$0")/smollm2_env.sh"   # strict mode, repo root, STEPS, BIN, MODEL, the data
$BIN/tli-recipe compare benchmarks/growth/{base,tli-k4,dus-36,moe-e2k1,moe-e2k2}.yaml \
  --set base_model=$MODEL --data .bench/pydocs/train.jsonl --heldout .bench/pydocs/heldout.jsonl \
  --steps "$STEPS" --stage new --sequence-length 256 --batch-size 4 --eval-sequences 48 \
  --work .bench/compare-moe --device cpu
for ext in md csv png; do cp .bench/compare-moe/compare.$ext benchmarks/results/compare-moe.$ext; done
