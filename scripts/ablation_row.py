"""One row of ``scripts/ablation_quadratic``'s table: a variant's learned LSTM against tuned Adam.

    .venv/bin/python scripts/ablation_row.py docs/ablation_quadratic/log/results.json log
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(results_json: Path, name: str) -> str:
    """``| name | LSTM mean log10 final loss | ±95% half-width | tuned Adam's |`` from one
    evaluation's ``results.json`` (the LSTM is its one optimizer other than ``adam``)."""
    results = json.loads(Path(results_json).read_text())["results"]
    lstm = next(v for k, v in results.items() if k != "adam")
    return (f"| {name} | {lstm['mean_log10_final_loss']:.3f} | ±{lstm['ci95']:.3f} | "
            f"{results['adam']['mean_log10_final_loss']:.3f} |")


if __name__ == "__main__":
    print(row(Path(sys.argv[1]), sys.argv[2]))
