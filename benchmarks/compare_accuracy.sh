#!/usr/bin/env bash
# Downstream accuracy of growth methods on a real model, as the TLI paper measures it: the
# multiple-choice cloze task benchmarks/tasks/pydocs_cloze (400 questions from the held-out
# Python docs) scored by lm-evaluation-harness on SmolLM2-135M-Instruct and four grown models
# (TLI K=4, the same map with plain copies, DUS to 37 and to 36 layers), at init and after the
# same token budget of stage "new" (7 decoder layers train in every model).
#
#   apt-get install python3.11-doc && make setup demo && .venv/bin/pip install -e '.[eval]'
#   bash benchmarks/compare_accuracy.sh [STEPS]   # writes benchmarks/results/compare-accuracy.{md,csv,png}
. "$(dirname "$0")/smollm2_env.sh"   # strict mode, repo root, STEPS, BIN, MODEL, the data
$BIN/tli-recipe compare benchmarks/growth/{base,tli-k4,copy-k4,dus-37,dus-36}.yaml \
  --set base_model=$MODEL --data .bench/pydocs/train.jsonl --heldout .bench/pydocs/heldout.jsonl \
  --steps "$STEPS" --stage new --sequence-length 256 --batch-size 4 --eval-sequences 48 \
  --tasks benchmarks/tasks/pydocs_cloze/pydocs_cloze.yaml --work .bench/compare-accuracy --device cpu
for ext in md csv png; do cp .bench/compare-accuracy/compare.$ext benchmarks/results/compare-accuracy.$ext; done
