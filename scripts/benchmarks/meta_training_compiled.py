"""Meta-training throughput, eager against compiled (``learnopt.meta.compiled``): inner steps per
second of one truncation of K inner steps on the 10-d quadratics (``--problem digits``: the
digits MLP of ``configs/lstm_digits_mlp.yaml``), for 1, 8, 32 and 128 tasks, the
coordinate-wise LSTM (the shipped checkpoint meta-trained on the problem) and the MLP learned optimizer
(``FeatureMLPOptimizer``, 1,794 meta-parameters, learned_optimization's ``MLPLOpt``):

* ``bptt``: K steps forward and the meta-backward to the learned optimizer's weights (truncated
  BPTT's work; the meta-loss is ``TruncatedBPTT``'s mean of the losses after each step);
* ``forward``: the same K steps with weights that do not require grad, what each ES/PES member
  runs (eager: the carried state detached at every step, as ``forward_truncation`` does;
  compiled: under ``torch.no_grad``, as a forward-only caller of ``compiled_inner_step`` can).

Contenders: ``eager`` (``inner_step``), ``step`` (``compiled_inner_step`` in the Python loop),
``step-autotune`` (the same with ``torch.compile(mode="max-autotune-no-cudagraphs")``:
inductor times its own GEMM kernels against the library's) and ``region<C>``
(``compiled_steps``: C consecutive steps as one compiled graph, K/C calls). All
start from the same state and must give the same meta-loss and meta-gradient (checked before
timing). Compile time (the first call, which compiles every graph a truncation needs) is
reported apart from the timings.

Two lower bounds per configuration, as fractions achieved: the matmul bound (the learned
optimizer's and the task's matmul FLOPs per coordinate × coordinates, over the rate of a 1024²
matmul) and the memory bound (the bytes a fused step must read and write at least once per
coordinate, ``bytes_per_coordinate``, over the bandwidth of a 64 MiB copy). The matmul and the
copy are timed as two more contenders in the same interleaved repetitions, so a shared
machine's load hits the bounds as it hits the contenders.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/meta_training_compiled.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learnopt  # noqa: E402
from common import ROOT, interleaved, machine, markdown_table, write_json  # noqa: E402
from learnopt.learned import CoordinatewiseLSTM, FeatureMLPOptimizer  # noqa: E402
from learnopt.meta import compiled  # noqa: E402
from learnopt.meta.compiled import compile_report, compiled_inner_step, compiled_steps  # noqa: E402
from learnopt.meta.unroll import inner_step  # noqa: E402
from learnopt.optim.base import detach_state  # noqa: E402
from learnopt.runtime import keep_freed_memory  # noqa: E402
from tasks.mlp import MLPFamily  # noqa: E402
from tasks.quadratic import QuadraticFamily  # noqa: E402

DIM = 10
AUTOTUNE = "max-autotune-no-cudagraphs"  # the step-autotune contender's torch.compile mode
# problem -> (task family, the LSTM checkpoint meta-trained on it, matmul FLOPs of the task per
# coordinate: forward and gradient, meta-backward)
PROBLEMS = {
    "quadratic": (lambda: QuadraticFamily(dim=DIM), "lstm_quadratic.pt", (4 * DIM, 2 * DIM)),
    # digits MLP, batch B = 128: each weight does 2B FLOPs forward, 4B in the gradient, 4B in the
    # meta-backward (biases counted as weights)
    "digits": (lambda: MLPFamily(hidden_sizes=(20,), batch_size=128), "lstm_digits_mlp.pt", (6 * 128, 4 * 128)),
}
OPTIMIZERS = {
    "lstm": lambda problem: learnopt.load(ROOT / "checkpoints" / PROBLEMS[problem][1]),
    "mlp": lambda problem: FeatureMLPOptimizer(batch_dims=1),
}


def matmul_flops_per_coordinate(lopt, backward: bool, problem: str = "quadratic") -> int:
    """Matmul FLOPs per coordinate per inner step: the learned optimizer's (the LSTM's layer
    matmuls with the bias column, or the MLP's layers) and the quadratic's (``W θ`` and the
    gradient ``Wᵀ r``, 2d each per coordinate). With ``backward``, the meta-backward's too: the
    weight gradient of every layer, the input gradient of every layer whose input depends on φ
    (the LSTM's first layer gets only ``dh``, its input is the detached gradient), and the
    backward of ``W θ``."""
    if isinstance(lopt, CoordinatewiseLSTM):
        hidden, inputs = lopt.hidden_size, lopt._input_rows
        forward = backward_flops = 0
        for layer in range(lopt.num_layers):
            k = inputs if layer == 0 else hidden
            forward += 2 * 4 * hidden * (1 + k + hidden)
            backward_flops += 2 * 4 * hidden * (k + hidden)  # d_weights
            backward_flops += 2 * 4 * hidden * (hidden if layer == 0 else k + hidden)  # d[x; h]
        forward += 2 * hidden
        backward_flops += 4 * hidden
    else:
        sizes = [lopt.num_features, *lopt.hidden_sizes, 2]
        forward = sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))
        backward_flops = 2 * forward  # weight and input gradients of every layer (the features depend on φ)
    task_forward, task_backward = PROBLEMS[problem][2]
    return forward + task_forward + (backward_flops + task_backward if backward else 0)


def bytes_per_coordinate(lopt, backward: bool) -> int:
    """float32 bytes a fused step must move per coordinate at least: the carried state read and
    written, the gradient and parameter read, the parameter written; with ``backward`` what the
    meta-backward reads back (LSTM: the saved gates ``4LH``, the old and new ``h, c``, their
    incoming gradients, and writes the outgoing ones; MLP: the features, the hidden activations
    and the state's gradients)."""
    if isinstance(lopt, CoordinatewiseLSTM):
        state = lopt.num_layers * lopt.hidden_size  # LH per tensor, h and c
        forward = 2 * 2 * state + 3
        extra = 4 * state + (4 * state + 4 * state + 2 * state + 2 * state) + 3
    else:
        state = len(lopt.momentum_decays) + 1
        hidden = sum(lopt.hidden_sizes)
        forward = 2 * state + 3 + 2 * lopt.num_features + hidden + 2
        extra = lopt.num_features + hidden + 2 * state + 3
    return 4 * (forward + (extra if backward else 0))


def truncation(lopt, task, params, opt_state, k: int, backward: bool, contender: str):
    """One truncation of ``k`` steps by ``contender`` (``eager``, ``step`` or ``region<C>``); returns
    the meta-loss and, with ``backward``, the meta-gradient. Without ``backward`` the eager step
    detaches the carried state before every step, as ``forward_truncation`` does, and the
    compiled ones run under ``torch.no_grad`` with parameters that do not require grad (their
    task gradient comes from ``torch.func.grad``, so no autograd graph is built at all)."""
    weights = [p for p in lopt.parameters() if p.requires_grad]
    data = torch.Generator().manual_seed(1)
    batches = [task.sample_batch(data) for _ in range(k + 1)]  # the same batches for every contender
    size = int(contender[len("region"):]) if contender.startswith("region") else 1
    inference = not backward and contender != "eager"
    losses, done = [], 0
    with torch.set_grad_enabled(not inference):
        while done < k:
            if not backward or done == 0:
                params = {n: p.detach().requires_grad_(not inference) for n, p in params.items()}
                opt_state = detach_state(opt_state)
            if contender.startswith("region"):
                rows, params, opt_state = compiled_steps(lopt, task, params, opt_state, batches[done: done + size])
                losses.extend((rows if backward else rows.detach()).unbind(0))
            else:
                step = inner_step if contender == "eager" else compiled_inner_step
                compiled.MODE = AUTOTUNE if contender == "step-autotune" else None
                loss, params, opt_state = step(lopt, task, params, opt_state, batches[done])
                compiled.MODE = None
                losses.append(loss if backward else loss.detach())
            done += min(size, k - done)
    with torch.set_grad_enabled(backward):
        terms = [loss.mean() for loss in losses[1:]] + [task.loss(params, batches[k]).mean()]
        meta_loss = torch.stack(terms).mean()
    if backward:
        return meta_loss.detach(), torch.autograd.grad(meta_loss, weights)
    return meta_loss.detach(), ()


def contenders(lopt_bptt, lopt_forward, task, params, opt_state, k: int, mode: str, regions: list[int]):
    lopt = lopt_bptt if mode == "bptt" else lopt_forward
    names = ["eager", "step", "step-autotune", *(f"region{c}" for c in regions)]
    return {c: (lambda c=c: truncation(lopt, task, params, opt_state, k, mode == "bptt", c)) for c in names}


def agreement(results: dict) -> dict[str, float]:
    """Largest relative difference to eager, of the meta-loss and of the meta-gradient."""
    loss0, grads0 = results["eager"]
    out = {}
    for name, (loss, grads) in results.items():
        diff = float((loss - loss0).abs() / loss0.abs())
        if grads:
            scale = max(float(g.abs().max()) for g in grads0)
            diff = max(diff, max(float((a - b).abs().max()) for a, b in zip(grads, grads0)) / scale)
        out[name] = diff
    return out


MATMUL_N = 1024
COPY_NUMEL = 1 << 24


def probes() -> dict:
    """The matmul and the copy whose rates give the bounds, timed beside the contenders."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    src = torch.randn(COPY_NUMEL)
    dst = torch.empty_like(src)
    return {"probe: matmul": lambda: a @ b, "probe: copy": lambda: dst.copy_(src)}


def run_config(name: str, num_tasks: int, mode: str, k: int, regions: list[int], repeats: int,
               problem: str = "quadratic") -> dict:
    torch.manual_seed(0)
    lopt = OPTIMIZERS[name](problem)
    lopt_forward = copy.deepcopy(lopt).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    task = PROBLEMS[problem][0]().sample(num_tasks, generator)
    params = task.init(generator)
    with torch.no_grad():
        opt_state = lopt.init(params)
    fns = contenders(lopt, lopt_forward, task, params, opt_state, k, mode, regions)
    compile_seconds, results = {}, {}
    for c, fn in fns.items():
        start = time.perf_counter()
        results[c] = fn()  # the first call compiles every graph this truncation needs
        compile_seconds[c] = time.perf_counter() - start
    diffs = agreement(results)
    assert max(diffs.values()) < 1e-4, diffs
    seconds = interleaved({**fns, **probes()}, repeats, warmup=1, desc=f"{name} {num_tasks} tasks {mode}")
    rate = 2 * MATMUL_N**3 / seconds.pop("probe: matmul")
    bandwidth = 2 * 4 * COPY_NUMEL / seconds.pop("probe: copy")
    per_flops = matmul_flops_per_coordinate(lopt, mode == "bptt", problem)
    coords = sum(p.numel() for p in params.values())
    flops = per_flops * coords * k
    moved = bytes_per_coordinate(lopt, mode == "bptt") * coords * k
    return {
        "problem": problem, "optimizer": name, "num_tasks": num_tasks, "mode": mode, "unroll_length": k,
        "coordinates_per_task": coords // num_tasks,
        "seconds": seconds, "inner_steps_per_second": {c: num_tasks * k / s for c, s in seconds.items()},
        "speedup_vs_eager": {c: seconds["eager"] / s for c, s in seconds.items()},
        "first_call_seconds": compile_seconds,
        "matmul_flops_per_coordinate": per_flops,
        "bytes_per_coordinate": bytes_per_coordinate(lopt, mode == "bptt"),
        "fraction_of_matmul_bound": {c: flops / rate / s for c, s in seconds.items()},
        "fraction_of_memory_bound": {c: moved / bandwidth / s for c, s in seconds.items()},
        "max_relative_difference": diffs,
        "matmul_flops_per_second": rate, "memory_bytes_per_second": bandwidth,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="quadratic", choices=list(PROBLEMS))
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--modes", nargs="+", default=["bptt", "forward"], choices=["bptt", "forward"])
    parser.add_argument("--unroll-length", type=int, default=20)
    parser.add_argument("--regions", type=int, nargs="*", default=[],
                        help="also time compiled_steps regions of these many steps (each compiles for minutes)")
    parser.add_argument("--region-tasks", type=int, nargs="*", default=[8, 128],
                        help="the task counts at which the regions are timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="meta_training_compiled")
    args = parser.parse_args(argv)
    keep_freed_memory()
    results = {"machine": machine(), "command": "OMP_NUM_THREADS=%s .venv/bin/python %s" % (
        torch.get_num_threads(), " ".join(["scripts/benchmarks/meta_training_compiled.py", *(argv or sys.argv[1:])])),
        "runs": []}
    for name in args.optimizers:
        for mode in args.modes:
            for n in args.tasks:
                regions = args.regions if n in args.region_tasks else []
                results["runs"].append(run_config(name, n, mode, args.unroll_length, regions, args.repeats,
                                                  args.problem))
                write_json(args.out, results)
    results["compile_report"] = compile_report()
    rows = []
    for r in results["runs"]:
        for c, sps in r["inner_steps_per_second"].items():
            rows.append([r["optimizer"], r["mode"], r["num_tasks"], c, sps, r["speedup_vs_eager"][c],
                         r["first_call_seconds"][c], r["fraction_of_matmul_bound"][c],
                         r["fraction_of_memory_bound"][c], r["max_relative_difference"][c]])
    table = markdown_table(["optimizer", "mode", "tasks", "contender", "inner steps / s", "× eager",
                            "first call (s)", "of matmul bound", "of memory bound", "max rel. diff."], rows)
    results["table"] = table
    rates = [r["matmul_flops_per_second"] / 1e9 for r in results["runs"]]
    print(f"matmul {min(rates):.1f}-{max(rates):.1f} GFLOP/s over the configurations")
    print(table)
    write_json(args.out, results)
    plot(results, ROOT / "docs" / "benchmarks" / f"{args.out}.png")
    return results


def plot(results: dict, path: Path) -> None:
    """Inner steps per second against task count, one panel per optimizer and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["optimizer"], r["mode"]) for r in results["runs"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    for ax, (name, mode) in zip(axes[0], panels):
        runs = sorted((r for r in results["runs"] if (r["optimizer"], r["mode"]) == (name, mode)),
                      key=lambda r: r["num_tasks"])
        for c in sorted({c for r in runs for c in r["inner_steps_per_second"]}):
            points = [(r["num_tasks"], r["inner_steps_per_second"][c])
                      for r in runs if c in r["inner_steps_per_second"]]
            ax.plot(*zip(*points), "o-", label=c)
        bound = [r["matmul_flops_per_second"] / (r["matmul_flops_per_coordinate"] * r.get("coordinates_per_task", DIM))
                 for r in runs]
        ax.plot([r["num_tasks"] for r in runs], bound, "k:", label="matmul bound")
        ax.set(xscale="log", yscale="log", xlabel="tasks", ylabel="inner steps / s", title=f"{name}, {mode}")
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, results["command"], fontsize=6, family="monospace")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
