# Sourced by the SmolLM2-135M benchmark scripts (compare_growth.sh, compare_accuracy.sh, compare_mod.sh):
# strict mode, the repo root, the step count ($1, default 30), the venv, and the two inputs they share,
# made when missing: the SmolLM2-135M-Instruct checkpoint of `make demo` and the Python docs split.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-30}
BIN=.venv/bin
MODEL=.demo/smollm2-135m-instruct
[ -f $MODEL/config.json ] || $BIN/python scripts/make_smollm2.py $MODEL
[ -f .bench/pydocs/train.jsonl ] || $BIN/python benchmarks/prepare_pydocs.py .bench/pydocs
mkdir -p benchmarks/results
