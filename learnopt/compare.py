"""``learnopt compare``: optimizers × tasks side by side, from W&B runs (offline or online).

Reads runs logged in the schema of ``learnopt.logging_schema`` (by ``learnopt evaluate``,
``learnopt meta-train`` and benchmark scripts) and prints one table: per task and optimizer the
mean log10 final loss with a 95% t-interval over seeds, the normalised loss, the speedup
against tuned Adam computed from the logged inner-loss curves (``speedup``), and time per step;
meta-training runs get a second table (meta-steps, last meta-loss, best validation score, time
per meta-step). Beside the table it writes overlaid loss-curve plots (PNG, one per task, and one
of meta-loss against meta-step) and an HTML page holding the table and the plots.

Offline runs are read from their ``.wandb`` transaction log (``read_offline_run``): a plain
LevelDB-style record log of ``wandb.proto`` ``Record`` messages, parsed here without the
network or a W&B process; ``backend="leet"`` reads the same log through W&B's own
``wandb leet inspect --json`` instead. Online projects (``--project entity/project``) are read
with ``wandb.Api`` and need a W&B login; without one the command stops with that reason instead
of prompting.

Which runs: only finished runs written by learnopt's logging (the ``learnopt_schema`` marker in
their config, ``logging_schema.SCHEMA_KEY``), of one W&B project (``learnopt`` unless
``--run_project`` names another; ``--all_projects`` merges them). Every other run read is listed
with its reason, in the output and on stderr: foreign (no marker), another project, running (no
exit record), crashed (a non-zero exit code), truncated (the log ends inside a record),
unreadable; ``--include_unfinished`` keeps running, crashed and truncated runs, and
``--include_foreign`` runs without the marker (from other scripts, or from a learnopt older than
the marker). When every run
read was skipped the command fails (exit 2) with the reasons, rather than print an empty table.

Seeds: a run's summary lists the mean log10 final loss of each seed it evaluated
(``SEED_LOG10``, the seeds in its config); runs of the same optimizer on the same task pool their
seeds, a seed evaluated twice counting once (the later run), so re-running an evaluation does
not narrow the interval.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from learnopt import logging_schema as ls
from learnopt.metrics import speedup, steps_to_reach, t_interval  # noqa: F401 (steps_to_reach: public here too)
from learnopt.wandb_files import RunReadError, _scan_log, _transaction_log_records, log_is_complete  # noqa: F401

# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    """What ``learnopt compare`` needs of one W&B run."""

    id: str
    name: str
    project: str
    group: str
    job_type: str
    tags: list[str]
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    path: str | None = None
    exit_code: int | None = None
    # "finished", "crashed" (non-zero exit code, or W&B's crashed/failed/killed), "running" (no
    # exit record yet), "truncated" (the log ends inside a record)
    state: str = "finished"
    truncated_at: int | None = None  # byte offset of the partial record a truncated log ends in

    def curve(self, key: str, step_key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of the history rows that hold both ``step_key`` and ``key``, sorted by step."""
        pairs = sorted((float(r[step_key]), _float(r[key])) for r in self.history if key in r and step_key in r)
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _set(target: dict[str, Any], item: Any) -> None:
    """Apply one W&B ``*Item`` (``key`` or ``nested_key`` path, ``value_json``) to ``target``."""
    path = list(item.nested_key) or [item.key]
    value = json.loads(item.value_json)
    for k in path[:-1]:
        target = target.setdefault(k, {})
    target[path[-1]] = value


