"""Long runs of the general-purpose learned optimizer against Adam on the same step schedule
(issue 23, docs/general.md): on one problem of the held-out suite, the shipped rule (told the run
length) at its peak step and at other peaks, and ``torch.optim.Adam`` driven by the rule's own
warm-up + cosine schedule at lr = the rule's peak. Prints the mean log10 training loss every
``--every`` steps and plots the curves.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_long_run.py --problem mlp_digits_relu_64x3 \\
        --steps 5000 --peaks 0.01 0.005
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnopt.checkpoint import load  # noqa: E402
from learnopt.evaluate import train_with_optimizer  # noqa: E402
from learnopt.evaluate_suite import ScheduledOptimizer  # noqa: E402
from learnopt.learned.general_compact import warmup_cosine  # noqa: E402
from learnopt.meta.unroll import log10_losses  # noqa: E402
from learnopt.task import seeded_generator  # noqa: E402


def problem(name: str, suite: Path):
    """The task family of the suite config's problem ``name``."""
    import importlib

    import yaml

    spec = yaml.safe_load(suite.read_text())["problems"][name]
    module, cls = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**spec.get("init_args", {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/general.pt")
    parser.add_argument("--suite", default="configs/evaluate_general_suite.yaml")
    parser.add_argument("--problem", default="mlp_digits_relu_64x3")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--peaks", type=float, nargs="*", default=[], help="other peak steps of the rule")
    parser.add_argument("--seed", type=int, default=0, help='the "test" seed')
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.png")
    args = parser.parse_args()
    family = problem(args.problem, ROOT / args.suite)
    shipped = load(ROOT / args.checkpoint)

    def rule(peak: float):
        def make(ps):
            lopt = load(ROOT / args.checkpoint)
            lopt.step_mult = peak
            return lopt.as_torch_optimizer(ps, batch_dims=1, num_steps=args.steps, check_finite=False)
        return make

    def adam(ps):
        opt = torch.optim.Adam(ps, lr=shipped.step_mult)
        schedule = lambda t: warmup_cosine(t, args.steps, shipped.warmup, shipped.final_ratio)  # noqa: E731
        return ScheduledOptimizer(opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    runs = {f"rule, peak {shipped.step_mult:g}": rule(shipped.step_mult),
            f"Adam on the rule's schedule, peak {shipped.step_mult:g}": adam,
            **{f"rule, peak {p:g}": rule(p) for p in args.peaks}}
    curves = {}
    for name, make in runs.items():
        g = seeded_generator("test", args.seed)
        losses = log10_losses(train_with_optimizer(make, family.sample(args.instances, g), args.steps, g)).mean(1)
        curves[name] = [round(float(v), 4) for v in losses]
        print(name, [round(curves[name][t], 2) for t in range(0, args.steps + 1, args.every)], flush=True)
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "curves": curves}))
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for name, c in curves.items():
            ax.plot(c, lw=1, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("mean log10 training loss")
        ax.set_title(f"{args.problem}, {args.steps} steps, test seed {args.seed}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
