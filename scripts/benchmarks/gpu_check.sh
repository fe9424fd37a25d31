#!/usr/bin/env bash
# The prepared GPU check (issue 8): one short run for a lent accelerator machine.
#   1. the test suite's device-marked tests (tests/test_device.py and the other `-m device` tests);
#   2. the benchmarks on CUDA, small enough to fit a 15-minute device budget with room to rerun.
# Results: docs/benchmarks/gpu/*.json and *.txt, copied to $OUT when the device tool provides it.
# Usage (device tool, repository root):  bash scripts/benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=docs/benchmarks/gpu
mkdir -p "$DEST"
export WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$DEST/machine.txt" 2>&1
echo "== device-marked tests"
timeout 180 "$PY" -m pytest -m device -q -p no:cacheprovider 2>&1 | tail -n 30 | tee "$DEST/device_tests.txt"
echo "== drop-in step on CUDA"
timeout 200 "$PY" scripts/benchmarks/drop_in_step.py --device cuda --repeats 20 --compile-max 0 \
  --out gpu/drop_in_step 2>&1 | tail -n 12 | tee "$DEST/drop_in_step.txt"
echo "== meta-training throughput on CUDA"
timeout 200 "$PY" scripts/benchmarks/meta_training_throughput.py --device cuda --repeats 3 --no-compile \
  --out gpu/meta_training_throughput 2>&1 | tail -n 12 | tee "$DEST/meta_training_throughput.txt"
echo "== BPTT memory on CUDA"
timeout 120 "$PY" scripts/benchmarks/bptt_memory.py --device cuda --out gpu/bptt_memory 2>&1 | tail -n 12 \
  | tee "$DEST/bptt_memory.txt"
if [ -n "${OUT:-}" ]; then cp -r "$DEST" "$OUT/"; fi
