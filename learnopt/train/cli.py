"""``learnopt meta-train``: LightningCLI over ``MetaTrainModule`` with YAML configs."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from jsonargparse import ArgumentError

from learnopt.runtime import apply_defaults
from learnopt.train.callbacks import ExportLearnedOptimizer
from learnopt.train.checkpoint_io import AtomicCheckpointIO
from learnopt.train.config_errors import explain
from learnopt.train.module import MetaTrainModule
from learnopt.train.run_lock import RunLock

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 2000,
    "inference_mode": False,  # validation differentiates the inner loss
    "val_check_interval": 250,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "default_root_dir": "runs/meta-train",
}

# Configurable defaults (a config's own `trainer.logger` / `trainer.callbacks` replace them).
PARSER_DEFAULTS: dict[str, Any] = {
    "model.learned_optimizer": {"class_path": "learnopt.learned.CoordinatewiseLSTM"},
    "model.task_family": {"class_path": "tasks.quadratic.QuadraticFamily"},
    "model.estimator": {"class_path": "learnopt.meta.TruncatedBPTT"},
    "trainer.logger": {
        "class_path": "learnopt.train.wandb_logging.WandbLogger",
        "init_args": {"project": "learnopt", "job_type": "meta-train"},
    },
    "trainer.callbacks": [
        {
            "class_path": "learnopt.train.callbacks.ExportLearnedOptimizer",
            "init_args": {"path": "runs/meta-train/learned_optimizer.pt"},
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": "runs/meta-train/lightning", "every_n_train_steps": 250, "save_last": True},
        },
    ],
}


class SaveConfigToRunDir(SaveConfigCallback):
    """Save the resolved config as ``<default_root_dir>/config.yaml`` (beside the run's
    checkpoints, not in the shared W&B folder), record it in the W&B run, and hand it to the
    module so the exported checkpoint's metadata carries it.

    Args:
        *args, **kwargs: ``SaveConfigCallback``'s (``save_to_log_dir`` is always False).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)
        resolved = self.config.clone()
        resolved.pop("config", None)
        plain = resolved.as_dict()
        pl_module.resolved_config = plain
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "config"):
                experiment.config.update({"cli": plain}, allow_val_change=True)


class MetaTrainParser(LightningArgumentParser):
    """LightningCLI's parser, without the estimator's ``task_family`` among the options: the
    family is given once, as ``model.task_family``, and ``MetaTrainModule`` binds it into the
    estimator."""

    def add_class_arguments(self, theclass: Any, nested_key: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(theclass, type) and issubclass(theclass, MetaTrainModule):
            kwargs["skip"] = set(kwargs.get("skip") or ()) | {"estimator.init_args.task_family"}
        return super().add_class_arguments(theclass, nested_key, *args, **kwargs)


class MetaTrainCLI(LightningCLI):
    """LightningCLI for ``learnopt meta-train``: ``MetaTrainParser``, ``--ckpt_path`` and ``--threads``
    options, and ``PARSER_DEFAULTS`` (the quadratic experiment with no config).

    Args:
        *args, **kwargs: ``LightningCLI``'s.
        parser_class: the parser (default ``MetaTrainParser``).
    """

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = MetaTrainParser,
                 **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path", default=None,
            help="Lightning checkpoint to resume from ('last' resumes the latest periodic checkpoint)",
        )
        parser.add_argument(
            "--threads", type=int, default=default_threads(),
            help="torch threads (default: $OMP_NUM_THREADS, else 1; see docs/benchmarks, section 6)",
        )
        # Defaults name classes by import path, so `learnopt meta-train` with no config runs
        # the paper's quadratic experiment without learnopt importing tasks/.
        parser.set_defaults(PARSER_DEFAULTS)


def default_threads() -> int:
    """One thread unless ``OMP_NUM_THREADS`` says otherwise. A second thread while another
    process uses the other core slows eager meta-training down badly (docs/benchmarks, section 6);
    with one, it loses at most the second core on an idle machine.

    Returns:
        ``OMP_NUM_THREADS`` when it is an integer ≥ 1, else 1.
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def meta_train(args: list[str] | None = None) -> MetaTrainCLI:
    """Parse ``args`` (default: the command line after ``meta-train``), build the module and
    trainer, and fit, holding the run directories' lock (``RunLock``) for the whole run.

    Args:
        args: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The CLI, after fitting (``cli.model``, ``cli.trainer``, ``cli.config``).

    Raises:
        ValueError: a config or flag was refused (the message from ``explain``), or ``--threads`` < 1.
    """
    if args is None:
        args = sys.argv[1:]
    apply_defaults()  # keep freed memory for reuse (learnopt.runtime; LEARNOPT_KEEP_FREED_MEMORY=0: off)
    # The state after each meta-update is exactly what a resumed run needs.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    argv, sys.argv = sys.argv, [sys.argv[0]]  # LightningCLI must read only ``args``
    try:
        cli = MetaTrainCLI(
            MetaTrainModule,
            run=False,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_callback=SaveConfigToRunDir,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
        )
    except ArgumentError as err:  # a config or flag jsonargparse refused: say why, briefly
        raise ValueError(explain(str(err))) from None
    finally:
        sys.argv = argv
    threads = cli.config.get("threads")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    use_atomic_checkpoints(cli.trainer)
    # Rank 0 holds the lock for the whole run; the other ranks of a distributed run share it.
    lock = RunLock(run_directories(cli.trainer) if rank_zero_only.rank == 0 else [])
    with lock:
        cli.trainer.fit(cli.model, ckpt_path=cli.config.get("ckpt_path"))
    return cli


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Give ``trainer`` the atomic writer for its Lightning checkpoints
    (``learnopt.train.checkpoint_io``), unless a config chose a checkpoint plugin of its own.

    Args:
        trainer: the Lightning trainer (its strategy's ``checkpoint_io`` is replaced).
    """
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def run_directories(trainer: Trainer) -> list[str]:
    """The directories a meta-training run writes: its root (``config.yaml``), its Lightning
    checkpoint directories and the directories of its exports (a ``{run_id}`` in the path
    makes the export per run, so it is not shared).

    Args:
        trainer: the Lightning trainer, with its callbacks.

    Returns:
        The directories, as paths (``RunLock`` resolves and deduplicates them).
    """
    dirs = [trainer.default_root_dir]
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            dirs.append(callback.dirpath)
        if isinstance(callback, ExportLearnedOptimizer) and "{run_id}" not in callback.path_template:
            dirs.append(str(Path(callback.path_template).parent))
    return dirs
