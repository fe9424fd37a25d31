"""The meta-test setting `ensemble` (independent copies of the network per episode, probabilities
averaged), chosen on digits' "select" seeds (meta-training data, never the meta-test sets): the
smallest of 1 / 2 / 4 / 8 within 0.05 points of the best.

    .venv/bin/python scripts/vsml_choose_ensemble.py    (run by scripts/reproduce_vsml after stage 4)
"""

from __future__ import annotations

import learnopt
from learnopt.checkpoint import update_config
from learnopt.vsml.evaluate import choose_ensemble
from tasks.online import seeded_batches, vsml_meta_test_families


def main() -> None:
    path = "checkpoints/vsml_meta.pt"
    digits = vsml_meta_test_families()["digits, unseen examples and projections"]  # the "select" seeds, not "test"
    streams = seeded_batches(digits, "select", n=32)
    size, scores = choose_ensemble(learnopt.load(path), streams)
    update_config(path, note="ensemble chosen by scripts/reproduce_vsml on digits' select seeds, 256 episodes: "
                  + ", ".join(f"{r}: {100 * s:.2f}" for r, s in scores.items()), ensemble=size)
    print(f"ensemble {size} ({scores})")


if __name__ == "__main__":
    main()
