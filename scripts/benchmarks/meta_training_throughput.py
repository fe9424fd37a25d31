"""Meta-training throughput of the coordinate-wise LSTM optimizer: inner steps per second of one
truncated-BPTT meta-gradient (K inner steps forward, then the backward pass to the LSTM's
weights), learnopt against two other ways of writing the same computation:

* ``reference``: the straightforward implementation: one task at a time, one ``nn.LSTMCell``
  call per layer *per parameter tensor*, ``torch.autograd.grad`` at every inner step, and one
  meta-backward per task (the style of the original learning-to-learn code);
* ``higher``: the same unroll written with ``higher.innerloop_ctx`` (one task at a time, the
  learned optimizer plugged in through ``lopt.as_torch_optimizer``; higher builds the
  second-order graph and ``grad_callback`` detaches it, giving the same first-order
  meta-gradient);
* ``learnopt``: ``TruncatedBPTT.estimate``: every coordinate of every tensor of every task is
  a row of one matmul per LSTM layer and step; ``learnopt+compile`` the same with
  ``compile_unroll=True`` (compiled regions of 4 inner steps, ``learnopt.meta.compiled``).

All contenders start from the same carried state, see the same minibatches and must give the
same meta-gradient (checked before timing). Problems: the 10-d quadratics of
``configs/lstm_quadratic.yaml`` (128 tasks) and the digits MLP of
``configs/lstm_digits_mlp.yaml`` (8 tasks), with the shipped checkpoints' weights.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/meta_training_throughput.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learnopt  # noqa: E402
from common import ROOT, interleaved, machine, markdown_table, write_json  # noqa: E402
from learnopt.learned.preprocess import log_and_sign  # noqa: E402
from learnopt.meta import TruncatedBPTT  # noqa: E402
from learnopt.meta.es import copy_generator  # noqa: E402
from learnopt.runtime import keep_freed_memory  # noqa: E402
from tasks.mlp import MLPFamily, MLPTask  # noqa: E402
from tasks.quadratic import QuadraticFamily, QuadraticTask  # noqa: E402

PROBLEMS = {
    "quadratic10 (128 tasks)": dict(checkpoint="lstm_quadratic.pt", family=lambda: QuadraticFamily(dim=10),
                                     num_tasks=128, transform="log"),
    "digits MLP (8 tasks)": dict(checkpoint="lstm_digits_mlp.pt",
                                 family=lambda: MLPFamily(hidden_sizes=(20,), batch_size=128),
                                 num_tasks=8, transform="log"),
}


def instance(task, j: int):
    """Task instance ``j`` alone (a batch of one)."""
    if isinstance(task, QuadraticTask):
        return QuadraticTask(task.W[j: j + 1], task.y[j: j + 1], task.init_scale, task.loss_scale)
    if isinstance(task, MLPTask):
        return MLPTask(task.sizes, task.activation, task.x, task.y, task.batch_size, 1)
    raise TypeError(type(task))


def instance_batch(batch, j: int):
    return None if batch is None else tuple(b[j: j + 1] for b in batch)


def transform_fn(name: str):
    return (lambda x: torch.log(x + 1e-12)) if name == "log" else (lambda x: x)


def lstm_step(lopt, g: torch.Tensor, hc: list[tuple[torch.Tensor, torch.Tensor]]):
    """The LSTM on one parameter tensor's coordinates: one ``nn.LSTMCell`` call per layer."""
    x = log_and_sign(g, lopt.preprocess_p) if lopt.preprocess == "log_sign" else g.unsqueeze(-1)
    new = []
    for cell, (h, c) in zip(lopt.cells, hc):
        h, c = cell(x, (h, c))
        new.append((h, c))
        x = h
    return lopt.output(x).squeeze(-1) * lopt.output_scale, new


def reference_estimate(lopt, task, params, batches, k: int, transform) -> dict[str, torch.Tensor]:
    """The straightforward truncated BPTT: tasks one by one, tensors one by one."""
    n = task.num_instances
    weights = dict(lopt.named_parameters())
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    for j in range(n):
        t = instance(task, j)
        theta = {name: p[j: j + 1].detach().requires_grad_(True) for name, p in params.items()}
        hc = {name: [(p.new_zeros(p.numel(), lopt.hidden_size), p.new_zeros(p.numel(), lopt.hidden_size))
                     for _ in lopt.cells] for name, p in theta.items()}
        terms = []
        for i in range(k):
            loss = t.loss(theta, instance_batch(batches[i], j)).sum()
            grads = torch.autograd.grad(loss, list(theta.values()), retain_graph=True)
            if i > 0:
                terms.append(transform(loss))
            new = {}
            for (name, p), g in zip(theta.items(), grads):
                step, hc[name] = lstm_step(lopt, g.reshape(-1), hc[name])
                new[name] = p + step.view(p.shape)
            theta = new
        terms.append(transform(t.loss(theta, instance_batch(batches[k], j)).sum()))
        meta = torch.stack(terms).mean() / n
        for name, g in zip(weights, torch.autograd.grad(meta, list(weights.values()), allow_unused=True)):
            if g is not None:
                total[name] += g
    return total


