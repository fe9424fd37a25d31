"""W&B that never prompts and never blocks: offline unless the user set W&B up.

Meta-training runs follow ``learnopt.logging_schema``: project, group, job type ``meta-train``,
tags, the full resolved config (``cli``), meta-loss curves keyed by ``trainer/global_step``,
the exported checkpoint as an artifact and summary metrics (``ExportLearnedOptimizer``)."""

from __future__ import annotations

import os
import warnings
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

# The schema and mode resolution live in learnopt.logging_schema (no Lightning import there, so
# scripts can log in the same shape); re-exported here for the Lightning shell.
from learnopt.logging_schema import mark_run, wandb_init_kwargs, wandb_mode

__all__ = ["WandbLogger", "wandb_init_kwargs", "wandb_mode"]


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with learnopt's defaults: project ``learnopt``, files under
    ``runs/``, the mode from ``wandb_mode()`` (offline unless W&B is set up), and the schema
    marker in the run's config (``learnopt.logging_schema.SCHEMA_KEY``), also on a run that was
    already started when the logger took it over.

    Args:
        project: the W&B project.
        save_dir: where W&B writes its files (made absolute, created if missing).
        name: the run's name.
        group: the run's group.
        job_type: the run's job type.
        tags: the run's tags.
        notes: the run's notes.
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` (``None``: ``wandb_mode()``).
        **kwargs: further ``wandb.init`` arguments, through ``wandb_init_kwargs``.
    """

    def __init__(
        self,
        project: str = "learnopt",
        save_dir: str = "runs",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        # absolute: W&B's service process keeps the working directory it started in, so a
        # relative directory would land elsewhere after an os.chdir in this process
        save_dir = os.path.abspath(save_dir)
        os.makedirs(save_dir, exist_ok=True)
        init = {"group": group, "job_type": job_type, "tags": tags, "notes": notes, "mode": mode}
        init = wandb_init_kwargs(**{k: v for k, v in init.items() if v is not None}, **kwargs)
        super().__init__(project=project, save_dir=save_dir, name=name, **init)

    @property
    def experiment(self) -> Any:
        """The W&B run; an online start that fails (no network, W&B down) falls back to offline
        with a warning instead of stopping meta-training."""
        try:
            run = super().experiment
        except Exception as e:  # noqa: BLE001 (wandb raises several error types for a failed start)
            if self._experiment is not None or self._wandb_init.get("mode") != "online":
                raise
            warnings.warn(f"W&B could not start online ({e}); logging offline instead", stacklevel=2)
            self._wandb_init["mode"] = "offline"
            run = super().experiment
        if not getattr(self, "_learnopt_marked", False):
            mark_run(run)
            self._learnopt_marked = True
        return run
