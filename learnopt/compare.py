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
import sys
from pathlib import Path
from typing import Sequence

from learnopt import logging_schema as ls

# The pieces, importable from here as before: reading runs, the comparison, its outputs.
from learnopt.compare_output import format_comparison, format_csv, format_markdown, plot_comparison, write_html
from learnopt.comparison import Comparison, MetaRow, Row, build_comparison, row_label  # noqa: F401
from learnopt.metrics import speedup, steps_to_reach  # noqa: F401
from learnopt.run_reader import (  # noqa: F401
    RunRecord,
    SkippedRun,
    find_run_logs,
    read_offline_run,
    read_online_runs,
    run_task,
    select_runs,
    skip_reason,
    triage_runs,
)
from learnopt.wandb_files import RunReadError, log_is_complete  # noqa: F401


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

    Args:
        paths: offline run directories, ``wandb/`` folders, folders holding one, or ``.wandb`` files
            (empty: ``runs/wandb`` or ``wandb``).
        project: an online project ``entity/project`` instead of ``paths``.
        groups, tags, tasks, job_types: keep only these runs (``select_runs``).
        reference: the optimizer speedups are measured against.
        fmt: the returned text's format, ``"markdown"``, ``"csv"`` or ``"json"``.
        out_dir: where the files go (None: write nothing).
        backend: how offline logs are read, ``"python"`` or ``"leet"`` (``read_offline_run``).
        command: the command line, shown on the plots and the HTML page.
        run_project, all_projects, include_unfinished, include_foreign: as ``triage_runs``'s.

    Returns:
        ``(comparison, text)``.

    Raises:
        ValueError: both ``paths`` and ``project`` were given.
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
    """``learnopt compare [PATH ...] [--project ENTITY/PROJECT] [--group G] [--tag T] [--task T] ...``

    Prints the comparison; an error in reading or comparing exits with status 2 and its message.

    Args:
        args: the command-line arguments after ``compare`` (``None``: ``sys.argv[1:]``).

    Returns:
        The comparison.
    """
    parser = argparse.ArgumentParser(
        prog="learnopt compare",
        description="Compare optimizers across W&B runs: a table (optimizers × tasks, mean ± 95% CI over seeds, "
                    "speedup vs tuned Adam) and overlaid loss-curve plots (PNG and an HTML page).",
    )
    parser.add_argument("paths", nargs="*", help="offline run directories, wandb/ folders, folders holding wandb/, "
                        "or .wandb files (default: runs/wandb or wandb)")
    parser.add_argument("--project", help="an online project entity/project (needs a W&B login)")
    parser.add_argument("--group", action="append", default=[], help="keep runs of this group (repeatable)")
    parser.add_argument("--tag", action="append", default=[],
                        help="keep runs carrying this tag (repeatable; all must match)")
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
