"""Ablations of the general-purpose learned optimizer (issue 23, docs/general.md).

For the shipped rule (``configs/general.yaml``) and each ablation config (``general_no_features``,
``general_no_normalization``, ``general_lstm``): the validation score (mean log10 final training
loss of the run's 16 fixed validation instances, 500 steps) of the untrained rule, built from the
config with seed 0 as its run began, and of the run's exported best checkpoint; the validation
curve from the run's W&B offline log; with ``--suite``, the held-out suite
(``configs/evaluate_general_suite.yaml``, the rule alone, no stability runs, baselines from the
shipped checkpoint's suite cache). Writes ``docs/general/ablations.{json,md,png}``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_ablations.py --suite
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from general_checkpoint import meta_training_run  # noqa: E402

from learnopt.checkpoint import load  # noqa: E402

# name: (config, the run's exported best checkpoint, the run's W&B name)
RUNS = {
    "general": ("configs/general.yaml", "runs/general_metalr3e-4/general.pt", "general_metalr3e-4/meta-train"),
    "general_no_features": ("configs/general_no_features.yaml", "runs/general_no_features/general_no_features.pt",
                            "general_no_features/meta-train"),
    "general_no_normalization": ("configs/general_no_normalization.yaml",
                                 "runs/general_no_normalization/general_no_normalization.pt",
                                 "general_no_normalization/meta-train"),
    "general_lstm": ("configs/general_lstm.yaml", "runs/general_lstm/general_lstm.pt", "general_lstm/meta-train"),
}


def module_of(config: str):
    """The ``MetaTrainModule`` of ``config`` as ``learnopt meta-train`` builds it (seed 0), not fitted."""
    from learnopt.train.cli import TRAINER_DEFAULTS, MetaTrainCLI, MetaTrainModule

    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        cli = MetaTrainCLI(MetaTrainModule, run=False, seed_everything_default=0, trainer_defaults=TRAINER_DEFAULTS,
                           save_config_callback=None, auto_configure_optimizers=False,
                           args=["--config", str(ROOT / config), "--trainer.logger", "false"])
    finally:
        sys.argv = argv
    return cli.model


def scores(config: str, checkpoint: str) -> dict[str, float]:
    """Validation scores of the untrained rule and of ``checkpoint``'s weights in the same module."""
    module = module_of(config)
    untrained = module.validation_log10_final_loss()
    trained = load(ROOT / checkpoint)
    module.learned_optimizer.load_state_dict(trained.state_dict())
    return {"untrained": untrained, "trained": module.validation_log10_final_loss(),
            "meta_step": trained.checkpoint_metadata["validation"]["meta_step"]}


def suite(name: str, checkpoint: str, cache: str) -> dict:
    """The held-out suite's summary row of the rule alone (``learnopt evaluate --suite``)."""
    from learnopt.evaluate_suite import evaluate_suite_cli

    out = evaluate_suite_cli(["--config", str(ROOT / "configs/evaluate_general_suite.yaml"),
                              "--checkpoint", str(ROOT / checkpoint), "--orthogonalize", "false",
                              "--stability_seeds", "[]", "--out_dir", str(ROOT / "runs/suite" / f"ablation_{name}"),
                              "--baseline_cache", str(ROOT / cache)])
    [row] = out["summary"].values()
    row["log10_final"] = {p: next(iter(r["results"].values()))["mean_log10_final_loss"]
                          for p, r in out["problems"].items()}
    return row


def table(results: dict) -> str:
    lines = ["| rule | val, untrained | val, best (meta-step) | val after 100 / 200 / 300 meta-steps "
             "| suite: beats Adam 1e-3 | beats tuned Adam | beats cosine Adam | speedup IQM vs Adam |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        curve = dict(zip(*r["val_curve"]))
        early = " / ".join(f"{curve[s]:.3f}" if s in curve else "—" for s in (100, 200, 300))
        s = r.get("suite")
        cells = (f"{s['fraction_beating_adam_1e-3']:.0%} | {s['fraction_beating_adam']:.0%} | "
                 f"{s['fraction_beating_adam_cosine']:.0%} | {s['speedup_iqm_vs_adam']:.2f}") if s else "— | — | — | —"
        lines.append(f"| `{name}` | {r['untrained']:.3f} | {r['trained']:.3f} ({r['meta_step']}) | {early} | {cells} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, r in results.items():
        steps, values = r["val_curve"]
        ax.plot([0, *steps], [r["untrained"], *values], marker="o", ms=3, label=name)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation: mean log10 final loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="store_true", help="also run the held-out suite for each rule")
    parser.add_argument("--baseline-cache", default="runs/suite/metalr3e-4_step800/baselines.json")
    parser.add_argument("--wandb-dir", default="runs/wandb")
    parser.add_argument("--out", default="docs/general/ablations")
    parser.add_argument("--rules", nargs="*", choices=list(RUNS), default=list(RUNS),
                        help="the rules to (re)measure; the others keep their rows in <out>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = ROOT / args.out
    kept = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    results = {}
    for name, (config, checkpoint, run_name) in RUNS.items():
        if name not in args.rules:
            if name in kept:
                results[name] = kept[name]
            continue
        r = scores(config, checkpoint)
        steps, values = meta_training_run(ROOT / args.wandb_dir, run_name).curve("val/log10_final_loss",
                                                                                 "trainer/global_step")
        r["val_curve"] = [[round(s / 10) * 10 for s in steps], values]  # logged at global step 99 for the 100th
        if args.suite:
            r["suite"] = suite(name, checkpoint, args.baseline_cache)
        results[name] = r
        print(name, {k: v for k, v in r.items() if k != "val_curve"}, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results) + "\n")
    plot(results, out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
