"""Reading W&B runs for ``learnopt compare``: offline ``.wandb`` logs (through W&B's protobuf
schema, or ``wandb leet inspect --json``) and online projects (``wandb.Api``) into
``RunRecord``s, and deciding which runs a comparison may use (``triage_runs``: only finished
runs written by learnopt, of one project) and which it asked for (``select_runs``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from learnopt import logging_schema as ls
from learnopt.wandb_files import RunReadError, _scan_log

def as_float(x: Any) -> float:
    """``float(x)``, or NaN for what is not a number (a W&B value may be a string or None).

    Args:
        x: a logged value.

    Returns:
        The float.
    """
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunRecord:
    """What ``learnopt compare`` needs of one W&B run.

    Attributes:
        id: the W&B run id.
        name: the run's display name.
        project: its W&B project.
        group: its group ("" for none).
        job_type: its job type.
        tags: its tags.
        config: its config (without W&B's ``_wandb``).
        summary: its summary metrics.
        history: its logged rows, in order.
        path: its directory (offline) or URL (online).
        exit_code: the exit code of its exit record (None: none, or an online run).
        state: ``"finished"``, ``"crashed"``, ``"running"`` or ``"truncated"``.
        truncated_at: the byte offset of the partial record a truncated log ends in.
    """

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
        """``(steps, values)`` of the history rows that hold both ``step_key`` and ``key``, sorted by step.

        Args:
            key: the metric.
            step_key: the step it is plotted against.

        Returns:
            The steps and the values (NaN where not a number).
        """
        pairs = sorted((float(r[step_key]), as_float(r[key])) for r in self.history if key in r and step_key in r)
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
    ``wandb leet inspect --json``).

    Args:
        path: a run directory (its first ``*.wandb`` file is read) or a ``.wandb`` file.
        backend: ``"python"`` or ``"leet"``.

    Returns:
        The run's record.

    Raises:
        RunReadError: no such file, or not a readable W&B run log.
        ValueError: an unknown backend.
    """
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
    hold a ``wandb/`` folder (``runs/``), or ``.wandb`` files. A path with none is an error.

    Args:
        paths: the paths to search.

    Returns:
        The log files, each once, in the order found.

    Raises:
        RunReadError: a path does not exist or holds no run log.
    """
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
    missing one is an error, never a prompt).

    Args:
        project: ``entity/project``.
        groups: only runs in one of these groups (empty: all).
        tags: only runs with all of these tags.
        timeout: ``wandb.Api``'s timeout in seconds.

    Returns:
        The records, with their full history; a state other than finished or running is ``"crashed"``.

    Raises:
        RuntimeError: no W&B login.
    """
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
    """A run ``learnopt compare`` read but left out, and why.

    Attributes:
        path: the run's directory or URL ("" if unknown).
        run: its name (else its id).
        reason: why it was left out.
    """

    path: str
    run: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The record as a dict (for JSON output).

        Returns:
            ``{"path", "run", "reason"}``.
        """
        return {"path": self.path, "run": self.run, "reason": self.reason}


def skip_reason(run: RunRecord, include_unfinished: bool = False, include_foreign: bool = False) -> str | None:
    """Why ``run`` must not be compared (None: it may be): unless ``include_foreign``, not
    written by learnopt's logging (no ``ls.SCHEMA_KEY`` in its config); unless
    ``include_unfinished``, not finished.

    Args:
        run: the run.
        include_unfinished: accept runs that are not finished.
        include_foreign: accept runs without learnopt's schema marker.

    Returns:
        The reason, with the flag that would accept the run, or None.
    """
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
    chosen is an error); ``all_projects`` merges them.

    Args:
        runs: the runs read.
        project: the project to compare (None: chosen as above).
        all_projects: compare the runs of every project.
        include_unfinished, include_foreign: as ``skip_reason``'s.

    Returns:
        The runs kept, the runs skipped and the project compared (None with ``all_projects``).

    Raises:
        RunReadError: the runs span several projects and none was chosen.
    """
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
            raise RunReadError(f"the runs belong to several W&B projects, {listed}: choose one with "
                               "--run_project NAME, or merge them with --all_projects")
    ours = [r for r in kept if r.project == project]
    skipped += [SkippedRun(r.path or "", r.name or r.id,
                           f"other project {r.project!r} (comparing {project!r}; --run_project {r.project} or "
                           "--all_projects to include it)") for r in kept if r.project != project]
    return ours, skipped, project


def select_runs(runs: Iterable[RunRecord], groups: Sequence[str] = (), tags: Sequence[str] = (),
                tasks: Sequence[str] = (), job_types: Sequence[str] = ()) -> list[RunRecord]:
    """Runs in any of ``groups``, carrying all of ``tags``, on any of ``tasks`` (the config's
    ``task``; meta-training runs match by their task family), of any of ``job_types``. An empty
    filter accepts every run.

    Args:
        runs: the runs.
        groups: the groups to accept.
        tags: the tags a run must all carry.
        tasks: the tasks to accept (``run_task``).
        job_types: the job types to accept.

    Returns:
        The runs selected, in order.
    """
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
    name with its ``dim``/``distribution`` if given.

    Args:
        run: the run.

    Returns:
        The task's name, or ``"?"`` when the config names none.
    """
    if run.config.get("task"):
        return str(run.config["task"])
    family = ((run.config.get("cli") or {}).get("model") or {}).get("task_family") or {}
    if isinstance(family, dict) and family.get("class_path"):
        name = family["class_path"].rsplit(".", 1)[-1]
        args = family.get("init_args") or {}
        extra = "".join(f" {k}={args[k]}" for k in ("dim", "distribution") if k in args)
        return name + extra
    return "?"
