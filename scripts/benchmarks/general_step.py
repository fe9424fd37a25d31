"""Drop-in step time of issue 23's learned rules against ``torch.optim.Adam(foreach=True)`` on an
MLP of about 1M parameters, as ratios measured in one run (interleaved medians,
``common.interleaved``).

The timed call is ``opt.step()`` alone on fixed gradients; the rules are untrained (the weights
do not change the time). Contenders:

- ``adam``: ``torch.optim.Adam(foreach=True)``, the reference of the ``× Adam`` column;
- ``compact``: ``CompactNormalizedOptimizer``'s drop-in (``update_fast``), the shipped rule (with its cap,
  ``max_amplification``);
- ``compact, compiled``: the same with ``compile=True`` (two ``torch.compile``d loops per tensor;
  compiled before the timing, in the warm-up step);
- ``compact, reference path``: the same rule through its functional ``update``;
- ``general``: ``NormalizedMLPOptimizer`` (24 features, MLP 32-32, Newton–Schulz feature), the
  rule before the compact one;
- ``muon``: ``torch.optim.Muon`` on the two weight matrices and ``torch.optim.Adam(foreach=True)``
  on the biases, the reference of the ``× Muon`` column;
- ``compact+ns`` / ``general+ns``: each rule composed with Newton–Schulz orthogonalization for
  the hidden matrices and AdamW for the rest (``orthogonalized_learned_optimizer``); ``compact+ns``
  as the drop-in builds it (``as_torch_optimizer(..., orthogonalize=True)``: the rule's fast update),
  ``compact+ns, reference path`` with the rule's reference update.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/general_step.py [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, machine, markdown_table, write_json  # noqa: E402
from learnopt.learned.general import NormalizedMLPOptimizer, orthogonalized_learned_optimizer  # noqa: E402
from learnopt.learned.general_compact import CompactNormalizedOptimizer  # noqa: E402
from learnopt.optim import as_torch_optimizer  # noqa: E402
from learnopt.optim.torch_optimizer import TransformOptimizer  # noqa: E402

STEPS = 1000  # the run length the rules are told
SHIPPED = {"num_steps": STEPS, "max_amplification": 4.0}  # the shipped rule's configuration (its cap)


def contenders(width: int, slow: bool) -> tuple[int, dict]:
    """``(parameter count, {name: step function})`` on ``Linear(width, width) -> Linear(width, width)``;
    ``slow``: also the previous rule (``general``, ``general+ns``), hundreds of Adam steps each."""
    torch.manual_seed(0)
    steps = {}

    def model() -> nn.Module:
        m = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        return m

    m = model()
    count = sum(p.numel() for p in m.parameters())
    steps["adam"] = torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True).step
    m = model()
    steps["compact"] = CompactNormalizedOptimizer(**SHIPPED).as_torch_optimizer(
        m.named_parameters(), num_steps=STEPS).step
    m = model()
    steps["compact, compiled"] = CompactNormalizedOptimizer(**SHIPPED).as_torch_optimizer(
        m.named_parameters(), num_steps=STEPS, compile=True).step
    m = model()
    steps["compact, reference path"] = TransformOptimizer(
        CompactNormalizedOptimizer(**SHIPPED).transform(0, STEPS, fast=False), m.named_parameters()).step
    m = model()
    matrices = [p for p in m.parameters() if p.dim() == 2]
    muon = torch.optim.Muon(matrices, lr=0.02)
    vectors = torch.optim.Adam([p for p in m.parameters() if p.dim() < 2], lr=1e-3, foreach=True)
    steps["muon"] = lambda: (muon.step(), vectors.step())
    m = model()
    tx = orthogonalized_learned_optimizer(CompactNormalizedOptimizer(**SHIPPED))
    steps["compact+ns, reference path"] = as_torch_optimizer(tx, m.named_parameters()).step
    m = model()
    steps["compact+ns"] = CompactNormalizedOptimizer(**SHIPPED).as_torch_optimizer(
        m.named_parameters(), num_steps=STEPS, orthogonalize=True).step
    if slow:
        m = model()
        steps["general"] = NormalizedMLPOptimizer(num_steps=STEPS).as_torch_optimizer(
            m.named_parameters(), num_steps=STEPS).step
        m = model()
        tx = orthogonalized_learned_optimizer(NormalizedMLPOptimizer(num_steps=STEPS))
        steps["general+ns"] = as_torch_optimizer(tx, m.named_parameters()).step
    return count, steps


def interleaved_cpu(fns: dict, repeats: int) -> dict[str, float]:
    """As ``common.interleaved`` with this thread's CPU time (``time.thread_time``): on a shared
    machine the wall clock also counts the time other processes hold the core."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.thread_time()
            fn()
            times[name].append(time.thread_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=707, help="707: about 1M parameters")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-slow", action="store_true", help="leave out the previous rule (about 1 s a step)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time, for a machine shared with other work")
    args = parser.parse_args()
    count, steps = contenders(args.width, slow=not args.no_slow)
    with torch.no_grad():
        if args.clock == "cpu":
            times = interleaved_cpu(steps, args.repeats)
        else:
            times = interleaved(steps, args.repeats, desc=f"{count} parameters")
    rows = [[name, t * 1e3, t / times["adam"], t / times["muon"] if "ns" in name or name == "muon" else None]
            for name, t in times.items()]
    print(f"{count:,} parameters, {torch.get_num_threads()} thread(s), {args.clock} clock")
    print(markdown_table(["optimizer", "ms per step", "× Adam (foreach)", "× Muon"], rows))
    path = write_json("general_step", {"machine": machine(), "parameters": count, "repeats": args.repeats,
                                       "clock": args.clock, "seconds": times})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
