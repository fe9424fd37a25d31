"""The comparison ``learnopt compare`` prints: per task and optimizer, the pooled seeds' mean log10
final loss with its t-interval, the normalised loss, the speedup over the reference and time per
step (``Row``), and per meta-training run its progress (``MetaRow``), built from ``RunRecord``s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from learnopt import logging_schema as ls
from learnopt.metrics import speedup, t_interval
from learnopt.run_reader import RunRecord, SkippedRun, as_float, run_task

@dataclass
class Row:
    """One optimizer on one task, pooled over its runs.

    Attributes:
        task: the task's name (``run_task``).
        optimizer: the optimizer column (``row_label``).
        kind: ``"learned"`` or ``"baseline"``.
        runs: the names of the runs that provide its seeds.
        lrs: the distinct learning rates those runs used.
        seed_values: the mean log10 final loss of each seed (``"seed N"``, or ``"run ID"`` for a run
            that logged only its pooled mean).
        curve: the mean log10 inner-loss curve, the runs weighted by their seeds (cut to the shortest).
        normalized: the mean log10 normalised final loss, weighted the same way.
        time_per_step: seconds per inner step, weighted the same way.
        speedup: the speedup over the reference optimizer on the same task, steps and split.
        split: ``"test"`` or ``"tune"``.
        steps: the inner steps of the runs (None: not logged).
    """

    task: str
    optimizer: str
    kind: str
    runs: list[str]
    lrs: list[float]
    seed_values: dict[str, float]
    curve: list[float]
    normalized: float | None = None
    time_per_step: float | None = None
    speedup: float | None = None
    split: str = "test"
    steps: int | None = None

    @property
    def mean(self) -> float:
        """The mean over seeds of ``seed_values`` (NaN for none)."""
        values = list(self.seed_values.values())
        return sum(values) / len(values) if values else math.nan

    @property
    def ci95(self) -> float:
        """The 95% t-interval half-width over seeds (NaN for fewer than two)."""
        import torch

        values = list(self.seed_values.values())
        if len(values) < 2:
            return math.nan
        return t_interval(torch.tensor(values, dtype=torch.float64))[1]

    def as_dict(self) -> dict[str, Any]:
        """The row for JSON output (a single learning rate unwrapped from its list).

        Returns:
            The fields, ``mean`` and ``ci95`` under their output keys (without the curve).
        """
        return {
            "task": self.task, "steps": self.steps, "optimizer": self.optimizer, "kind": self.kind, "runs": self.runs,
            "lr": self.lrs[0] if len(self.lrs) == 1 else self.lrs, "seeds": len(self.seed_values),
            "seed_mean_log10_losses": self.seed_values, "mean_log10_final_loss": self.mean, "ci95": self.ci95,
            "mean_log10_normalized_loss": self.normalized, "speedup_vs_reference": self.speedup,
            "time_per_step_s": self.time_per_step,
        }


@dataclass
class MetaRow:
    """One meta-training run.

    Attributes:
        run: the run's name (else its id).
        group: its group.
        task: its task family (``run_task``).
        meta_steps: the meta-steps it ran (None: not logged).
        meta_loss: its last meta-loss.
        best_val: its best finite validation score.
        time_per_step: seconds per meta-step.
        checkpoint: the path of its exported checkpoint.
        curve: ``(meta-steps, meta-losses)``.
        val_curve: ``(meta-steps, validation scores)``.
    """

    run: str
    group: str
    task: str
    meta_steps: int | None
    meta_loss: float | None
    best_val: float | None
    time_per_step: float | None
    checkpoint: str | None
    curve: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    val_curve: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    def as_dict(self) -> dict[str, Any]:
        """The row for JSON output.

        Returns:
            The fields under their output keys, without the curves.
        """
        return {"run": self.run, "group": self.group, "task": self.task, "meta_steps": self.meta_steps,
                "last_meta_loss": self.meta_loss, "best_val_log10_final_loss": self.best_val,
                "time_per_meta_step_s": self.time_per_step, "checkpoint": self.checkpoint}


@dataclass
class Comparison:
    """What ``learnopt compare`` reports.

    Attributes:
        rows: one ``Row`` per task, inner steps and optimizer, sorted by task, steps and mean.
        meta_rows: one ``MetaRow`` per meta-training run.
        reference: the optimizer speedups are measured against.
        skipped: the runs read and left out (``triage_runs``).
        notes: what the reader should know (a missing reference).
        runs_read: the runs read before filtering (None: not counted).
    """

    rows: list[Row]
    meta_rows: list[MetaRow]
    reference: str
    skipped: list[SkippedRun] = field(default_factory=list)  # runs read and left out (``triage_runs``)
    notes: list[str] = field(default_factory=list)           # what the reader should know (a missing reference)
    runs_read: int | None = None                             # runs read before filtering (None: not counted)

    def to_json(self) -> dict[str, Any]:
        """The comparison as JSON.

        Returns:
            ``{"reference", "evaluation", "meta_train", "notes", "skipped"}``.
        """
        return {"reference": self.reference, "evaluation": [r.as_dict() for r in self.rows],
                "meta_train": [m.as_dict() for m in self.meta_rows], "notes": self.notes,
                "skipped": [s.as_dict() for s in self.skipped]}


def build_comparison(runs: Sequence[RunRecord], reference: str = "adam") -> Comparison:
    """Pool optimizer runs by (task, inner steps, ``row_label``) and summarise meta-training
    runs. A seed logged by several runs of one row counts once, from the last of them (runs in
    the order given); a run none of whose seeds survive adds nothing to the row's curve. The
    speedup of each row is ``speedup(row curve, reference curve)`` on the same task, steps and
    split.

    Args:
        runs: the runs to compare (optimizer runs, meta-training runs; others are ignored).
        reference: the optimizer column speedups are measured against.

    Returns:
        The ``Comparison``, with a note for each task where the reference has no run.
    """
    pooled: dict[tuple[str, int | None, str], Row] = {}
    members: dict[tuple[str, int | None, str], list[tuple[list[str], RunRecord]]] = {}
    meta_rows = []
    for run in runs:
        if run.job_type == "meta-train":
            meta_rows.append(_meta_row(run))
            continue
        optimizer = run.config.get("optimizer")
        if not optimizer or run.config.get("kind") == "summary" or ls.FINAL_LOG10 not in run.summary:
            continue
        steps = run.config.get("steps")
        key = (run_task(run), None if steps is None else int(steps), row_label(run))
        row = pooled.setdefault(key, Row(key[0], key[2], str(run.config.get("kind", "")), [], [], {}, [],
                                         split=str(run.config.get("split") or "test"), steps=key[1]))
        seed_values = run.summary.get(ls.SEED_LOG10)
        seeds = run.config.get("seeds")
        if isinstance(seed_values, list) and isinstance(seeds, list) and len(seeds) == len(seed_values):
            values = {f"seed {s}": as_float(v) for s, v in zip(seeds, seed_values)}
        else:  # a run that logged only its pooled mean counts as one seed of its own
            values = {f"run {run.id}": as_float(run.summary[ls.FINAL_LOG10])}
        for k, v in values.items():
            row.seed_values.pop(k, None)  # re-insert: the later run's value, in its place
            row.seed_values[k] = v
        members.setdefault(key, []).append((list(values), run))
    for key, row in pooled.items():
        entries = []
        for i, (seed_keys, run) in enumerate(members[key]):
            # the seeds this run still provides (a later run may have re-evaluated the others)
            later = {k for keys, _ in members[key][i + 1:] for k in keys}
            owned = [k for k in seed_keys if k not in later]
            if not owned:
                continue
            row.runs.append(run.name or run.id)
            if run.config.get("lr") is not None and float(run.config["lr"]) not in row.lrs:
                row.lrs.append(float(run.config["lr"]))
            entries.append((run.curve(ls.INNER_LOSS, ls.INNER_STEP)[1], len(owned),
                            run.summary.get(ls.FINAL_NORMALIZED_LOG10), run.summary.get(ls.TIME_PER_STEP)))
        curves = [(c, n) for c, n, _, _ in entries if c]
        if curves:
            length = min(len(c) for c, _ in curves)
            total = sum(n for _, n in curves)
            row.curve = [sum(c[t] * n for c, n in curves) / total for t in range(length)]
        row.normalized = _weighted([(x, n) for _, n, x, _ in entries if x is not None])
        row.time_per_step = _weighted([(x, n) for _, n, _, x in entries if x is not None])
    notes = []
    for (task, steps, _), row in pooled.items():
        ref = pooled.get((task, steps, reference))  # the tuned reference on the same instances
        if ref is not None and ref.curve and row.curve and row.split == ref.split:
            row.speedup = speedup(row.curve, ref.curve)
        elif ref is None and row.split == "test":
            note = (f"no {reference} run on task {task}" + ("" if steps is None else f" ({steps} steps)")
                    + ": no speedups there")
            notes += [note] if note not in notes else []
    rows = sorted(pooled.values(), key=lambda r: (r.task, r.steps or 0, r.mean))
    return Comparison(rows, meta_rows, reference, notes=notes)


def row_label(run: RunRecord) -> str:
    """The optimizer column of a run: its name, with ``@ lr X`` when the run used a fixed rate
    instead of a tuned one, and ``[tune split]`` when it scored on the tuning instances (a
    tuning sweep's runs), so such runs never pool with the held-out evaluation of the same
    optimizer.

    Args:
        run: an optimizer run (its config has ``optimizer``).

    Returns:
        The label.
    """
    label = str(run.config["optimizer"])
    if run.config.get("fixed_lr") and run.config.get("lr") is not None:
        label += f" @ lr {float(run.config['lr']):.3g}"
    split = str(run.config.get("split") or "test")
    return label if split == "test" else f"{label} [{split} split]"


def _weighted(pairs: list[tuple[Any, int]]) -> float | None:
    pairs = [(as_float(x), n) for x, n in pairs]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs) if pairs else None


def _meta_row(run: RunRecord) -> MetaRow:
    curve = run.curve(ls.META_LOSS, ls.META_STEP)
    val = run.curve(ls.VAL_LOSS, ls.META_STEP)
    finite_val = [v for v in val[1] if math.isfinite(v)]
    steps = run.summary.get("meta_steps", run.summary.get(ls.META_STEP))
    return MetaRow(
        run.name or run.id, run.group, run_task(run), None if steps is None else int(steps),
        as_float(run.summary[ls.META_LOSS]) if ls.META_LOSS in run.summary else None,
        min(finite_val) if finite_val else None,
        as_float(run.summary[ls.TIME_PER_STEP]) if ls.TIME_PER_STEP in run.summary else None,
        run.summary.get("checkpoint/path"), curve, val,
    )
