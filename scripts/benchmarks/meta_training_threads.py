"""Meta-training throughput at 1 and at 2 torch threads: inner steps per second of truncated
BPTT (unroll 20, horizon 100) for the shipped LSTM on the 10-d quadratics (128 tasks) and on
the digits MLP (8 tasks), alternating 1, 2, 1, 2 threads, 8 s each. Run it beside whatever
else the machine is doing; that is the point (``learnopt meta-train --threads``).

    .venv/bin/python scripts/benchmarks/meta_training_threads.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MEASURE = r"""
import sys, time, torch
import learnopt
from learnopt.meta import TruncatedBPTT
from tasks.mlp import MLPFamily
from tasks.quadratic import QuadraticFamily

threads, problem = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(threads)
if problem == "quadratic10 (128 tasks)":
    lopt, family, n = learnopt.load("checkpoints/lstm_quadratic.pt"), QuadraticFamily(dim=10), 128
else:
    lopt, family, n = learnopt.load("checkpoints/lstm_digits_mlp.pt"), MLPFamily(hidden_sizes=(20,), batch_size=128), 8
estimator = TruncatedBPTT(family, num_tasks=n, unroll_length=20, horizon=100)
state = None
for _ in range(2):  # warm-up
    state = estimator.estimate(lopt, state).unroll_state
start, truncations = time.perf_counter(), 0
while time.perf_counter() - start < 8.0:
    state = estimator.estimate(lopt, state).unroll_state
    truncations += 1
print(truncations * 20 * n / (time.perf_counter() - start))
"""


def measure(threads: int, problem: str) -> float:
    env_threads = {"OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(threads), problem], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, **env_threads})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    print(f"load average at the start: {__import__('os').getloadavg()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| problem | threads | inner steps/s (two runs) |")
    print("|---|---|---|")
    for problem in ("quadratic10 (128 tasks)", "digits MLP (8 tasks)"):
        runs = {1: [], 2: []}
        for threads in (1, 2, 1, 2):
            runs[threads].append(measure(threads, problem))
        for threads, values in runs.items():
            print(f"| {problem} | {threads} | {', '.join(f'{v:,.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
