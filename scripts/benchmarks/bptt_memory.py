"""Peak memory of truncated BPTT per unroll step, with and without activation checkpointing.

One meta-gradient of ``TruncatedBPTT`` (the digits MLP of ``configs/lstm_digits_mlp.yaml``,
``--num-tasks`` instances, the shipped LSTM) for several truncation lengths K, each in a fresh
process: the peak memory above the process's memory before the estimate (CPU: peak resident
set size; CUDA: ``torch.cuda.max_memory_allocated``), and the time of the estimate. The slope
of peak memory against K (least squares) is the memory one unrolled step holds for the
backward pass; ``activation_checkpointing=True`` keeps only each step's inputs and outputs and
recomputes the rest during the backward pass.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/bptt_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(k: int, checkpointing: bool, num_tasks: int, device: str) -> dict:
    """In this process: one estimate with truncation length ``k``."""
    import torch

    import learnopt
    from common import ROOT
    from learnopt.meta import TruncatedBPTT
    from tasks.mlp import MLPFamily

    torch.manual_seed(0)
    lopt = learnopt.load(ROOT / "checkpoints" / "lstm_digits_mlp.pt").to(device)
    est = TruncatedBPTT(MLPFamily(hidden_sizes=(20,), batch_size=128), num_tasks=num_tasks, unroll_length=k,
                        horizon=1000, loss_transform="log", activation_checkpointing=checkpointing)
    # warm-up (K = 1): lazy imports and first-call allocations are not what is measured
    warm = TruncatedBPTT(MLPFamily(hidden_sizes=(20,), batch_size=128), num_tasks=num_tasks, unroll_length=1,
                         horizon=1000, loss_transform="log", activation_checkpointing=checkpointing)
    warm.estimate(lopt, warm.init_unroll(lopt))
    state = est.init_unroll(lopt)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    t = time.perf_counter()
    est.estimate(lopt, state)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"k": k, "checkpointing": checkpointing, "peak_bytes": peak, "seconds": time.perf_counter() - t,
            "coordinates": sum(p.numel() for p in state.params.values())}


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from common import markdown_table, machine, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--num-tasks", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bptt_memory")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1] == "1", args.num_tasks, args.device)))
        return {}
    runs = []
    jobs = [(k, ck) for k in args.lengths for ck in (False, True)]
    for k, ck in tqdm(jobs, desc="truncation lengths"):
        out = subprocess.run([sys.executable, __file__, "--num-tasks", str(args.num_tasks), "--device", args.device,
                              "--child", str(k), "1" if ck else "0"], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {"machine": machine(), "runs": runs, "command": "OMP_NUM_THREADS=%s .venv/bin/python "
               "scripts/benchmarks/bptt_memory.py %s" % (os.environ.get("OMP_NUM_THREADS", "?"),
                                                         " ".join(argv if argv is not None else sys.argv[1:]))}
    rows = []
    for ck in (False, True):
        mine = [r for r in runs if r["checkpointing"] == ck]
        per_step = slope([r["k"] for r in mine], [r["peak_bytes"] for r in mine])
        results["per_step_bytes_" + ("checkpointed" if ck else "plain")] = per_step
        for r in mine:
            rows.append(["on" if ck else "off", r["k"], r["peak_bytes"] / 2**20, r["seconds"],
                         per_step / 2**20, per_step / r["coordinates"]])
    plain, ckpt = results["per_step_bytes_plain"], results["per_step_bytes_checkpointed"]
    results["memory_ratio"] = plain / ckpt if ckpt > 0 else float("inf")
    times = {ck: sum(r["seconds"] for r in runs if r["checkpointing"] == ck) for ck in (False, True)}
    results["time_ratio_checkpointed_over_plain"] = times[True] / times[False]
    results["table"] = markdown_table(["checkpointing", "K", "peak MiB", "seconds", "MiB per unrolled step (slope)",
                                       "bytes per step per coordinate"], rows)
    print(results["table"])
    print(f"memory per unrolled step: {plain / 2**20:.1f} MiB plain, {ckpt / 2**20:.1f} MiB checkpointed "
          f"({results['memory_ratio']:.1f}× less); time ×{results['time_ratio_checkpointed_over_plain']:.2f}")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
