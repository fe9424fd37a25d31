"""What an evaluation produces: the per-optimizer results (``OptimizerResult``), the evaluation
with its table and speedups (``Evaluation``), its loss-curve plot, and its W&B runs in the
schema of ``learnopt.logging_schema``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from learnopt.meta.unroll import DIVERGED_LOG10, log10_losses
from learnopt.metrics import speedup, t_interval


# held-out metrics shown by ``Evaluation.table``, with their column titles
_TEST_COLUMNS = {"test_loss": "test loss", "test_accuracy": "test accuracy"}


@dataclass
class OptimizerResult:
    """One optimizer's results on the held-out instances.

    Attributes:
        name: the optimizer's name in the table.
        lr: its tuned (or fixed) learning rate; None for a learned optimizer.
        final_losses: the final loss of every instance, all test seeds.
        seed_means: the mean log10 final loss of each test seed.
        curve: the mean log10 loss per inner step over all instances.
        tuning: the tuning score of each rate tried, by rate.
        lr_at_grid_edge: whether the tuned rate is the smallest or largest of the grid.
        normalized_final_losses: ``task.normalize`` of the final losses.
        time_per_step: seconds per inner step (all instances of a seed at once), the median over seeds.
        test_metrics: the task's held-out metrics (``test_loss``, ``test_accuracy``) of every instance's
            final parameters, all test seeds, by metric; empty when the task has no test split.
    """

    name: str
    lr: float | None
    final_losses: list[float]  # per instance, all test seeds
    seed_means: list[float]  # mean log10 final loss per test seed
    curve: list[float]  # mean log10 loss per step over all instances
    tuning: dict[str, float] = field(default_factory=dict)
    lr_at_grid_edge: bool = False
    normalized_final_losses: list[float] = field(default_factory=list)  # task.normalize of final_losses
    # seconds per inner step of the evaluation loop (all instances of a seed at once), the median
    # over seeds, so the first seed's warm-up does not count
    time_per_step: float | None = None
    test_metrics: dict[str, list[float]] = field(default_factory=dict)  # per instance, all test seeds

    @property
    def log10_final(self) -> Tensor:
        """log10 of the final losses (``log10_losses``: a diverged instance counts +30)."""
        return log10_losses(torch.tensor(self.final_losses, dtype=torch.float64))

    def mean_test_metrics(self) -> dict[str, float]:
        """The mean over instances of each held-out metric.

        Returns:
            ``{metric: mean}`` for the metrics of ``test_metrics`` (inf when any value is not finite,
            as a diverged instance's test loss is); empty without them.
        """
        out = {}
        for key, values in self.test_metrics.items():
            v = torch.tensor(values, dtype=torch.float64)
            out[key] = float(v.mean()) if len(v) and bool(torch.isfinite(v).all()) else math.inf
        return out

    def summary(self) -> dict[str, float]:
        """The summary statistics of the final losses.

        Returns:
            ``mean_log10_final_loss`` and its 95% t-interval half-width ``ci95`` over instances,
            ``diverged`` (instances), ``mean_final_loss`` (inf when any is not finite),
            ``mean_log10_normalized_loss`` (None without normalized losses), ``time_per_step_s`` and,
            where the task has a test split, ``mean_test_loss`` / ``mean_test_accuracy``
            (``mean_test_metrics``).
        """
        mean, half = t_interval(self.log10_final)
        diverged = int((self.log10_final >= DIVERGED_LOG10).sum())
        finals = torch.tensor(self.final_losses, dtype=torch.float64)
        mean_loss = float(finals.mean()) if bool(torch.isfinite(finals).all()) else math.inf
        normalized = (float(log10_losses(torch.tensor(self.normalized_final_losses, dtype=torch.float64)).mean())
                      if self.normalized_final_losses else None)
        return {"mean_log10_final_loss": mean, "ci95": half, "diverged": diverged, "mean_final_loss": mean_loss,
                "mean_log10_normalized_loss": normalized, "time_per_step_s": self.time_per_step,
                **{f"mean_{k}": v for k, v in self.mean_test_metrics().items()}}


def add_test_metrics(into: dict[str, list[float]], task: Any, params: dict[str, Tensor]) -> None:
    """Append ``task.test_metrics(params)`` (per instance) to ``into``, by metric; nothing when the
    task has no ``test_metrics``.

    Args:
        into: ``{metric: values}``, extended in place.
        task: the task the parameters were trained on.
        params: its final parameters (leading instance dimension).
    """
    metrics = getattr(task, "test_metrics", None)
    if metrics is None:
        return
    for key, value in metrics(params).items():
        into.setdefault(key, []).extend(value.detach().double().cpu().tolist())


@dataclass
class Evaluation:
    """An evaluation: every optimizer's results on one task family.

    Attributes:
        task: the task family's name.
        steps: the inner steps of each run.
        num_instances: the instances per seed.
        seeds: the test seeds.
        results: one ``OptimizerResult`` per optimizer.
        checkpoint: the learned optimizer's checkpoint, if any.
    """

    task: str
    steps: int
    num_instances: int
    seeds: list[int]
    results: list[OptimizerResult]
    checkpoint: str | None = None

    def result(self, name: str) -> OptimizerResult:
        """The result of the optimizer ``name``.

        Args:
            name: its name in the table.

        Returns:
            The first result of that name.

        Raises:
            StopIteration: there is none.
        """
        return next(r for r in self.results if r.name == name)

    def adam_steps_to_match(self, r: OptimizerResult) -> int | None:
        """Steps tuned Adam needs to reach ``r``'s final mean log10 loss.

        Args:
            r: a result of this evaluation.

        Returns:
            The first step of Adam's curve at or below it; None when Adam never gets there within the
            run, or was not evaluated.
        """
        if not any(x.name == "adam" for x in self.results):
            return None
        adam = self.result("adam").curve
        target = r.curve[-1]
        return next((t for t, v in enumerate(adam) if v <= target), None)

    def speedup(self, r: OptimizerResult) -> float | None:
        """``learnopt.metrics.speedup`` of ``r``'s curve over tuned Adam's.

        Args:
            r: a result of this evaluation.

        Returns:
            The speedup, or None when Adam was not evaluated.
        """
        if not any(x.name == "adam" for x in self.results):
            return None
        return speedup(r.curve, self.result("adam").curve)

    def table(self) -> str:
        """The results as a markdown table, best mean log10 final loss first. Where some result has
        held-out metrics, a "test loss" and / or "test accuracy" column holds their means over
        instances (``"—"`` for a result without them).

        Returns:
            The table with its caption.
        """
        held_out = [k for k in _TEST_COLUMNS if any(k in r.test_metrics for r in self.results)]
        lines = [
            f"Task `{self.task}`, {self.steps} steps, {self.num_instances} instances × seeds {self.seeds} "
            "(held-out). Mean log10 final loss with 95% t-interval over instances; lower is better."
            + (" Test loss / accuracy: the final parameters on the task's test split, mean over instances."
               if held_out else ""),
            "",
            "| optimizer | tuned lr | mean log10 final loss | 95% CI | mean final loss | diverged "
            "| Adam steps to match | speedup vs Adam |" + "".join(f" {_TEST_COLUMNS[k]} |" for k in held_out),
            "|---|---|---|---|---|---|---|---|" + "---|" * len(held_out),
        ]
        for r in sorted(self.results, key=lambda r: r.summary()["mean_log10_final_loss"]):
            s = r.summary()
            lr = "—" if r.lr is None else f"{r.lr:.3g}" + (" (grid edge)" if r.lr_at_grid_edge else "")
            match = self.adam_steps_to_match(r)
            match_s = f">{self.steps}" if match is None else str(match)
            speedup = self.speedup(r)
            speedup_s = "—" if speedup is None else f"{speedup:.2f}×"
            tests = r.mean_test_metrics()
            lines.append(
                f"| {r.name} | {lr} | {s['mean_log10_final_loss']:.3f} | ±{s['ci95']:.3f} | {s['mean_final_loss']:.4g} "
                f"| {s['diverged']} | {match_s} | {speedup_s} |"
                + "".join(f" {tests[k]:.4g} |" if k in tests else " — |" for k in held_out)
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The evaluation as JSON (``results.json``), with the raw per-instance final losses.

        Returns:
            The settings and, by optimizer, its summary, rate, tuning scores, seed means, speedup,
            Adam steps to match, curve, final losses and per-instance held-out metrics (``test_metrics``).
        """
        return {
            "task": self.task, "steps": self.steps, "num_instances": self.num_instances, "seeds": self.seeds,
            "checkpoint": self.checkpoint,
            "results": {
                r.name: {**r.summary(), "lr": r.lr, "tuning": r.tuning, "seed_means": r.seed_means,
                         "speedup_vs_adam": self.speedup(r), "adam_steps_to_match": self.adam_steps_to_match(r),
                         "curve_mean_log10_loss": r.curve, "final_losses": r.final_losses,
                         "test_metrics": r.test_metrics}
                for r in self.results
            },
        }


def plot_curves(
    evaluation: Evaluation, path: str | os.PathLike, title: str | None = None, command: str | None = None
) -> Path:
    """Mean log10 loss against inner step, one line per optimizer (PNG); ``command``, the
    command that produced it, is printed under the plot.

    Args:
        evaluation: the evaluation.
        path: the PNG's path (its directory is created if missing).
        title: the plot's title (default: the task, learned vs tuned baselines).
        command: the command line.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in evaluation.results:
        label = r.name + ("" if r.lr is None else f" (lr {r.lr:.3g})")
        ax.plot(range(len(r.curve)), r.curve, label=label, lw=2 if r.lr is None else 1.2)
    ax.set_xlabel("inner step")
    ax.set_ylabel("mean log10 loss (held-out instances)")
    ax.set_title(title or f"{evaluation.task}: learned vs tuned baselines")
    ax.grid(alpha=0.3)
    ax.legend()
    if command:
        fig.text(0.01, 0.005, command, fontsize=6, color="0.4", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if command else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_wandb(evaluation: Evaluation, group: str, project: str = "learnopt", save_dir: str = "runs",
                 config: dict[str, Any] | None = None, tags: Sequence[str] = (),
                 checkpoints: dict[str, str] | None = None, plot: str | os.PathLike | None = None,
                 split: str = "test", fixed_lr: bool = False) -> list[str]:
    """Log ``evaluation`` in the schema of ``learnopt.logging_schema``: one W&B run per optimizer
    in ``group`` (job type ``evaluate``, or ``tune`` for ``split="tune"``; config: ``config``
    under ``evaluate`` and the flat ``optimizer``/``task``/``kind``/``lr``/``fixed_lr``/``split``/``seeds``
    keys; the inner-loss curve keyed by inner step; the summary metrics; for the learned optimizers
    named in ``checkpoints`` their file as an artifact), then, with more than one optimizer, a run
    ``<group>/summary`` holding the table as a W&B Table, the curves as a W&B line plot and ``plot``
    (the PNG). Offline unless W&B is set up.

    Args:
        evaluation: the evaluation.
        group: the W&B group.
        project: the W&B project.
        save_dir: the directory W&B's files go under.
        config: the evaluation's resolved configuration.
        tags: the runs' tags.
        checkpoints: the learned optimizers' checkpoint files, by name (the others are baselines).
        plot: the curves PNG for the summary run.
        split: ``"test"`` or ``"tune"``.
        fixed_lr: whether the baselines ran at a fixed rate.

    Returns:
        The run directories, the summary run's last.
    """
    from learnopt import logging_schema as ls

    checkpoints = checkpoints or {}
    base = {"evaluate": config or {}, "task": evaluation.task, "steps": evaluation.steps,
            "num_instances": evaluation.num_instances, "seeds": evaluation.seeds, "split": split}
    job_type = "tune" if split == "tune" else "evaluate"
    run_dirs, rows = [], []
    for r in evaluation.results:
        s = r.summary()
        kind = "learned" if r.name in checkpoints else "baseline"
        run = ls.init_run(job_type, group=group, tags=tags, name=f"{group}/{r.name}", project=project,
                          save_dir=save_dir, config={**base, "optimizer": r.name, "kind": kind, "lr": r.lr,
                                                     "fixed_lr": fixed_lr and kind == "baseline"})
        ls.log_inner_curve(run, r.curve)
        final = {
            ls.FINAL_LOG10: s["mean_log10_final_loss"], ls.FINAL_CI95: s["ci95"], ls.SEED_LOG10: r.seed_means,
            ls.FINAL_LOSS: s["mean_final_loss"], ls.FINAL_NORMALIZED_LOG10: s["mean_log10_normalized_loss"],
            ls.DIVERGED: s["diverged"], ls.SPEEDUP: evaluation.speedup(r),
            ls.ADAM_STEPS_TO_MATCH: evaluation.adam_steps_to_match(r), ls.TIME_PER_STEP: r.time_per_step, "lr": r.lr,
        }
        ls.log_final(run, final)
        if r.name in checkpoints:
            ls.log_checkpoint_artifact(run, checkpoints[r.name], metadata={"task": evaluation.task, **final})
        rows.append([r.name, kind, r.lr, s["mean_log10_final_loss"], s["ci95"], s["mean_log10_normalized_loss"],
                     evaluation.speedup(r), r.time_per_step])
        run_dirs.append(run.dir)
        ls.finish_run(run)
    if len(evaluation.results) > 1:
        run_dirs.append(_log_summary_run(evaluation, rows, group, project, save_dir, base, tags, plot, job_type))
    return run_dirs


def _log_summary_run(evaluation: Evaluation, rows: list[list[Any]], group: str, project: str, save_dir: str,
                     base: dict[str, Any], tags: Sequence[str], plot: str | os.PathLike | None,
                     job_type: str = "evaluate") -> str:
    """The group's table run: the evaluation table (W&B Table), overlaid curves (W&B plot), the PNG."""
    import wandb

    from learnopt import logging_schema as ls

    run = ls.init_run(job_type, group=group, tags=tags, name=f"{group}/summary", project=project,
                      save_dir=save_dir, config={**base, "kind": "summary"})
    columns = ["optimizer", "kind", "lr", "mean_log10_final_loss", "ci95", "mean_log10_normalized_loss",
               "speedup_vs_adam", "time_per_step_s"]
    table = wandb.Table(columns=columns, data=[[_plain(x) for x in row] for row in rows])
    steps = list(range(evaluation.steps + 1))
    curves = wandb.plot.line_series(
        xs=steps, ys=[r.curve for r in evaluation.results], keys=[r.name for r in evaluation.results],
        title=f"{evaluation.task}: mean log10 loss", xname="inner step",
    )
    media: dict[str, Any] = {ls.TABLE_KEY: table, ls.CURVES_PLOT_KEY: curves}
    if plot is not None and Path(plot).is_file():
        media[ls.CURVES_IMAGE_KEY] = wandb.Image(str(plot))
    run.log(media)
    run_dir = run.dir
    ls.finish_run(run)
    return run_dir


def _plain(x: Any) -> Any:
    """A table cell W&B can store (non-finite floats as None)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def check_sweep_run(num_optimizers: int, wandb_on: bool) -> None:
    """Under ``wandb agent`` every ``wandb.init`` joins the agent's one run, so a sweep run must
    evaluate exactly one optimizer.

    Args:
        num_optimizers: the optimizers the run would evaluate.
        wandb_on: whether the run logs to W&B.

    Raises:
        ValueError: under a sweep agent (``WANDB_SWEEP_ID``) with W&B on, and not one optimizer.
    """
    if wandb_on and os.environ.get("WANDB_SWEEP_ID") and num_optimizers != 1:
        raise ValueError(
            f"running under a W&B sweep agent, learnopt evaluate must evaluate one optimizer per run, got "
            f"{num_optimizers}: give one baseline (--baselines '[adam]') and no --checkpoint, or a checkpoint and "
            "--baselines '[]'"
        )
