#!/usr/bin/env bash
# The prepared GPU check: one short run for a lent accelerator machine.
#   1. the test suite's device-marked tests (the files that hold a `needs a CUDA device` test);
#   2. a few meta-steps of each family's config through `learnopt meta-train` on the GPU, and the
#      exported checkpoints loaded and used on the CPU (shell_check.py);
#   3. the benchmarks on CUDA, small enough to fit a 15-minute device budget.
# Results: docs/benchmarks/gpu/gpu_check.log (all printed output) and the benchmarks' *.json.
# Each step's results are copied to $OUT as soon as it ends (when the device tool provides $OUT),
# so a run cut short still returns what it finished.
# Usage (device tool, repository root):  bash scripts/benchmarks/gpu_check.sh
# STEPS="tests shell drop_in throughput memory" (the default) picks the steps; *_S their time limits.
# The accelerator image has torch, lightning, scipy and scikit-learn but not `higher`,
# `pytorch_optimizer`, `mnist1d` or `jsonargparse` (for the shell): carry their wheels in .whl/ (see
# docs/benchmarks/README.md, section 4) and this script installs them into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DEST=docs/benchmarks/gpu
mkdir -p "$DEST"
LOG=$DEST/gpu_check.log
export WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

sync_out() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/gpu" && cp "$DEST"/*.json "$LOG" "$OUT/gpu/" 2>/dev/null; fi; true; }

STEPS=" ${STEPS:-tests shell drop_in throughput memory} "
step() {  # step KEY NAME TIMEOUT CMD...: run CMD if KEY is in STEPS, log its output, keep going whatever its status
  local key=$1 name=$2 limit=$3; shift 3
  [[ $STEPS == *" $key "* ]] || return 0
  echo "== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
  sync_out
}

: > "$LOG"
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >> "$LOG" 2>&1
mapfile -t DEVICE_FILES < <(grep -l "needs a CUDA device" tests/test_*.py)
step tests "device-marked tests" "${TESTS_S:-150}" "$PY" -m pytest -m device -q -p no:cacheprovider "${DEVICE_FILES[@]}"
step shell "meta-training shell on CUDA" "${SHELL_S:-200}" "$PY" scripts/benchmarks/shell_check.py \
  --accelerator gpu --out "$DEST/shell_check.json"
step drop_in "drop-in step on CUDA" "${DROP_IN_S:-120}" "$PY" scripts/benchmarks/drop_in_step.py --device cuda \
  --repeats 20 --compile-max 0 --out gpu/drop_in_step
step throughput "meta-training throughput on CUDA" "${THROUGHPUT_S:-120}" "$PY" scripts/benchmarks/meta_training_throughput.py \
  --device cuda --repeats 3 --no-compile --out gpu/meta_training_throughput
step memory "BPTT memory on CUDA" "${MEMORY_S:-90}" "$PY" scripts/benchmarks/bptt_memory.py --device cuda --out gpu/bptt_memory
