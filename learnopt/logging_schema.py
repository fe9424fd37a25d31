"""One W&B logging schema for every run of the project (meta-training, evaluation, benchmarks).

Runs that share one shape compare well in W&B (the runs table, overlaid line plots, grouped
runs) and can be read back offline by ``learnopt compare``. The schema:

* **marker**: ``SCHEMA_KEY`` (``learnopt_schema``) in the config, set to ``SCHEMA_VERSION`` by
  every run learnopt starts (``wandb_init_kwargs``, so ``init_run`` and the Lightning
  ``WandbLogger``); ``learnopt compare`` reads only runs that carry it, so a run some other
  script logged with the same keys never enters a table.
* **project** ``learnopt`` (``--project`` to change); **group**: the experiment (all runs of one
  evaluation, one benchmark, one sweep); **job type**: one of ``JOB_TYPES``; **tags**: free
  labels the user filters on (``learnopt compare --tag``).
* **config**: the full resolved configuration of the command that made the run (meta-training
  stores it under ``cli``, evaluation under ``evaluate``), plus flat keys every run of an
  optimizer on a task carries: ``optimizer`` (the name in tables), ``task`` (the task family's
  name), ``kind`` (``"learned"`` or ``"baseline"``; ``"summary"`` for an evaluation's table run),
  ``lr`` (a baseline's rate), ``fixed_lr`` (true when the rate was given, not tuned), ``split``
  (``"test"``: held-out instances; ``"tune"``: the tuning instances, job type ``tune``) and
  ``seeds``.
* **curves**: inner-loss curves keyed by inner step (``INNER_LOSS`` against ``INNER_STEP``: the
  mean over held-out instances of log10 loss, diverged instances counting +30); meta-loss curves
  keyed by meta-step (``META_LOSS`` and ``VAL_LOSS`` against ``META_STEP``, Lightning's
  ``trainer/global_step``).
* **summary**: ``FINAL_LOG10`` (mean log10 final loss), ``FINAL_CI95`` (95% t half-width over
  instances), ``SEED_LOG10`` (the mean log10 final loss of each seed, from which
  ``learnopt compare`` takes its interval over seeds), ``FINAL_LOSS`` (mean final loss),
  ``FINAL_NORMALIZED_LOG10`` (mean log10 of the task's normalised final loss, comparable across
  tasks), ``DIVERGED``, ``SPEEDUP`` (against tuned Adam, ``learnopt.compare.speedup``),
  ``ADAM_STEPS_TO_MATCH`` and ``TIME_PER_STEP`` (seconds per inner step, or per meta-step in
  meta-training).
* **artifacts**: a learned optimizer's exported checkpoint, type ``ARTIFACT_TYPE``.
* **media**: an evaluation's table as a W&B Table (``TABLE_KEY``) with the overlaid curves as a
  W&B line plot and the PNG the command wrote.

W&B is offline unless the user set it up (``wandb_mode``); an online start that fails (no
network) falls back to offline instead of failing or hanging; nothing prompts. This module
imports neither Lightning nor wandb at import time, so any script may use it.
"""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

PROJECT = "learnopt"
SCHEMA_KEY = "learnopt_schema"
SCHEMA_VERSION = 1
JOB_TYPES = ("meta-train", "evaluate", "benchmark", "tune")

INNER_STEP = "inner/step"
INNER_LOSS = "inner/mean_log10_loss"
META_STEP = "trainer/global_step"
META_LOSS = "train/meta_loss"
VAL_LOSS = "val/log10_final_loss"

