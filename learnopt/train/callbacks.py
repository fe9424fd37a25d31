"""Callbacks of the meta-training shell."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from learnopt.checkpoint import CheckpointError, export_checkpoint, read_checkpoint


class ExportLearnedOptimizer(pl.Callback):
    """Export the learned optimizer with the best validation score to ``path``.

    After every validation (and once more at the end of training, so the last steps are
    scored too) the learned optimizer is exported if ``monitor`` improved. The file is the
    user-facing checkpoint (``learnopt.load_optimizer``); its metadata records the
    meta-training config, the meta-step and the validation score.

    ``path`` may contain ``{run_id}``, filled in with the W&B run's id (else the logger's
    version, else ``local``), so runs of a W&B sweep each keep their own checkpoint.

    With a W&B logger attached, the end of training also logs what ``learnopt.logging_schema``
    asks of a meta-training run: the exported checkpoint as an artifact (type
    ``learned-optimizer``) and the summary metrics ``meta_steps``, ``best/<monitor>``, ``best/meta_step``,
    ``checkpoint/path`` and ``time_per_step_s`` (wall-clock seconds per meta-step, measured
    around each training step).

    The best score is part of the Lightning checkpoint; on resuming, the score recorded in the
    exported file counts too (a kill between an export and the next Lightning checkpoint would
    otherwise let a worse learned optimizer overwrite it). A learned optimizer that no
    meta-update has changed is never exported, and a run that ends with nothing exported (every
    validation score NaN) raises ``NoExport`` rather than finishing quietly.

    Args:
        path: where to export (may contain ``{run_id}``).
        monitor: the validation metric to minimize (``None``: the module's own choice).
    """

    def __init__(self, path: str = "runs/meta-train/learned_optimizer.pt", monitor: str | None = None):
        self.path_template = path
        self.path = path
        self.monitor = monitor  # None: the module's own ``monitor_key``
        self.best: float | None = None
        self.best_step: int | None = None
        self._step_start: float | None = None
        self._seconds, self._steps = 0.0, 0
        self._resumed = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path_template, monitor=self.monitor)

    def _consider(self, trainer: pl.Trainer, module: Any, value: float) -> None:
        if math.isnan(value) or (self.best is not None and value >= self.best):
            return
        if getattr(module, "meta_updates", 1) == 0:
            return  # the initial learned optimizer: nothing meta-trained to export
        self.best, self.best_step = value, int(trainer.global_step)
        self._export(module)

    @rank_zero_only
    def _export(self, module: Any) -> None:
        metadata = module.export_metadata()
        metadata["validation"] = {self.monitor: self.best, "meta_step": self.best_step}
        metadata["meta_steps"] = self.best_step
        export_checkpoint(module.learned_optimizer, self.path, metadata)

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        if self.monitor is None:
            self.monitor = getattr(module, "monitor_key", "val/log10_final_loss")
        if "{run_id}" in self.path_template:
            self.path = self.path_template.replace("{run_id}", _run_id(trainer))

    def on_fit_start(self, trainer: pl.Trainer, module: Any) -> None:
        if self._resumed or trainer.ckpt_path is not None:
            self._adopt_exported_best(module)

    def _adopt_exported_best(self, module: Any) -> None:
        """Take the score recorded in the exported file if it beats the restored one."""
        if not os.path.isfile(self.path):
            return
        try:
            validation = read_checkpoint(self.path)["metadata"].get("validation", {})
        except CheckpointError as err:
            module.print(f"warning: the export {self.path} cannot be read ({err}); it will be replaced by the "
                         "next best learned optimizer")
            return
        score, step = validation.get(self.monitor), validation.get("meta_step")
        if isinstance(score, (int, float)) and not math.isnan(score) and (self.best is None or score < self.best):
            self.best, self.best_step = float(score), step

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_start is not None:
            self._seconds += time.perf_counter() - self._step_start
            self._steps += 1
            self._step_start = None

    def on_validation_end(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self._consider(trainer, module, float(trainer.callback_metrics[self.monitor]))

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        if self.best_step != trainer.global_step:
            self._consider(trainer, module, module.validation_score())
        if self.best is not None:
            module.print(f"learned optimizer exported to {self.path} (best {self.monitor} {self.best:.3f} "
                         f"at meta-step {self.best_step})")
        self._log_to_wandb(trainer)
        if self.best is None:
            why = ("no meta-update was applied" if getattr(module, "meta_updates", 1) == 0
                   else f"every validation score ({self.monitor}) was NaN")
            raise NoExport(f"meta-training ended after {trainer.global_step} meta-steps with no learned optimizer "
                           f"exported to {self.path}: {why}")

    @rank_zero_only
    def _log_to_wandb(self, trainer: pl.Trainer) -> None:
        run = _wandb_run(trainer)
        if run is None:
            return
        from learnopt import logging_schema as ls

        summary: dict[str, Any] = {"meta_steps": int(trainer.global_step), "best/meta_step": self.best_step,
                                   f"best/{self.monitor}": self.best}
        if self._steps:
            summary[ls.TIME_PER_STEP] = self._seconds / self._steps
        if self.best is not None and os.path.isfile(self.path):
            summary["checkpoint/path"] = self.path
            ls.log_checkpoint_artifact(run, self.path, metadata={"meta_step": self.best_step, self.monitor: self.best})
        ls.log_final(run, summary)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_step = state_dict.get("best_step")
        self._resumed = True


class NoExport(RuntimeError):
    """Meta-training ended without exporting a learned optimizer."""


def _wandb_run(trainer: pl.Trainer) -> Any:
    """The W&B run of the trainer's ``WandbLogger`` (None without one)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def _run_id(trainer: pl.Trainer) -> str:
    run = _wandb_run(trainer)
    if run is not None and getattr(run, "id", None):
        return str(run.id)
    if trainer.logger is not None and trainer.logger.version is not None:
        return str(trainer.logger.version)
    return "local"