class InstanceModule(nn.Module):
    """One task instance as an ``nn.Module`` (what ``higher`` patches): parameters are the
    instance's, ``forward(batch)`` its loss."""

    def __init__(self, task, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.task = task
        self.names = list(params)
        for name, p in params.items():
            setattr(self, name, nn.Parameter(p.detach().clone()))

    def forward(self, batch):
        return self.task.loss({n: getattr(self, n) for n in self.names}, batch).sum()


def higher_estimate(lopt, task, params, batches, k: int, transform) -> dict[str, torch.Tensor]:
    import higher

    n = task.num_instances
    weights = dict(lopt.named_parameters())
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    for j in range(n):
        model = InstanceModule(instance(task, j), {name: p[j: j + 1] for name, p in params.items()})
        opt = lopt.as_torch_optimizer(list(model.parameters()))
        terms = []
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True, track_higher_grads=True) as (f, d):
            for i in range(k):
                loss = f(instance_batch(batches[i], j))
                if i > 0:
                    terms.append(transform(loss))
                d.step(loss, grad_callback=lambda gs: [g.detach() for g in gs])  # first order, as the others
            terms.append(transform(f(instance_batch(batches[k], j))))
            meta = torch.stack(terms).mean() / n
            for name, g in zip(weights, torch.autograd.grad(meta, list(weights.values()), allow_unused=True)):
                if g is not None:
                    total[name] += g
    return total


def run_problem(name: str, spec: dict, k: int, repeats: int, with_compile: bool, device: str = "cpu") -> dict:
    lopt = learnopt.load(ROOT / "checkpoints" / spec["checkpoint"]).to(device)
    family = spec["family"]()
    n = spec["num_tasks"]
    transform = transform_fn(spec["transform"])
    est = TruncatedBPTT(family, num_tasks=n, unroll_length=k, horizon=100, loss_transform=spec["transform"])
    compiled = TruncatedBPTT(family, num_tasks=n, unroll_length=k, horizon=100, loss_transform=spec["transform"],
                             compile_unroll=True)
    start = est.init_unroll(lopt)

    def fresh():
        state = start
        return type(state)(state.task, state.params, state.opt_state, state.step, state.episode,
                           copy_generator(state.generator))

    gen = copy_generator(start.generator)
    batches = [start.task.sample_batch(gen) for _ in range(k + 1)]

    contenders = {
        "learnopt": lambda: est.estimate(lopt, fresh()).meta_grads,
        "reference": lambda: reference_estimate(lopt, start.task, start.params, batches, k, transform),
        "higher": lambda: higher_estimate(lopt, start.task, start.params, batches, k, transform),
    }
    compile_seconds = None
    if with_compile:
        t = time.perf_counter()
        compiled.estimate(lopt, fresh())
        compile_seconds = time.perf_counter() - t
        contenders["learnopt+compile"] = lambda: compiled.estimate(lopt, fresh()).meta_grads

    # same work: every contender's meta-gradient equals learnopt's
    ours = contenders["learnopt"]()
    scale = max(float(g.abs().max()) for g in ours.values())
    agreement = {}
    for other, fn in contenders.items():
        theirs = fn()
        agreement[other] = max(float((theirs[key] - g).abs().max()) for key, g in ours.items()) / scale
        assert agreement[other] < 1e-3, (other, agreement[other])

    seconds = interleaved(contenders, repeats, warmup=1, desc=name, device=device)
    steps = n * k
    return {
        "problem": name, "num_tasks": n, "unroll_length": k,
        "coordinates_per_task": sum(p[0].numel() for p in start.params.values()),
        "seconds": seconds, "inner_steps_per_second": {c: steps / s for c, s in seconds.items()},
        "speedup_vs_reference": {c: seconds["reference"] / s for c, s in seconds.items()},
        "speedup_vs_higher": {c: seconds["higher"] / s for c, s in seconds.items()},
        "max_relative_gradient_difference": agreement, "compile_seconds": compile_seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unroll-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc malloc as it is; by default the process keeps freed memory for reuse "
                             "(learnopt.runtime.keep_freed_memory, what `learnopt meta-train` applies), "
                             "for every contender")
    parser.add_argument("--out", default="meta_training_throughput")
    args = parser.parse_args(argv)
    tuned = False if args.default_allocator else keep_freed_memory()
    results = {"machine": machine(), "command": "OMP_NUM_THREADS=%s .venv/bin/python %s" % (
        torch.get_num_threads(), " ".join(["scripts/benchmarks/meta_training_throughput.py", *(argv or sys.argv[1:])])),
        "problems": [], "keep_freed_memory": tuned}
    for name in args.problems:
        spec = PROBLEMS[name]
        results["problems"].append(run_problem(name, spec, args.unroll_length, args.repeats, not args.no_compile,
                                               args.device))
    rows = []
    for r in results["problems"]:
        for c, sps in r["inner_steps_per_second"].items():
            rows.append([r["problem"], c, sps, r["speedup_vs_reference"][c], r["speedup_vs_higher"][c],
                         r["max_relative_gradient_difference"][c]])
    table = markdown_table(["problem", "implementation", "inner steps / s", "× reference", "× higher",
                            "max rel. grad. diff."], rows)
    results["table"] = table
    print(table)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
