"""The Lightning shell: meta-training module, CLI, callbacks, W&B logging."""

from learnopt.train.callbacks import ExportLearnedOptimizer
from learnopt.train.module import MetaTrainModule
from learnopt.train.wandb_logging import WandbLogger, wandb_mode

__all__ = ["ExportLearnedOptimizer", "MetaTrainModule", "WandbLogger", "wandb_mode"]
