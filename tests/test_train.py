"""The Lightning shell: `learnopt meta-train` end to end, resuming, export, config errors."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

import learnopt
from learnopt.cli import main
from learnopt.train.cli import meta_train

TINY = [
    "--model.estimator.num_tasks", "8", "--model.estimator.horizon", "10", "--model.estimator.unroll_length", "5",
    "--model.val_tasks", "8",
    "--model.learned_optimizer.init_args.hidden_size", "4",
    "--model.task_family.init_args.dim", "3",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


def _callbacks(export: str, every: int) -> list[str]:
    callbacks = [
        {"class_path": "learnopt.train.callbacks.ExportLearnedOptimizer", "init_args": {"path": export}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "every_n_train_steps": every, "save_last": True}},
    ]
    return ["--trainer.callbacks", json.dumps(callbacks)]


def test_meta_train_exports_a_loadable_checkpoint_and_logs_offline_to_wandb(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = meta_train(TINY + ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3"])
    assert cli.trainer.global_step == 6
    export = in_tmp / "runs/meta-train/learned_optimizer.pt"
    assert export.exists()
    lopt = learnopt.load(export)
    meta = lopt.checkpoint_metadata
    assert meta["meta_steps"] in (3, 6)
    assert meta["task_family"]["class_path"] == "tasks.quadratic.QuadraticFamily"
    estimator = {"class_path": "learnopt.meta.truncated_bptt.TruncatedBPTT", "init_args": {
        "num_tasks": 8, "unroll_length": 5, "horizon": 10, "second_order": False, "loss_transform": "identity",
        "seed": 0, "split": "train", "activation_checkpointing": False, "compile_unroll": False, "compile_chunk": 4,
        "schedule": {"class_path": "learnopt.meta.schedules.ConstantSchedule", "init_args": {"length": 5}}}}
    assert meta["estimator"] == estimator and meta["meta_training"]["estimator"] == estimator
    assert meta["meta_training"]["meta_lr"] == 1e-3 and json.loads(json.dumps(meta)) == meta
    assert "val/log10_final_loss" in meta["validation"]
    assert meta["config"]["model"]["estimator"]["init_args"]["unroll_length"] == 5  # the resolved config travels along
    assert (in_tmp / "runs/meta-train/config.yaml").exists()
    # the exported weights are the validated ones: loading them gives the recorded score
    assert lopt.config()["hidden_size"] == 4
    runs = glob.glob(str(in_tmp / "runs/wandb/offline-run-*"))
    assert len(runs) == 1


def test_meta_training_lowers_validation_loss(in_tmp):
    cli = meta_train(
        TINY + ["--trainer.max_steps", "60", "--trainer.val_check_interval", "60", "--trainer.logger", "false",
                "--model.meta_lr", "0.01"]
    )
    module = cli.model
    after = module.validation_log10_final_loss()
    fresh = type(module.learned_optimizer)(**module.learned_optimizer.config())
    torch.manual_seed(0)
    module.learned_optimizer.load_state_dict(fresh.state_dict())
    before = module.validation_log10_final_loss()
    assert after < before - 0.5, (before, after)


def test_resume_from_lightning_checkpoint_matches_uninterrupted_run(in_tmp):
    common = TINY + ["--trainer.val_check_interval", "4", "--trainer.logger", "false"]
    full = meta_train(common + ["--trainer.max_steps", "8"] + _callbacks("full.pt", 4))
    w_full = {k: v.clone() for k, v in full.model.learned_optimizer.state_dict().items()}

    import shutil

    shutil.rmtree("ckpts")
    meta_train(common + ["--trainer.max_steps", "4"] + _callbacks("part.pt", 4))
    assert (in_tmp / "ckpts/last.ckpt").exists()
    resumed = meta_train(common + ["--trainer.max_steps", "8", "--ckpt_path", "ckpts/last.ckpt"]
                         + _callbacks("part.pt", 4))
    assert resumed.trainer.global_step == 8
    assert resumed.model._unroll.step == full.model._unroll.step
    assert resumed.model._unroll.episode == full.model._unroll.episode
    for k, v in resumed.model.learned_optimizer.state_dict().items():
        torch.testing.assert_close(v, w_full[k], rtol=0, atol=0, msg=f"weight {k} differs after resuming")


def test_cosine_meta_lr_schedule_decays_to_final_ratio(in_tmp):
    cli = meta_train(TINY + ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                             "--trainer.logger", "false", "--model.meta_lr_schedule", "cosine",
                             "--model.meta_lr", "0.01", "--model.meta_lr_final_ratio", "0.1"])
    lr = cli.model.optimizers().param_groups[0]["lr"]
    assert lr == pytest.approx(0.001)


def test_unknown_config_key_is_an_error_naming_it(in_tmp, capsys):
    with pytest.raises(ValueError, match="unroll_lenght"):
        meta_train(TINY + ["--model.unroll_lenght", "5"])
    assert main(["meta-train", *TINY, "--model.unroll_lenght", "5"]) == 1
    assert "learnopt meta-train: error: unrecognized arguments: --model.unroll_lenght" in capsys.readouterr().err


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "meta-train" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_meta_train_runs_on_one_thread_unless_told_otherwise(in_tmp, monkeypatch):
    from learnopt.train.cli import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        meta_train(TINY + ["--trainer.max_steps", "1", "--threads", "1"])
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            meta_train(TINY + ["--trainer.max_steps", "1", "--threads", "0"])
    finally:
        torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("evaluate"))


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_builds_its_meta_train_module(config, monkeypatch):
    """Every meta-training config parses and builds: learned optimizer, task family and an
    estimator object bound to that family, whose spec is JSON-able."""
    import sys

    from learnopt.meta import GradientEstimator
    from learnopt.train.cli import MetaTrainCLI
    from learnopt.train.module import MetaTrainModule

    monkeypatch.chdir(REPO)  # configs name their init_from checkpoints relative to the repository
    monkeypatch.setattr(sys, "argv", ["learnopt"])
    cli = MetaTrainCLI(MetaTrainModule, run=False, save_config_callback=None, auto_configure_optimizers=False,
                       parser_kwargs={"exit_on_error": False},
                       args=["--config", str(config), "--trainer.logger", "false", "--trainer.callbacks", "[]",
                             "--trainer.enable_checkpointing", "false"])
    module = cli.model
    assert "task_family" not in cli.config.model.estimator.init_args  # given once, as model.task_family
    assert isinstance(module.estimator, GradientEstimator)
    assert module.estimator.task_family is module.task_family and module.estimator.seed == module.hparams.seed
    spec = module.estimator.spec()
    assert spec["class_path"].startswith("learnopt.meta.") and json.loads(json.dumps(spec)) == spec


def test_validation_draws_several_architectures():
    # val_draws samples val_tasks instances that many times from one "val" generator (each draw its own width
    # here) and scores the mean; val_draws=1 is the single draw of before
    from learnopt.learned import CompactNormalizedOptimizer
    from learnopt.meta import TruncatedBPTT
    from learnopt.meta.unroll import log10_losses, rollout
    from learnopt.task import seeded_generator
    from learnopt.train.module import MetaTrainModule
    from tasks.mlp import MLPFamily

    family = MLPFamily(dataset="synthetic", hidden_sizes=[4], batch_size=16, width_choices=[2, 4, 8, 16])
    lopt = CompactNormalizedOptimizer(batch_dims=1, num_steps=6)
    scores = {draws: MetaTrainModule(lopt, family, TruncatedBPTT(num_tasks=2, horizon=6, unroll_length=3),
                                     val_tasks=2, val_draws=draws).validation_log10_final_loss() for draws in (1, 4)}
    generator, by_hand, widths = seeded_generator("val", 0), [], set()
    for _ in range(4):
        task = family.sample(2, generator)
        widths.add(tuple(task.sizes))
        by_hand.append(float(log10_losses(rollout(lopt.transform(), task, 6, generator=generator)[-1]).mean()))
    assert len(widths) > 1  # the draws are different architectures
    assert scores[1] == pytest.approx(by_hand[0], rel=1e-6)
    assert scores[4] == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="val_draws"):
        MetaTrainModule(lopt, family, TruncatedBPTT(num_tasks=2, horizon=6, unroll_length=3), val_draws=0)
