"""Held-out (test-split) loss and accuracy on the general optimizer's suite (issue 23,
docs/general.md), without tuning again: every optimizer of the committed suite result
(``docs/general/suite/suite.json``) runs again on the same "test" seeds and instances, the tuned
baselines at the learning rates the suite chose, and the final parameters of each run are scored
on the problem's test split (``test_metrics`` of the task; problems without one, such as the
character LM, get training loss only). The training losses must come out as the suite's: the
largest difference is reported. Each finished problem is kept in ``--work`` and reused. A suite result
whose records already carry the test metrics (suites run since the baselines' version 2) is read as it is,
without running anything.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_held_out.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from general_long_run import problem  # noqa: E402

from learnopt.evaluate import evaluate_optimizers  # noqa: E402
from learnopt.evaluate_suite import learned_factories, suite_baselines  # noqa: E402


def run_problem(name: str, record: dict, suite: dict, config: Path, checkpoint: str) -> dict:
    """Every optimizer of ``record`` on problem ``name`` again, at its recorded learning rate."""
    steps = suite["steps"]
    makers = {**learned_factories(checkpoint, steps, orthogonalize=True), **suite_baselines(steps)}
    optimizers = {}
    for opt, r in record["results"].items():
        make = makers[opt.replace(Path(suite["checkpoint"]).stem, Path(checkpoint).stem, 1)]
        optimizers[opt] = make if r["lr"] is None else (lambda ps, make=make, lr=r["lr"]: make(ps, lr))
    evaluation = evaluate_optimizers(optimizers, problem(name, config), steps, suite["num_instances"], suite["seeds"],
                                     tune=(), progress=False)
    out = {}
    for r in evaluation.results:
        summary = r.summary()
        out[r.name] = {"lr": record["results"][r.name]["lr"], "train_log10": summary["mean_log10_final_loss"],
                       "suite_train_log10": record["results"][r.name]["mean_log10_final_loss"],
                       **r.mean_test_metrics()}
    return out


def from_record(record: dict) -> dict | None:
    """The rows of a suite record that carries each optimizer's ``test_metrics`` (None if it does not)."""
    if not all("test_metrics" in r for r in record["results"].values()):
        return None
    return {opt: {"lr": r["lr"], "train_log10": r["mean_log10_final_loss"],
                  "suite_train_log10": r["mean_log10_final_loss"], **r["test_metrics"]}
            for opt, r in record["results"].items()}


def counts(results: dict, learned: list[str]) -> str:
    """Per learned optimizer: on how many problems its test accuracy is above Adam 1e-3's, tuned Adam's and
    tuned cosine Adam's, and its test loss below tuned Adam's."""
    lines = []
    for name in learned:
        acc = [rows for rows in results.values() if "test_accuracy" in rows.get(name, {})]
        loss = [rows for rows in results.values() if "test_loss" in rows.get(name, {})]
        above = {ref: sum(rows[name]["test_accuracy"] > rows[ref]["test_accuracy"] for rows in acc)
                 for ref in ("adam_1e-3", "adam", "adam_cosine")}
        below = sum(rows[name]["test_loss"] < rows["adam"]["test_loss"] for rows in loss)
        lines.append(f"{name}: test accuracy above Adam 1e-3 / tuned Adam / tuned cosine Adam on "
                     f"{above['adam_1e-3']} / {above['adam']} / {above['adam_cosine']} of {len(acc)} problems; "
                     f"test loss below tuned Adam's on {below} of {len(loss)}")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| problem | optimizer | lr | log10 final training loss | test loss | test accuracy |",
             "|---|---|---|---|---|---|"]
    for pname, rows in results.items():
        for opt, r in sorted(rows.items(), key=lambda kv: kv[1].get("test_loss", kv[1]["train_log10"])):
            acc = f"{r['test_accuracy']:.3f}" if "test_accuracy" in r else "—"
            loss = f"{r['test_loss']:.4g}" if "test_loss" in r else "—"
            lr = "—" if r["lr"] is None else f"{r['lr']:.3g}"
            lines.append(f"| `{pname}` | {opt} | {lr} | {r['train_log10']:.3f} | {loss} | {acc} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite-result", default="docs/general/suite/suite.json")
    parser.add_argument("--config", default="configs/evaluate_general_suite.yaml")
    parser.add_argument("--checkpoint", default="checkpoints/general.pt")
    parser.add_argument("--work", default="runs/held_out", help="finished problems, reused")
    parser.add_argument("--out", default="docs/general/held_out")
    args = parser.parse_args()
    suite = json.loads((ROOT / args.suite_result).read_text())
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, record in suite["problems"].items():
        done = work / f"{name}.json"
        if (rows := from_record(record)) is not None:
            results[name] = rows
            continue
        if not done.exists():
            print(f"[held-out] {name}", file=sys.stderr, flush=True)
            rows = run_problem(name, record, suite, ROOT / args.config, str(ROOT / args.checkpoint))
            done.with_suffix(".tmp").write_text(json.dumps(rows, indent=1))
            done.with_suffix(".tmp").replace(done)
        results[name] = json.loads(done.read_text())
    gap = max(abs(r["train_log10"] - r["suite_train_log10"]) for rows in results.values() for r in rows.values())
    out = ROOT / args.out
    out.with_suffix(".json").write_text(json.dumps({"max_train_log10_difference_from_suite": gap,
                                                    "problems": results}, indent=1))
    learned = [n for n in next(iter(results.values())) if n.startswith(Path(suite["checkpoint"]).stem)]
    text = (f"Largest difference of a mean log10 final training loss from the suite's: {gap:.2g}.\n\n"
            + counts(results, learned) + "\n\n" + table(results) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
