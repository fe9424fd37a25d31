"""Meta-training as users run it, eager against ``compile_unroll=True``: one ``estimate`` (a
truncation of K inner steps and its meta-gradient) of ``TruncatedBPTT`` and ``PES``, on 10-d
quadratics, for the LSTM and the MLP learned optimizers, as ratios timed interleaved in one
process (``common.interleaved``). The compiled estimators' first call (compilation) is timed
apart. The estimates start from the same carried state each time, so every call does the same
work; both must give the same meta-gradient (largest relative difference reported).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/meta_training_estimator_compiled.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, machine, markdown_table, write_json  # noqa: E402
from learnopt.learned import CoordinatewiseLSTM, FeatureMLPOptimizer  # noqa: E402
from learnopt.meta import PES, TruncatedBPTT  # noqa: E402
from tasks.quadratic import QuadraticFamily  # noqa: E402

OPTIMIZERS = {
    "lstm": lambda: CoordinatewiseLSTM(hidden_size=20, num_layers=2, preprocess="none", output_scale=1.0),
    "mlp": lambda: FeatureMLPOptimizer(batch_dims=1),
}


def estimator(kind: str, tasks: int, k: int, **kw):
    family = QuadraticFamily(dim=10)
    if kind == "pes":
        return PES(family, num_tasks=tasks, unroll_length=k, horizon=10 * k, num_pairs=2, **kw)
    return TruncatedBPTT(family, num_tasks=tasks, unroll_length=k, horizon=10 * k, **kw)


def measure(opt: str, kind: str, tasks: int, k: int, chunk: int, repeats: int) -> dict:
    torch.manual_seed(0)
    lopt = OPTIMIZERS[opt]()
    eager, fast = estimator(kind, tasks, k), estimator(kind, tasks, k, compile_unroll=True, compile_chunk=chunk)
    start = eager.init_unroll(lopt)
    t = time.perf_counter()
    first = fast.estimate(lopt, start)
    compile_s = time.perf_counter() - t
    ref = eager.estimate(lopt, start)
    diff = max(float((first.meta_grads[n] - g).abs().max()) for n, g in ref.meta_grads.items())
    scale = max(float(g.abs().max()) for g in ref.meta_grads.values())
    secs = interleaved({"eager": lambda: eager.estimate(lopt, start), "compiled": lambda: fast.estimate(lopt, start)},
                       repeats, desc=f"{opt} {kind} {tasks} tasks")
    return {"optimizer": opt, "estimator": kind, "num_tasks": tasks, "unroll_length": k, "compile_chunk": chunk,
            "seconds": secs, "speedup": secs["eager"] / secs["compiled"], "first_call_seconds": compile_s,
            "max_relative_grad_difference": diff / scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--estimators", nargs="+", default=["truncated_bptt", "pes"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [measure(o, e, n, args.unroll, args.chunk, args.repeats)
            for o in args.optimizers for e in args.estimators for n in args.tasks]
    rows = [[r["optimizer"], r["estimator"], r["num_tasks"], f"{r['seconds']['eager'] * 1e3:.1f}",
             f"{r['seconds']['compiled'] * 1e3:.1f}", f"{r['speedup']:.2f}×", f"{r['first_call_seconds']:.0f}",
             f"{r['max_relative_grad_difference']:.1e}"] for r in runs]
    table = markdown_table(["optimizer", "estimator", "tasks", "eager ms / estimate", "compiled ms / estimate",
                            "speedup", "first call s", "meta-grad rel. diff"], rows)
    print(table)
    write_json("meta_training_estimator_compiled", {"machine": machine(), "command": " ".join(sys.argv),
                                                    "runs": runs, "table": table})


if __name__ == "__main__":
    main()
