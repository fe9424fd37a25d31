"""``learnopt meta-train``: LightningCLI over ``MetaTrainModule`` with YAML configs."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from learnopt.train.module import MetaTrainModule

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


class MetaTrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path", default=None,
            help="Lightning checkpoint to resume from ('last' resumes the latest periodic checkpoint)",
        )
        # Defaults name classes by import path, so `learnopt meta-train` with no config runs
        # the paper's quadratic experiment without learnopt importing tasks/.
        parser.set_defaults(PARSER_DEFAULTS)


def meta_train(args: list[str] | None = None) -> MetaTrainCLI:
    cli = MetaTrainCLI(
        MetaTrainModule,
        run=False,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    cli.trainer.fit(cli.model, ckpt_path=cli.config.get("ckpt_path"))
    return cli