def _read_with_protobuf(path: Path) -> RunRecord:
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "exit_code": None}
    meta: dict[str, Any] = {}
    payloads, run["truncated_at"] = _scan_log(path)
    for payload in payloads:
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception as e:  # noqa: BLE001 (protobuf's DecodeError)
            raise RunReadError(f"{path}: undecodable record ({e})") from e
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            meta = {"id": r.run_id, "name": r.display_name, "project": r.project, "group": r.run_group,
                    "job_type": r.job_type, "tags": list(r.tags)}
            for item in r.config.update:
                _set(run["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set(run["config"], item)
            for item in record.config.remove:
                run["config"].pop(item.key, None)
        elif kind == "summary":
            for item in record.summary.update:
                _set(run["summary"], item)
            for item in record.summary.remove:
                run["summary"].pop(item.key, None)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            run["history"].append(row)
        elif kind == "exit":
            run["exit_code"] = int(record.exit.exit_code)
    if not meta:
        raise RunReadError(f"{path}: no run record (not a W&B run log)")
    return _record(meta, run, path)


def _read_with_leet(path: Path) -> RunRecord:
    """The same reading through W&B's own ``wandb leet inspect --json`` (one JSON record a line)."""
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    proc = subprocess.run([exe, "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RunReadError(f"{path}: wandb leet inspect failed: {proc.stderr.strip()[-500:]}")
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "exit_code": None}
    meta: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            r = rec["run"]
            meta = {"id": r.get("run_id", ""), "name": r.get("display_name", ""), "project": r.get("project", ""),
                    "group": r.get("run_group", ""), "job_type": r.get("job_type", ""), "tags": r.get("tags", [])}
            run["config"].update(r.get("config", {}).get("update", {}))
        elif kind == "config":
            run["config"].update(rec["config"].get("update", {}))
        elif kind == "summary":
            run["summary"].update(rec["summary"].get("update", {}))
        elif kind == "history":
            run["history"].append(rec["history"]["item"])
        elif kind == "exit":
            run["exit_code"] = int(rec["exit"].get("exit_code", 0))
    run["truncated_at"] = _scan_log(path)[1]
    if not meta:
        raise RunReadError(f"{path}: no run record (not a W&B run log)")
    return _record(meta, run, path)


def _record(meta: dict[str, Any], run: dict[str, Any], path: Path) -> RunRecord:
    config = {k: v for k, v in run["config"].items() if k != "_wandb"}
    code, cut = run["exit_code"], run.get("truncated_at")
    if code is not None:
        state = "finished" if code == 0 else "crashed"
    else:
        state = "truncated" if cut is not None else "running"
    return RunRecord(meta["id"], meta["name"], meta["project"], meta["group"], meta["job_type"], meta["tags"],
                     config, run["summary"], run["history"], str(path.parent), code, state, cut)


def read_offline_run(path: str | os.PathLike, backend: str = "python") -> RunRecord:
    """Read one offline (or synced) run: its directory or its ``.wandb`` file.
    ``backend``: ``"python"`` (parse the transaction log here) or ``"leet"`` (W&B's
    ``wandb leet inspect --json``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if not files:
            raise RunReadError(f"{path}: no .wandb transaction log in this run directory")
        path = files[0]
    if not path.is_file():
        raise RunReadError(f"{path}: no such run file or directory")
    if backend == "python":
        return _read_with_protobuf(path)
    if backend == "leet":
        return _read_with_leet(path)
    raise ValueError(f"backend must be 'python' or 'leet', got {backend!r}")


def find_run_logs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The ``.wandb`` files under ``paths``: run directories, ``wandb/`` folders, folders that
    hold a ``wandb/`` folder (``runs/``), or ``.wandb`` files. A path with none is an error."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".wandb":
            logs = [p]
        elif p.is_dir():
            logs = sorted(p.glob("*.wandb")) or sorted(p.glob("*run-*/*.wandb"))
            logs = logs or sorted(p.glob("wandb/*run-*/*.wandb"))
        else:
            raise RunReadError(f"{p}: no such W&B run directory, wandb/ folder or .wandb file")
        if not logs:
            raise RunReadError(f"{p}: holds no W&B runs (looked for *.wandb, */run-*/*.wandb, wandb/*run-*/*.wandb)")
        found += [f for f in logs if f not in found]
    return found


def read_online_runs(project: str, groups: Sequence[str] = (), tags: Sequence[str] = (),
                     timeout: int = 30) -> list[RunRecord]:
    """Runs of the online project ``entity/project`` through ``wandb.Api`` (needs a login; a
    missing one is an error, never a prompt)."""
    if not ls.logged_in():
        raise RuntimeError(
            f"reading the online W&B project {project!r} needs a W&B login (`wandb login` or WANDB_API_KEY); "
            "to compare offline runs, pass their directories or a wandb/ folder instead"
        )
    import wandb

    filters: dict[str, Any] = {}
    if groups:
        filters["group"] = {"$in": list(groups)}
    if tags:
        filters["tags"] = {"$all": list(tags)}
    api = wandb.Api(timeout=timeout)
    records = []
    for run in api.runs(project, filters=filters or None):
        history = list(run.scan_history(keys=None))
        state = str(getattr(run, "state", "finished") or "finished")
        records.append(RunRecord(run.id, run.name, project, run.group or "", run.job_type or "", list(run.tags),
                                 {k: v for k, v in run.config.items() if not k.startswith("_")},
                                 dict(run.summary._json_dict), history, run.url, None,
                                 state if state in ("finished", "running") else "crashed"))
    return records


@dataclass
class SkippedRun:
    """A run ``learnopt compare`` read but left out, and why."""

    path: str
    run: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "run": self.run, "reason": self.reason}


def skip_reason(run: RunRecord, include_unfinished: bool = False, include_foreign: bool = False) -> str | None:
    """Why ``run`` must not be compared (None: it may be): unless ``include_foreign``, not
    written by learnopt's logging (no ``ls.SCHEMA_KEY`` in its config); unless
    ``include_unfinished``, not finished."""
    if ls.SCHEMA_KEY not in run.config and not include_foreign:
        return (f"foreign: no {ls.SCHEMA_KEY} marker in its config: not written by learnopt's W&B logging (or by a "
                "learnopt older than the marker), so its keys may mean something else; --include_foreign compares "
                "it anyway")
    if include_unfinished or run.state == "finished":
        return None
    if run.state == "truncated":
        return (f"truncated: its log ends inside a record at byte {run.truncated_at} (cut while being written or "
                "copied); --include_unfinished compares what it holds")
    if run.state == "running":
        return ("running: its log has no exit record yet (still being written, or its writer was killed); "
                "--include_unfinished compares what it holds")
    code = f"exit code {run.exit_code}" if run.exit_code is not None else "W&B marked it crashed or failed"
    return f"crashed ({code}); --include_unfinished compares what it holds"


def triage_runs(runs: Sequence[RunRecord], project: str | None = None, all_projects: bool = False,
                include_unfinished: bool = False, include_foreign: bool = False
                ) -> tuple[list[RunRecord], list[SkippedRun], str | None]:
    """Split runs into those to compare and those skipped with the reason (``skip_reason``, or
    another W&B project). Runs of one project are compared: ``project`` if given, else
    ``ls.PROJECT`` if any run is in it, else the only project there is (several and none
    chosen is an error); ``all_projects`` merges them. Returns the runs kept, the runs
    skipped and the project compared (None with ``all_projects``)."""
    kept, skipped = [], []
    for run in runs:
        reason = skip_reason(run, include_unfinished, include_foreign)
        if reason is None:
            kept.append(run)
        else:
            skipped.append(SkippedRun(run.path or "", run.name or run.id, reason))
    if all_projects:
        return kept, skipped, None
    if project is None:
        counts: dict[str, int] = {}
        for run in kept:
            counts[run.project] = counts.get(run.project, 0) + 1
        if ls.PROJECT in counts or not counts:
            project = ls.PROJECT
        elif len(counts) == 1:
            project = next(iter(counts))
        else:
            listed = ", ".join(f"{name!r} ({n} runs)" for name, n in sorted(counts.items()))
            raise RunReadError(f"the runs belong to several W&B projects, {listed}: choose one with --run_project NAME, "
                               "or merge them with --all_projects")
    ours = [r for r in kept if r.project == project]
    skipped += [SkippedRun(r.path or "", r.name or r.id,
                           f"other project {r.project!r} (comparing {project!r}; --run_project {r.project} or "
                           "--all_projects to include it)") for r in kept if r.project != project]
    return ours, skipped, project


def select_runs(runs: Iterable[RunRecord], groups: Sequence[str] = (), tags: Sequence[str] = (),
                tasks: Sequence[str] = (), job_types: Sequence[str] = ()) -> list[RunRecord]:
    """Runs in any of ``groups``, carrying all of ``tags``, on any of ``tasks`` (the config's
    ``task``; meta-training runs match by their task family), of any of ``job_types``."""
    out = []
    for r in runs:
        if groups and r.group not in groups:
            continue
        if tags and not set(tags) <= set(r.tags):
            continue
        if tasks and run_task(r) not in tasks:
            continue
        if job_types and r.job_type not in job_types:
            continue
        out.append(r)
    return out


def run_task(run: RunRecord) -> str:
    """The task a run is about: ``config["task"]``, or for meta-training the task family's class
    name with its ``dim``/``distribution`` if given."""
    if run.config.get("task"):
        return str(run.config["task"])
    family = ((run.config.get("cli") or {}).get("model") or {}).get("task_family") or {}
    if isinstance(family, dict) and family.get("class_path"):
        name = family["class_path"].rsplit(".", 1)[-1]
        args = family.get("init_args") or {}
        extra = "".join(f" {k}={args[k]}" for k in ("dim", "distribution") if k in args)
        return name + extra
    return "?"


# --------------------------------------------------------------------------- the comparison


@dataclass
class Row:
    """One optimizer on one task, pooled over its runs."""

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
        values = list(self.seed_values.values())
        return sum(values) / len(values) if values else math.nan

    @property
    def ci95(self) -> float:
        import torch

        values = list(self.seed_values.values())
        if len(values) < 2:
            return math.nan
        return t_interval(torch.tensor(values, dtype=torch.float64))[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "steps": self.steps, "optimizer": self.optimizer, "kind": self.kind, "runs": self.runs,
            "lr": self.lrs[0] if len(self.lrs) == 1 else self.lrs, "seeds": len(self.seed_values),
            "seed_mean_log10_losses": self.seed_values, "mean_log10_final_loss": self.mean, "ci95": self.ci95,
            "mean_log10_normalized_loss": self.normalized, "speedup_vs_reference": self.speedup,
            "time_per_step_s": self.time_per_step,
        }


@dataclass
class MetaRow:
    """One meta-training run."""

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
        return {"run": self.run, "group": self.group, "task": self.task, "meta_steps": self.meta_steps,
                "last_meta_loss": self.meta_loss, "best_val_log10_final_loss": self.best_val,
                "time_per_meta_step_s": self.time_per_step, "checkpoint": self.checkpoint}


@dataclass
class Comparison:
    rows: list[Row]
    meta_rows: list[MetaRow]
    reference: str
    skipped: list[SkippedRun] = field(default_factory=list)  # runs read and left out (``triage_runs``)
    notes: list[str] = field(default_factory=list)           # what the reader should know (a missing reference)
    runs_read: int | None = None                             # runs read before filtering (None: not counted)

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "evaluation": [r.as_dict() for r in self.rows],
                "meta_train": [m.as_dict() for m in self.meta_rows], "notes": self.notes,
                "skipped": [s.as_dict() for s in self.skipped]}


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def build_comparison(runs: Sequence[RunRecord], reference: str = "adam") -> Comparison:
    """Pool optimizer runs by (task, inner steps, ``row_label``) and summarise meta-training
    runs. A seed logged by several runs of one row counts once, from the last of them (runs in
    the order given); a run none of whose seeds survive adds nothing to the row's curve. The
    speedup of each row is ``speedup(row curve, reference curve)`` on the same task, steps and
    split."""
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
            values = {f"seed {s}": _float(v) for s, v in zip(seeds, seed_values)}
        else:  # a run that logged only its pooled mean counts as one seed of its own
            values = {f"run {run.id}": _float(run.summary[ls.FINAL_LOG10])}
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
    optimizer."""
    label = str(run.config["optimizer"])
    if run.config.get("fixed_lr") and run.config.get("lr") is not None:
        label += f" @ lr {float(run.config['lr']):.3g}"
    split = str(run.config.get("split") or "test")
    return label if split == "test" else f"{label} [{split} split]"


def _weighted(pairs: list[tuple[Any, int]]) -> float | None:
    pairs = [(_float(x), n) for x, n in pairs]
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs) if pairs else None


def _meta_row(run: RunRecord) -> MetaRow:
    curve = run.curve(ls.META_LOSS, ls.META_STEP)
    val = run.curve(ls.VAL_LOSS, ls.META_STEP)
    finite_val = [v for v in val[1] if math.isfinite(v)]
    steps = run.summary.get("meta_steps", run.summary.get(ls.META_STEP))
    return MetaRow(
        run.name or run.id, run.group, run_task(run), None if steps is None else int(steps),
        _float(run.summary[ls.META_LOSS]) if ls.META_LOSS in run.summary else None,
        min(finite_val) if finite_val else None,
        _float(run.summary[ls.TIME_PER_STEP]) if ls.TIME_PER_STEP in run.summary else None,
        run.summary.get("checkpoint/path"), curve, val,
    )


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


def _lr(row: Row) -> str:
    if not row.lrs:
        return "—"
    return ", ".join(f"{x:.3g}" for x in row.lrs)


EVAL_COLUMNS = ["task", "steps", "optimizer", "tuned lr", "seeds", "mean log10 final loss", "95% CI (seeds)",
                "log10 normalised loss", "speedup vs {ref}", "time/step (ms)", "runs"]
META_COLUMNS = ["run", "group", "task", "meta-steps", "last meta-loss", "best val log10 final loss",
                "time/meta-step (s)", "checkpoint"]


def _eval_cells(c: Comparison) -> list[list[str]]:
    return [[r.task, "—" if r.steps is None else str(r.steps), r.optimizer, _lr(r), str(len(r.seed_values)), _fmt(r.mean), "±" + _fmt(r.ci95),
             _fmt(r.normalized), _fmt(r.speedup, ".2f") + ("×" if r.speedup is not None else ""),
             _fmt(None if r.time_per_step is None else 1000 * r.time_per_step, ".3g"), str(len(r.runs))]
            for r in c.rows]


def _meta_cells(c: Comparison) -> list[list[str]]:
    return [[m.run, m.group, m.task, "—" if m.meta_steps is None else str(m.meta_steps), _fmt(m.meta_loss, ".4g"),
             _fmt(m.best_val), _fmt(m.time_per_step, ".3g"), m.checkpoint or "—"] for m in c.meta_rows]


def format_markdown(c: Comparison) -> str:
    """Both tables as GitHub markdown."""
    parts = []
    if c.rows:
        head = [h.format(ref=c.reference) for h in EVAL_COLUMNS]
        parts += [
            f"Mean log10 final loss over held-out instances, 95% t-interval over seeds; speedup: steps tuned "
            f"{c.reference} needs ÷ steps the optimizer needs to reach the worse of their final losses "
            "(learnopt.compare.speedup).", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(cells) + " |" for cells in _eval_cells(c)),
        ]
    if c.meta_rows:
        parts += ["", "Meta-training runs:", "", "| " + " | ".join(META_COLUMNS) + " |", "|" + "---|" * len(META_COLUMNS),
                  *("| " + " | ".join(cells) + " |" for cells in _meta_cells(c))]
    if not parts:
        read = "" if c.runs_read is None else (f" ({c.runs_read} runs read, {len(c.skipped)} skipped below; none of "
                                                "the others passes --group, --tag, --task and --job_type)")
        parts = [f"no runs matched{read}"]
    if c.notes:
        parts += ["", *(f"Note: {n}." for n in c.notes)]
    if c.skipped:
        parts += ["", f"Skipped runs ({len(c.skipped)}):", "", *(f"- {s.path or s.run}: {s.reason}" for s in c.skipped)]
    return "\n".join(parts).strip()


def format_csv(c: Comparison) -> str:
    """The evaluation rows as CSV (full precision); meta-training rows follow after a blank line."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if c.rows:
        fields = ["task", "steps", "optimizer", "kind", "lr", "seeds", "mean_log10_final_loss", "ci95",
                  "mean_log10_normalized_loss", "speedup_vs_reference", "time_per_step_s", "runs"]
        writer.writerow(fields)
        for r in c.rows:
            d = r.as_dict()
            writer.writerow([d["task"], d["steps"], d["optimizer"], d["kind"], _lr(r), d["seeds"], d["mean_log10_final_loss"],
                             d["ci95"], d["mean_log10_normalized_loss"], d["speedup_vs_reference"],
                             d["time_per_step_s"], ";".join(d["runs"])])
    if c.meta_rows:
        if c.rows:
            buf.write("\n")
        fields = list(c.meta_rows[0].as_dict())
        writer.writerow(fields)
        for m in c.meta_rows:
            writer.writerow([m.as_dict()[f] for f in fields])
    return buf.getvalue().rstrip("\n")


def format_comparison(c: Comparison, fmt: str) -> str:
    if fmt == "markdown":
        return format_markdown(c)
    if fmt == "csv":
        return format_csv(c)
    if fmt == "json":
        return json.dumps(_strict_json(c.to_json()), indent=1)
    raise ValueError(f"format must be markdown, csv or json, got {fmt!r}")


def _strict_json(value: Any) -> Any:
    """Standard JSON has no NaN or infinity: NaN (no interval from one seed) becomes null, an
    infinite speedup the string ``"inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return value


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _footer(fig: Any, command: str | None) -> None:
    if command:
        fig.text(0.01, 0.005, command, fontsize=6, color="0.4", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if command else 0, 1, 1))


