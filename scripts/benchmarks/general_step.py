"""Drop-in step time of ``NormalizedMLPOptimizer`` (issue 23) against
``torch.optim.Adam(foreach=True)`` on an MLP of about 1M parameters, as ratios measured in one
run (interleaved medians, ``common.interleaved``).

The timed call is ``opt.step()`` alone on fixed gradients. Contenders: ``adam``; ``general``,
the rule everywhere (an untrained one: the weights do not change the time); ``general+ns``,
its composition with Newton–Schulz orthogonalization for the hidden matrices and AdamW for the
rest (``orthogonalized_learned_optimizer``); and the rule with each feature direction left out,
to show where the time goes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/general_step.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, machine, markdown_table, write_json  # noqa: E402
from learnopt.learned.general import NormalizedMLPOptimizer, orthogonalized_learned_optimizer  # noqa: E402
from learnopt.optim import as_torch_optimizer  # noqa: E402


def contenders(width: int) -> tuple[int, dict]:
    """``(parameter count, {name: step function})`` on ``Linear(width, width) -> Linear(width, width)``."""
    torch.manual_seed(0)
    models, steps = {}, {}

    def model() -> nn.Module:
        m = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        return m

    m = models["adam"] = model()
    steps["adam"] = torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True).step
    for name, directions in (("general", ("adam", "sign", "muon")), ("general, no muon feature", ("adam", "sign")),
                             ("general, adam only", ("adam",))):
        m = models[name] = model()
        steps[name] = NormalizedMLPOptimizer(directions=directions, num_steps=1000).as_torch_optimizer(
            m.named_parameters(), num_steps=1000).step
    m = models["general+ns"] = model()
    tx = orthogonalized_learned_optimizer(NormalizedMLPOptimizer(num_steps=1000))
    steps["general+ns"] = as_torch_optimizer(tx, m.named_parameters()).step
    count = sum(p.numel() for p in models["adam"].parameters())
    return count, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=707, help="707: about 1M parameters")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    count, steps = contenders(args.width)
    with torch.no_grad():
        times = interleaved(steps, args.repeats, desc=f"{count} parameters")
    rows = [[name, t * 1e3, t / times["adam"]] for name, t in times.items()]
    print(f"{count:,} parameters, {torch.get_num_threads()} thread(s)")
    print(markdown_table(["optimizer", "ms per step", "× Adam (foreach)"], rows))
    path = write_json("general_step", {"machine": machine(), "parameters": count, "seconds": times})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
