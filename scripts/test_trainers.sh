#!/usr/bin/env bash
# make test-trainers: the tests that run the real trainers' own code, each trainer in its own venv
# (torch pinned first, the local CPU wheel), made once under .trainers/ and reused:
#   Axolotl 0.19.0       its validate_config on every emitted config; its freezing code freezes exactly
#                        the stage's parameters (tests/training/test_emit.py, test_distributed_emit.py)
#   LLaMA-Factory 0.9.5  get_train_args and init_adapter, the same way
#   DeepSpeed 0.19.8     ZeRO-2 and ZeRO-3 in 2 CPU processes equal one process (test_distributed.py)
# Each test skips where its trainer is missing; here a skip is a failure.
# LLaMA-Factory is installed with --no-deps plus the packages its argument parsing and adapter code
# import: its metadata requires torchvision and torchaudio, whose PyPI builds are CUDA builds that fail to
# load beside the CPU torch (and a broken torchvision breaks `import transformers`); these paths import
# neither. Axolotl likewise (--no-deps, then the versions its 0.19.0 release pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
HERE=${TRAINERS:-.trainers}
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

venv() {  # venv NAME EXTRAS PIP-ARGS...: .trainers/NAME with torch first, then pip's steps, then this project
  local dir=$HERE/$1 extras=$2; shift 2
  if [ ! -f "$dir/.done" ]; then
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$TORCH"
    echo "$TORCH" > "$dir/constraints.txt"
    local step
    for step in "$@"; do  # each step one pip command (words split on purpose)
      # shellcheck disable=SC2086
      "$dir/bin/pip" install -q -c "$dir/constraints.txt" $step
    done
    "$dir/bin/pip" install -q -c "$dir/constraints.txt" -e ".$extras" pytest
    touch "$dir/.done"
  fi
  echo "$dir/bin/python"
}

AX=$(venv axolotl "" "--no-deps axolotl==0.19.0" \
  "transformers==5.16.1 peft==0.20.0 accelerate==1.13.0 datasets==4.8.4 trl==1.9.0 pydantic==2.12.5 addict colorama pillow")
LF=$(venv llamafactory "" "--no-deps llamafactory==0.9.5" \
  "transformers>=4.55,<=5.6.0 datasets>=2.16,<=4.0.0 accelerate>=1.3,<=1.11.0 peft>=0.18,<=0.18.1 trl>=0.18,<=0.24.0 omegaconf matplotlib>=3.7.0")
# DeepSpeed is an sdist: built against the venv's torch (no build isolation), with its CPU shared-memory
# communication op compiled now; left to a JIT build at first use it took 2.5-4 min here and was sometimes
# rebuilt by both ranks at once (see docs/distributed-training.md).
DS=$(DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu venv deepspeed "[train]" "--no-build-isolation deepspeed==0.19.8")

run() {  # run PYTHON FILE KEYWORD: pytest, which must pass without a skip
  local out
  out=$(OMP_NUM_THREADS=1 "$1" -m pytest -q -p no:cacheprovider -rs "$2" -k "$3" 2>&1) || { echo "$out"; exit 1; }
  echo "$3 ($2): $(echo "$out" | tail -1)"
  if echo "$out" | tail -1 | grep -q skipped; then echo "$3: skipped, the trainer did not import"; exit 1; fi
}
run "$AX" tests/training/test_emit.py axolotl_own
run "$AX" tests/training/test_distributed_emit.py axolotl_own
run "$LF" tests/training/test_emit.py llamafactory_own
run "$LF" tests/training/test_distributed_emit.py llamafactory_own
run "$DS" tests/training/test_distributed.py zero
echo "test-trainers: $(($(date +%s) - start)) s"