def plot_comparison(c: Comparison, out_dir: str | os.PathLike, command: str | None = None) -> list[Path]:
    """One PNG per task and step count (mean log10 loss against inner step, one line per
    optimizer, the reference dashed; ``curves_<task>.png``, ``curves_<task>_<steps>.png`` where a
    task was run for several step counts) and one of meta-loss and validation score against
    meta-step (``meta_train.png``)."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = list(dict.fromkeys((r.task, r.steps, r.split) for r in c.rows))
    for task, steps, split in panels:
        rows = [r for r in c.rows if (r.task, r.steps, r.split) == (task, steps, split) and r.curve]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in rows:
            label = f"{r.optimizer}" + (f" (lr {_lr(r)})" if r.lrs else "") + (
                f", {r.speedup:.2f}×" if r.speedup is not None and math.isfinite(r.speedup) else "")
            ax.plot(range(len(r.curve)), r.curve, label=label, lw=1.2 if r.lrs else 2,
                    ls="--" if r.optimizer == c.reference else "-")
        ax.set_xlabel("inner step")
        ax.set_ylabel("mean log10 loss (held-out instances)" if rows[0].split == "test"
                      else f"mean log10 loss ({rows[0].split} instances)")
        ax.set_title(f"{task}: speedup vs tuned {c.reference} in the legend")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _footer(fig, command)
        several = len({st for t, st, _ in panels if t == task}) > 1
        name = f"curves_{_slug(task)}" + (f"_{steps}" if several else "") + ("" if split == "test" else f"_{split}")
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    metas = [m for m in c.meta_rows if m.curve[0] or m.val_curve[0]]
    if metas:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
        for m in metas:
            ax1.plot(*m.curve, label=m.run)
            ax2.plot(*m.val_curve, marker="o", ms=3, label=m.run)
        ax1.set(xlabel="meta-step", ylabel="meta-loss (train/meta_loss)", title="meta-loss")
        ax2.set(xlabel="meta-step", ylabel="val mean log10 final loss", title="validation")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _footer(fig, command)
        path = out / "meta_train.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def write_html(c: Comparison, plots: Sequence[Path], path: str | os.PathLike, command: str | None = None) -> Path:
    """A self-contained page: the tables and the plots (embedded), and the command that made them."""
    import base64

    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    body = [f"<h1>learnopt compare</h1><p><code>{html.escape(command or '')}</code></p>"]
    if c.rows:
        body += ["<h2>Optimizers × tasks</h2>", f"<p>Mean log10 final loss, 95% t-interval over seeds; speedup "
                 f"against tuned {html.escape(c.reference)} (learnopt.compare.speedup).</p>",
                 table([h.format(ref=c.reference) for h in EVAL_COLUMNS], _eval_cells(c))]
    if c.meta_rows:
        body += ["<h2>Meta-training runs</h2>", table(META_COLUMNS, _meta_cells(c))]
    body += [f"<p>Note: {html.escape(n)}.</p>" for n in c.notes]
    if c.skipped:
        body += ["<h2>Skipped runs</h2>", table(["run", "reason"], [[s.path or s.run, s.reason] for s in c.skipped])]
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(Path(p).name)}">'
                    f"<figcaption>{html.escape(Path(p).name)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>learnopt compare</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


# --------------------------------------------------------------------------- command line


def compare(
    paths: Sequence[str] = (), project: str | None = None, groups: Sequence[str] = (), tags: Sequence[str] = (),
    tasks: Sequence[str] = (), job_types: Sequence[str] = (), reference: str = "adam", fmt: str = "markdown",
    out_dir: str | None = "runs/compare", backend: str = "python", command: str | None = None,
    run_project: str | None = None, all_projects: bool = False, include_unfinished: bool = False,
    include_foreign: bool = False,
) -> tuple[Comparison, str]:
    """Read, filter and compare runs; write ``table.md``, ``table.csv``, ``table.json``, the PNGs
    and ``index.html`` to ``out_dir`` (None: write nothing); return the comparison and the text
    in ``fmt``.

    Only finished runs written by learnopt's logging, of one W&B project, are compared
    (``triage_runs``: ``run_project``, ``all_projects``, ``include_unfinished``,
    ``include_foreign``); every other run
    read is listed with its reason in the comparison (``skipped``), in the text and on stderr.

    Raises:
        RunReadError: no runs could be found or read, or every run read was skipped (the
            message lists why), or the runs span several projects and none was chosen.
    """
    if project and paths:
        raise ValueError("give either offline run paths or --project, not both")
    unreadable: list[SkippedRun] = []
    if project:
        runs = read_online_runs(project, groups, tags)
    else:
        if not paths:
            default = [p for p in ("runs/wandb", "wandb") if Path(p).is_dir()]
            if not default:
                raise RunReadError("no runs given and neither runs/wandb nor wandb/ exists here")
            paths = default[:1]
        logs = find_run_logs(paths)
        runs = []
        for log in logs:
            try:
                runs.append(read_offline_run(log, backend))
            except RunReadError as e:
                if len(logs) == 1:
                    raise
                # one damaged run among many (a crashed writer) should not hide the others
                unreadable.append(SkippedRun(str(log.parent), log.stem, f"unreadable: {e}"))
    # (an online project is one project already)
    kept, skipped, _ = triage_runs(runs, run_project, all_projects or bool(project), include_unfinished,
                                   include_foreign)
    skipped = unreadable + skipped
    for s in skipped:
        print(f"learnopt compare: skipping a run: {s.path or s.run}: {s.reason}", file=sys.stderr)
    if not kept and skipped:
        raise RunReadError(f"no runs to compare: all {len(skipped)} runs read were skipped:\n"
                           + "\n".join(f"  {s.path or s.run}: {s.reason}" for s in skipped))
    comparison = build_comparison(select_runs(kept, groups, tags, tasks, job_types), reference)
    comparison.skipped, comparison.runs_read = skipped, len(kept) + len(skipped)
    text = format_comparison(comparison, fmt)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(format_markdown(comparison) + "\n")
        (out / "table.csv").write_text(format_csv(comparison) + "\n")
        (out / "table.json").write_text(format_comparison(comparison, "json") + "\n")
        plots = plot_comparison(comparison, out, command)
        write_html(comparison, plots, out / "index.html", command)
    return comparison, text


def compare_cli(args: list[str] | None = None) -> Comparison:
    """``learnopt compare [PATH ...] [--project ENTITY/PROJECT] [--group G] [--tag T] [--task T] ...``"""
    parser = argparse.ArgumentParser(
        prog="learnopt compare",
        description="Compare optimizers across W&B runs: a table (optimizers × tasks, mean ± 95% CI over seeds, "
                    "speedup vs tuned Adam) and overlaid loss-curve plots (PNG and an HTML page).",
    )
    parser.add_argument("paths", nargs="*", help="offline run directories, wandb/ folders, folders holding wandb/, "
                        "or .wandb files (default: runs/wandb or wandb)")
    parser.add_argument("--project", help="an online project entity/project (needs a W&B login)")
    parser.add_argument("--group", action="append", default=[], help="keep runs of this group (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="keep runs carrying this tag (repeatable; all must match)")
    parser.add_argument("--task", action="append", default=[], help="keep runs on this task (repeatable)")
    parser.add_argument("--job_type", action="append", default=[], help="keep runs of this job type (repeatable)")
    parser.add_argument("--reference", default="adam", help="optimizer the speedup is measured against")
    parser.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    parser.add_argument("--out_dir", default="runs/compare", help="where table.*, PNGs and index.html go")
    parser.add_argument("--backend", choices=("python", "leet"), default="python",
                        help="read offline logs here (python) or through `wandb leet inspect --json` (leet)")
    parser.add_argument("--run_project", help="offline runs: compare the runs of this W&B project (default: "
                        f"{ls.PROJECT}, or the only project present); the others are listed as skipped")
    parser.add_argument("--all_projects", action="store_true", help="offline runs: merge the runs of every W&B project")
    parser.add_argument("--include_unfinished", action="store_true",
                        help="also compare runs still running, crashed or truncated (skipped by default)")
    parser.add_argument("--include_foreign", action="store_true",
                        help="also compare runs without learnopt's schema marker (written by other scripts, or by a "
                        "learnopt older than the marker): their keys are trusted to mean what learnopt's mean")
    args = list(sys.argv[1:] if args is None else args)
    ns = parser.parse_args(args)
    command = " ".join(["learnopt compare", *args])
    try:
        comparison, text = compare(ns.paths, ns.project, ns.group, ns.tag, ns.task, ns.job_type, ns.reference,
                                   ns.format, ns.out_dir, ns.backend, command, ns.run_project, ns.all_projects,
                                   ns.include_unfinished, ns.include_foreign)
    except (RunReadError, RuntimeError, ValueError) as e:
        parser.exit(2, f"learnopt compare: error: {e}\n")
    print(text)
    if ns.format == "markdown":
        print(f"\nwrote {ns.out_dir}/table.md, table.csv, table.json, index.html and the plots", file=sys.stderr)
    return comparison
