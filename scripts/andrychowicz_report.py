"""The summary table of ``scripts/reproduce_andrychowicz_mlp``: one row per generalisation
test, the mean final training loss (and its mean log10) of every optimizer, the lowest in bold.

    .venv/bin/python scripts/andrychowicz_report.py docs/andrychowicz_mlp base "two_layers|..." ...

Each test's evaluation wrote ``<out>/<test>/results.json``; the table goes to ``<out>/README.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ["# Andrychowicz et al. 2016, network experiments, on digits", "",
          "Produced by `scripts/reproduce_andrychowicz_mlp`. Mean final training loss (whole training split)",
          "and mean log10 of it over 5 held-out seeds × 32 instances; baselines with learning rates tuned on",
          "separate instances. Bold: the lowest mean final loss of the row.", ""]


def summary(out: Path, tests: list[str]) -> str:
    """The markdown of ``<out>/README.md`` for the tests named (a ``name|arguments`` entry counts
    by its name)."""
    names: list[str] = []
    rows = []
    for test in (t.split("|")[0] for t in tests):
        results = json.loads((out / test / "results.json").read_text())["results"]
        names = names or list(results)
        best = min(results[n]["mean_final_loss"] for n in names)
        cells = []
        for n in names:
            value = results[n]["mean_final_loss"]
            cell = f"{value:.4f} ({results[n]['mean_log10_final_loss']:.2f})"
            cells.append(f"**{cell}**" if value == best else cell)
        rows.append(f"| {test} | " + " | ".join(cells) + " |")
    lines = HEADER + ["| test | " + " | ".join(names) + " |", "|---|" + "---|" * len(names), *rows,
                      "", "Per test: `<test>/table.md` (tuned rates, CIs), `<test>/curves.png`, "
                      "`<test>/results.json` (raw numbers)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1])
    text = summary(out, sys.argv[2:])
    (out / "README.md").write_text(text)
    print(text, end="")