FINAL_LOG10 = "final/mean_log10_loss"
FINAL_CI95 = "final/ci95"
SEED_LOG10 = "final/seed_mean_log10_losses"
FINAL_LOSS = "final/mean_loss"
FINAL_NORMALIZED_LOG10 = "final/mean_log10_normalized_loss"
DIVERGED = "final/diverged"
SPEEDUP = "speedup_vs_adam"
ADAM_STEPS_TO_MATCH = "adam_steps_to_match"
TIME_PER_STEP = "time_per_step_s"
TABLE_KEY = "evaluation/table"
CURVES_PLOT_KEY = "evaluation/curves"
CURVES_IMAGE_KEY = "evaluation/curves_png"
ARTIFACT_TYPE = "learned-optimizer"


def wandb_mode() -> str:
    """``WANDB_MODE`` if the user set it; ``"online"`` if they are logged in (an API key in the
    environment or in ``~/.netrc``); otherwise ``"offline"``.

    Returns:
        The mode.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if logged_in() else "offline"


def logged_in() -> bool:
    """Whether W&B credentials exist (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in the netrc
    file); checked without the network.

    Returns:
        True when credentials are found.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
        return bool(rc.authenticators("api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_init_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``wandb.init`` with the mode resolved, a bounded start-up and the
    schema marker in the config (a ``config`` given as a dict keeps its keys).

    Args:
        **kwargs: ``wandb.init`` arguments; ``mode`` defaults to ``wandb_mode()``, ``settings`` to a
            60 s start-up timeout, silent.

    Returns:
        The arguments, completed.
    """
    import wandb

    kwargs.setdefault("mode", wandb_mode())
    kwargs.setdefault("settings", wandb.Settings(init_timeout=60, silent=True))
    config = kwargs.get("config")
    if config is None or isinstance(config, dict):
        kwargs["config"] = {**(config or {}), SCHEMA_KEY: SCHEMA_VERSION}
    return kwargs


def mark_run(run: Any) -> None:
    """Put the schema marker in the config of a W&B run learnopt logs into but did not start
    with ``wandb_init_kwargs`` (one a user or ``wandb agent`` started).

    Args:
        run: the W&B run.
    """
    if run.config.get(SCHEMA_KEY) != SCHEMA_VERSION:
        run.config.update({SCHEMA_KEY: SCHEMA_VERSION}, allow_val_change=True)


def init_run(
    job_type: str,
    group: str | None = None,
    tags: Sequence[str] = (),
    config: dict[str, Any] | None = None,
    name: str | None = None,
    project: str = PROJECT,
    save_dir: str | os.PathLike = "runs",
    **kwargs: Any,
) -> Any:
    """Start a W&B run in the schema and return it (a ``wandb.Run``; end it with ``finish_run``).

    Files go to ``<save_dir>/wandb``. Offline unless W&B is set up; an online start that fails
    falls back to offline with a warning. Inner-loss keys (``inner/*``) are plotted against
    ``INNER_STEP``.

    Usage from any script (a benchmark, say)::

        from learnopt import logging_schema as ls
        run = ls.init_run("benchmark", group="bench-quadratic", config={"optimizer": "adam",
                          "task": "quadratic10_gaussian", "kind": "baseline", "lr": 0.1})
        ls.log_inner_curve(run, mean_log10_losses)          # one value per inner step
        ls.log_final(run, {ls.FINAL_LOG10: -3.2, ls.TIME_PER_STEP: 1e-4})
        ls.finish_run(run)   # run.finish(), then wait until the run's log is complete

    Args:
        job_type: one of ``JOB_TYPES``.
        group: the experiment.
        tags: labels to filter on.
        config: the full resolved configuration (put ``optimizer``, ``task``, ``kind`` and ``lr`` at
            its top level where the run is one optimizer on one task).
        name: the run's display name.
        project: the W&B project.
        save_dir: the directory W&B's files go under (made absolute, created if missing).
        **kwargs: further ``wandb.init`` arguments.

    Returns:
        The started run, with the schema marker in its config.

    Raises:
        ValueError: ``job_type`` is not one of ``JOB_TYPES``.
    """
    import wandb

    if job_type not in JOB_TYPES:
        raise ValueError(f"job_type must be one of {', '.join(JOB_TYPES)}, got {job_type!r}")
    # absolute: W&B's service process keeps the working directory it started in
    save_dir = os.path.abspath(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    init = wandb_init_kwargs(
        project=project, group=group, job_type=job_type, tags=list(tags) or None, config=config or {},
        name=name, dir=save_dir, reinit="finish_previous", **kwargs,
    )
    try:
        run = wandb.init(**init)
    except Exception as e:  # noqa: BLE001 (wandb raises several error types for a failed start)
        if init.get("mode") != "online":
            raise
        warnings.warn(f"W&B could not start online ({e}); logging offline instead", stacklevel=2)
        run = wandb.init(**{**init, "mode": "offline"})
    mark_run(run)  # (a config that was not a dict, or a run an agent started, lacks it)
    run.define_metric(INNER_STEP, hidden=True)
    run.define_metric("inner/*", step_metric=INNER_STEP)
    return run


def finish_run(run: Any, timeout: float = 10.0) -> None:
    """``run.finish()``, then wait (at most ``timeout`` seconds) until the run's transaction log
    holds its exit record. W&B writes the log from its service process shortly after
    ``finish`` returns; waiting lets a reader in the same process (``learnopt compare``, a
    script, a test) see the whole run.

    Args:
        run: the W&B run.
        timeout: the longest wait, in seconds (a disabled run is not waited for).
    """
    import time

    sync_file = getattr(getattr(run, "settings", None), "sync_file", None)
    disabled = getattr(run, "disabled", False) or getattr(run.settings, "mode", "") == "disabled"
    run.finish()
    if disabled or not sync_file:
        return
    from learnopt.wandb_files import log_is_complete

    deadline = time.monotonic() + timeout
    while not log_is_complete(sync_file) and time.monotonic() < deadline:
        time.sleep(0.02)


def log_inner_curve(run: Any, curve: Sequence[float], key: str = INNER_LOSS) -> None:
    """Log ``curve`` (one value per inner step, step 0 first) keyed by ``INNER_STEP``.

    Args:
        run: the W&B run.
        curve: the values.
        key: the metric they are logged under.
    """
    for step, value in enumerate(curve):
        run.log({key: float(value), INNER_STEP: step})


def log_final(run: Any, metrics: dict[str, Any]) -> None:
    """Put summary metrics (the ``FINAL_*``, ``SPEEDUP``, ``TIME_PER_STEP`` keys) in the run's
    summary, where the W&B runs table and ``learnopt compare`` read them.

    Args:
        run: the W&B run.
        metrics: the summary metrics by key.
    """
    run.summary.update(metrics)


def log_checkpoint_artifact(
    run: Any, path: str | os.PathLike, name: str | None = None, metadata: dict[str, Any] | None = None,
    aliases: Sequence[str] = ("latest",),
) -> Any:
    """Log a learned optimizer's exported checkpoint as a W&B artifact of type ``ARTIFACT_TYPE``
    (named after the file unless ``name``), so a run's result can be fetched and loaded with
    ``learnopt.load_optimizer``.

    Args:
        run: the W&B run.
        path: the exported checkpoint.
        name: the artifact's name (W&B's allowed characters; others become ``-``).
        metadata: the artifact's metadata (values W&B cannot store are kept as their repr).
        aliases: the artifact's aliases.

    Returns:
        The logged ``wandb.Artifact``.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    import wandb

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to log as an artifact does not exist: {path}")
    artifact = wandb.Artifact(_artifact_name(name or path.stem), type=ARTIFACT_TYPE, metadata=_jsonable(metadata or {}))
    artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=list(aliases))
    return artifact


def _artifact_name(name: str) -> str:
    # W&B artifact names allow alphanumerics, dashes, underscores and dots
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _jsonable(value: Any) -> Any:
    """Metadata W&B can store: nested dicts/lists of plain values, anything else as its repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
