"""Whether the black-box session's numpy twin of the proposer's step pays for itself: one
proposal step of each shipped proposer for a single instance, through ``RNNProposer.step``
(torch, batch of one) and through ``NumpyStepper.step`` (what ``AskTellSession`` uses),
interleaved, medians; plus the equality of the two (max |difference| of the queries).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/numpy_stepper.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

import learnopt

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ["rnn_proposer_d2.pt", "rnn_proposer_d3.pt", "rnn_proposer_d6.pt"]


def time_calls(fn, repeats: int = 300, inner: int = 20) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def main() -> None:
    torch.set_num_threads(1)
    print("| proposer | torch step (µs) | numpy step (µs) | torch ÷ numpy | max abs difference of the queries |")
    print("|---|---|---|---|---|")
    for name in CHECKPOINTS:
        proposer = learnopt.load(ROOT / "checkpoints" / name)
        stepper = proposer.numpy_stepper()
        g = torch.Generator().manual_seed(0)
        q, d = proposer.num_queries, proposer.dim
        inp = proposer.start_input(1)
        state = proposer.initial_state(1)
        noise = torch.rand(1, q, d, generator=g, dtype=proposer.dtype) if proposer.explore else None
        with torch.no_grad():
            x_torch, _ = proposer.step(inp, state, noise)
        np_state = stepper.initial_state()
        np_noise = None if noise is None else noise[0].numpy().astype(np.float64)
        x_np, _ = stepper.step(stepper.start_input(), np_state, np_noise)
        diff = float(np.abs(x_torch[0].numpy() - x_np).max())

        def torch_step():
            with torch.no_grad():
                proposer.step(inp, state, noise)

        def numpy_step():
            stepper.step(stepper.start_input(), np_state, np_noise)

        t_torch = min(time_calls(torch_step), time_calls(torch_step))
        t_numpy = min(time_calls(numpy_step), time_calls(numpy_step))
        print(f"| {name} | {t_torch * 1e6:.1f} | {t_numpy * 1e6:.1f} | {t_torch / t_numpy:.1f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
