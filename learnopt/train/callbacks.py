"""Callbacks of the meta-training shell."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from learnopt.checkpoint import export_checkpoint


class ExportLearnedOptimizer(pl.Callback):
    """Export the learned optimizer with the best validation score to ``path``.

    After every validation (and once more at the end of training, so the last steps are
    scored too) the learned optimizer is exported if ``monitor`` improved. The file is the
    user-facing checkpoint (``learnopt.load_optimizer``); its metadata records the
    meta-training config, the meta-step and the validation score.
    """

    def __init__(self, path: str = "runs/meta-train/learned_optimizer.pt", monitor: str | None = None):
        self.path = path
        self.monitor = monitor  # None: the module's own ``monitor_key``
        self.best: float | None = None
        self.best_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path, monitor=self.monitor)

    def _consider(self, trainer: pl.Trainer, module: Any, value: float) -> None:
        if math.isnan(value) or (self.best is not None and value >= self.best):
            return
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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_step = state_dict.get("best_step")
