"""Fingerprints of what every shipped checkpoint computes, to show a refactor left them alone.

For each ``checkpoints/*.pt`` one fixed probe through the public API:

- a learned optimizer: ``learnopt.load_optimizer`` trains a fixed small MLP for 10 steps on
  fixed data; the fingerprint is the loss after each step and the final weights' sums;
- a black-box proposer: ``learnopt.blackbox.minimize`` on a fixed quadratic in its own
  dimension with its training budget; the fingerprint is the observed values;
- a VSML learner: the network's online episode (``module(x, y, num_classes, generator)``) on a
  fixed stream; the fingerprint is a slice of its logits.

    .venv/bin/python scripts/checkpoint_outputs.py --write tests/data/checkpoint_outputs.json
    .venv/bin/python scripts/checkpoint_outputs.py --check tests/data/checkpoint_outputs.json

``--check`` exits 1 naming every checkpoint whose outputs moved by more than ``--rtol``.
``tests/test_checkpoint_outputs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import learnopt  # noqa: E402

torch.set_default_dtype(torch.float32)


def _learned_optimizer(path: Path) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = learnopt.load_optimizer(str(path), model.parameters())
    out = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    out += [float(p.detach().double().sum()) for p in model.parameters()]
    return out


def _proposer(path: Path, module: torch.nn.Module) -> list[float]:
    from learnopt.blackbox import minimize

    dim = int(module.config()["dim"])
    budget = 30
    center = torch.linspace(-0.3, 0.4, dim, dtype=torch.float64).numpy()
    with warnings.catch_warnings():  # a budget shorter than some proposers' horizons is the point here
        warnings.simplefilter("ignore")
        result = minimize(lambda z: float(((z - center) ** 2).sum()), [(-1.0, 1.0)] * dim, budget=budget,
                          proposer=module)
    return [float(v) for v in result.ys]


def _vsml(module: torch.nn.Module) -> list[float]:
    config = module.config()
    features = int(config.get("num_features", 0) or 0) or 8
    classes = int(config.get("num_classes", 0) or 0) or 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, features, generator=g)
    y = torch.randint(0, classes, (2, 12), generator=g)
    from learnopt.vsml.online import online_episode

    with torch.no_grad():
        logits = online_episode(module, x, y, classes, torch.Generator().manual_seed(1))
    return [float(v) for v in logits.reshape(-1)[:48]]


def fingerprint(path: Path) -> list[float]:
    module = learnopt.load(str(path))
    kind = type(module).__module__
    if kind.startswith("learnopt.learned"):
        return _learned_optimizer(path)
    if kind.startswith("learnopt.blackbox"):
        return _proposer(path, module)
    if kind.startswith("learnopt.vsml"):
        return _vsml(module)
    raise SystemExit(f"{path}: no probe for a {type(module).__name__} ({kind})")


def fingerprints(directory: Path) -> dict[str, list[float]]:
    return {p.name: fingerprint(p) for p in sorted(directory.glob("*.pt"))}


def differences(expected: dict[str, list[float]], actual: dict[str, list[float]], rtol: float) -> list[str]:
    """One line per checkpoint whose fingerprint differs (missing, extra, or values off by more
    than ``rtol`` relative, with an absolute floor of ``rtol`` for values near zero)."""
    out = [f"{name}: no recorded fingerprint" for name in sorted(actual.keys() - expected.keys())]
    out += [f"{name}: recorded but missing" for name in sorted(expected.keys() - actual.keys())]
    for name in sorted(expected.keys() & actual.keys()):
        a, b = expected[name], actual[name]
        if len(a) != len(b):
            out.append(f"{name}: {len(b)} values, recorded {len(a)}")
            continue
        worst = max((abs(u - v) / max(abs(u), 1.0) for u, v in zip(a, b) if not (math.isnan(u) and math.isnan(v))),
                    default=0.0)
        if worst > rtol:
            out.append(f"{name}: values differ by up to {worst:.3g} (relative)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path)
    mode.add_argument("--check", type=Path)
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--rtol", type=float, default=1e-5)
    args = parser.parse_args()
    actual = fingerprints(args.checkpoints)
    if args.write:
        args.write.write_text(json.dumps(actual, indent=1) + "\n")
        print(f"wrote {len(actual)} fingerprints to {args.write}")
        return 0
    problems = differences(json.loads(args.check.read_text()), actual, args.rtol)
    for line in problems:
        print(line)
    print(f"{len(actual) - len(problems)} of {len(actual)} checkpoints compute what was recorded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
