"""Probe for the general optimizer's instability (issue 23, docs/general.md): the shipped rule with
its per-tensor normalized step capped at ``cap`` times the RMS of Adam's own direction
m/sqrt(v̂) in that tensor (``CompactNormalizedOptimizer(max_amplification=cap)``, the cap's weight at 0: the
normalization may scale a noisy direction up by at most ``cap``; ``cap`` → ∞ is the rule as it is).
Prints the mean log10 training loss of suite problems ("test" seed 0, 4 instances) and the validation score
of the meta-training distribution (``configs/general.yaml``'s 16 validation instances, 500 steps).

    git show 5efc3d3:checkpoints/general.pt > /tmp/uncapped.pt
    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_cap_probe.py --caps 1 2 4 --checkpoint /tmp/uncapped.pt

It probes a rule without a cap of its own: the docs' figures are of the uncapped file shipped until
2026-12-06 19:30 UTC (commit 5efc3d3); the rule shipped since has the cap built in (``max_amplification``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from general_ablations import module_of  # noqa: E402
from general_long_run import problem  # noqa: E402

from learnopt.checkpoint import load  # noqa: E402
from learnopt.evaluate import train_with_optimizer  # noqa: E402
from learnopt.learned.general_compact import CompactNormalizedOptimizer  # noqa: E402
from learnopt.meta.unroll import log10_losses  # noqa: E402
from learnopt.task import seeded_generator  # noqa: E402

PROBLEMS = (("mlp_digits_relu_64x3", 5000), ("mlp_mnist1d_relu_128x128", 500), ("mlp_digits_relu_64x3", 500),
            ("cnn_mnist1d_8x16", 500))


def capped(cap: float, checkpoint: Path) -> CompactNormalizedOptimizer:
    """The uncapped rule of ``checkpoint`` with the cap ``cap`` (``max_amplification``, its weight at 0), the
    rule itself for ``cap`` = ∞."""
    shipped = load(checkpoint)
    if shipped.config().get("max_amplification") is not None:
        raise SystemExit(f"{checkpoint}: this rule has its own cap (max_amplification); the probe is of an "
                         "uncapped rule, e.g. git show 5efc3d3:checkpoints/general.pt")
    if cap == float("inf"):
        return shipped
    rule = CompactNormalizedOptimizer(**{**shipped.config(), "max_amplification": cap})
    rule.load_state_dict(rule.weights_from(shipped))
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", type=float, nargs="+", default=[1.0, 2.0, 4.0, float("inf")])
    parser.add_argument("--checkpoint", required=True, help="an uncapped CompactNormalizedOptimizer checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    suite = ROOT / "configs" / "evaluate_general_suite.yaml"
    module = module_of("configs/general.yaml")
    for cap in args.caps:
        module.learned_optimizer = capped(cap, ROOT / args.checkpoint)
        print(f"cap {cap:g}: validation {module.validation_log10_final_loss():.3f}", flush=True)
        for name, steps in PROBLEMS:
            def make(ps, steps=steps):
                return capped(cap, ROOT / args.checkpoint).as_torch_optimizer(ps, batch_dims=1, num_steps=steps,
                                                                              check_finite=False)
            g = seeded_generator("test", 0)
            losses = log10_losses(train_with_optimizer(make, problem(name, suite).sample(4, g), steps, g)).mean(1)
            print(f"cap {cap:g}: {name}, {steps} steps:",
                  [round(float(losses[t]), 2) for t in range(0, steps + 1, steps // 10)], flush=True)


if __name__ == "__main__":
    main()
