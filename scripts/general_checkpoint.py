"""Ship the general-purpose learned optimizer of issue 23 (``docs/general.md``): copy the best
validation checkpoint of the ``configs/general.yaml`` run to ``checkpoints/general.pt``, put the
run's meta-training curves (from its W&B offline log) in the checkpoint's metadata, then run
the held-out suite (``configs/evaluate_general_suite.yaml``) and record its summary there.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_checkpoint.py            # all of it
    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_checkpoint.py --skip-suite

The shipped file of 2026-12-06 (docs/general.md) came from the meta-learning-rate 3e-4 run:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/general_checkpoint.py --run-dir runs/general_metalr3e-4 \
        --run-name general_metalr3e-4/meta-train --suite-out runs/suite/metalr3e-4_step800
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnopt.checkpoint import load, update_metadata  # noqa: E402
from learnopt.compare import RunRecord, find_run_logs, read_offline_run  # noqa: E402

CURVES = ("train/meta_loss", "train/inner_log10_loss_last", "train/pes_xi_norm", "val/log10_final_loss")


def meta_training_run(wandb_dir: Path, name: str) -> RunRecord:
    """The latest W&B offline run named ``name`` (the config's logger name) under ``wandb_dir``."""
    runs = [read_offline_run(p) for p in find_run_logs([wandb_dir])]
    runs = [r for r in runs if r.name == name and r.job_type == "meta-train"]
    if not runs:
        raise SystemExit(f"no W&B offline run named {name!r} under {wandb_dir}")
    return max(runs, key=lambda r: Path(r.path).stat().st_mtime)


def curves(run: RunRecord) -> dict[str, dict[str, list[float]]]:
    """``{metric: {"meta_step": [...], "value": [...]}}`` for the meta-training metrics in ``CURVES``."""
    out = {}
    for key in CURVES:
        steps, values = run.curve(key, "trainer/global_step")
        out[key] = {"meta_step": steps, "value": values}
    return out


def plot_curves(measured: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """One panel per metric of ``measured`` against the meta-step, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(measured), figsize=(4 * len(measured), 3.2))
    for ax, (key, c) in zip(axes, measured.items()):
        ax.plot(c["meta_step"], c["value"], marker="o" if key.startswith("val/") else None, lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("meta-step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_suite(result: dict, path: Path) -> None:
    """Per problem, each optimizer's mean log10 final training loss minus tuned Adam's (left of 0:
    better than tuned Adam), as horizontal bars, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(result["problems"])
    names = list(next(iter(result["problems"].values()))["results"])
    shown = [n for n in names if n.startswith(Path(result["checkpoint"]).stem)] + ["adam_1e-3", "adam_cosine", "muon"]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(problems) + 1.5))
    height = 0.8 / len(shown)
    for i, name in enumerate(shown):
        delta = [p["results"][name]["mean_log10_final_loss"] - p["results"]["adam"]["mean_log10_final_loss"]
                 for p in result["problems"].values()]
        ax.barh([j + i * height for j in range(len(problems))], [max(min(d, 1.5), -3.5) for d in delta],
                height=height, label=name)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(problems))], problems, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean log10 final training loss − tuned Adam's (clipped to [−3.5, 1.5]; left is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/general", help="default_root_dir of the meta-training run")
    parser.add_argument("--source", default=None, help="the run's exported checkpoint (default: RUN_DIR/general.pt)")
    parser.add_argument("--wandb-dir", default="runs/wandb")
    parser.add_argument("--run-name", default="general/meta-train", help="the W&B run's name in the config")
    parser.add_argument("--out", default="checkpoints/general.pt")
    parser.add_argument("--suite", default="configs/evaluate_general_suite.yaml")
    parser.add_argument("--suite-out", default=None, help="the suite's out_dir (default: the suite config's); "
                        "finished problems there are reused while the learned optimizer is the same")
    parser.add_argument("--plot", default="docs/general/meta_training.png", help="the meta-training curves' plot")
    parser.add_argument("--skip-suite", action="store_true")
    args = parser.parse_args()
    src, dst = ROOT / (args.source or Path(args.run_dir) / "general.pt"), ROOT / args.out
    load(src)  # validates the file before it is shipped
    shutil.copyfile(src, dst)
    run = meta_training_run(ROOT / args.wandb_dir, args.run_name)
    log = Path(run.path).resolve()
    where = str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)
    measured = curves(run)
    update_metadata(dst, meta_training_curves=measured, meta_training_wandb_run=where,
                    selected_by="best validation score (val/log10_final_loss) of the run")
    plot_curves(measured, ROOT / args.plot, title=f"{args.run_name} ({where})")
    print(f"{src} -> {dst}; curves from {run.path}; plot {args.plot}")
    if not args.skip_suite:
        from learnopt.evaluate_suite import evaluate_suite_cli

        extra = ["--out_dir", str(ROOT / args.suite_out)] if args.suite_out else []
        result = evaluate_suite_cli(["--config", str(ROOT / args.suite), "--checkpoint", str(dst),
                                     "--record_in_checkpoint", "true", *extra])
        plot_suite(result, ROOT / Path(args.plot).with_name("suite.png"))


if __name__ == "__main__":
    main()
