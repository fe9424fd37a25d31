"""Score learned-optimizer checkpoints and Adam on a meta-training config's validation instances (issue 23,
``docs/general.md``): the number the run's export callback selects by, for weights the run never held (the
shipped rule, the capped rule before meta-training) and for hand-designed references on the same instances.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_validation.py --config configs/general_capped.yaml \
        --checkpoints checkpoints/general.pt runs/general_capped/general_capped.pt --untrained --adam 1e-3 1e-2

Prints one line per optimizer: the mean log10 final training loss over the config's ``val_draws`` ×
``val_tasks`` validation instances (lower is better).
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

from learnopt.checkpoint import load  # noqa: E402
from learnopt.optim.alias import adam  # noqa: E402


class Fixed(torch.nn.Module):
    """A hand-designed transform where the module expects a learned optimizer (``transform()``)."""

    def __init__(self, tx) -> None:
        super().__init__()
        self.tx = tx

    def transform(self):
        return self.tx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/general_capped.yaml")
    parser.add_argument("--checkpoints", nargs="*", default=[])
    parser.add_argument("--untrained", action="store_true", help="also the config's rule as it starts (init_from)")
    parser.add_argument("--adam", type=float, nargs="*", default=[], help="constant Adam learning rates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = module_of(args.config)
    rows = []
    if args.untrained:
        rows.append(("config's rule at meta-step 0", module.learned_optimizer))
    rows += [(c, load(ROOT / c)) for c in args.checkpoints]
    rows += [(f"Adam lr {lr:g}", Fixed(adam(lr))) for lr in args.adam]
    hp = module.hparams
    print(f"{args.config}: {hp.get('val_draws', 1)} draws x {hp.val_tasks} instances, "
          f"{module.estimator.horizon} steps")
    for name, lopt in rows:
        module.learned_optimizer = lopt
        print(f"{name}: {module.validation_log10_final_loss():.3f}", flush=True)


if __name__ == "__main__":
    main()
