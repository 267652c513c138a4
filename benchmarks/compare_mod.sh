#!/usr/bin/env bash
# Mixture-of-Depths ensemble tuning on a real model: SmolLM2-135M-Instruct grown by TLI (K = 4), the
# same token budget (STEPS x 4 x 256 tokens of the Python docs) for three stages "new":
#   tli-k4       the 7 injected layers (24.8M parameters), next-token loss
#   tli-k4-mod   the same layers with objective: mod over the last 3 layers (+3.5K head parameters)
#   tli-k4-lora  LoRA r = 64 on every projection of all 37 layers (24.1M parameters)
# Reports held-out loss at init and after, trainable parameters and seconds per optimizer step.
#
#   apt-get install python3.11-doc && make setup demo
#   bash benchmarks/compare_mod.sh [STEPS]   # writes benchmarks/results/compare-mod.{md,csv,png}
. "$(dirname "$0")/smollm2_env.sh"   # strict mode, repo root, STEPS, BIN, MODEL, the data
$BIN/tli-recipe compare benchmarks/growth/{tli-k4,tli-k4-mod,tli-k4-lora}.yaml \
  --set base_model=$MODEL --data .bench/pydocs/train.jsonl --heldout .bench/pydocs/heldout.jsonl \
  --steps "$STEPS" --stage new --sequence-length 256 --batch-size 4 --eval-sequences 48 \
  --work .bench/compare-mod --device cpu
for ext in md csv png; do cp .bench/compare-mod/compare.$ext benchmarks/results/compare-mod.$ext; done
