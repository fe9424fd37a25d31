"""The evaluation protocol: tuning, scoring of divergence, statistics, outputs, W&B runs."""

from __future__ import annotations

import glob
import json
import math

import pytest
import torch

import learnopt
from learnopt.evaluate import (
    BASELINES,
    DIVERGED_LOG10,
    evaluate,
    evaluate_cli,
    log10_losses,
    t_interval,
    train_with_optimizer,
    tune_learning_rate,
)
from learnopt.learned import CoordinatewiseLSTM
from learnopt.task import seeded_generator
from tasks.quadratic import QuadraticFamily


def test_train_with_torch_sgd_matches_closed_form_gradient_descent():
    family = QuadraticFamily(dim=4, dtype=torch.float64)
    gen = seeded_generator("t", 0)
    task = family.sample(3, gen)
    theta0 = task.init(seeded_generator("i", 0))["theta"]
    losses = train_with_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.01), task, 5, seeded_generator("i", 0))
    theta = theta0.clone()
    for t in range(5):
        r = torch.einsum("nij,nj->ni", task.W, theta) - task.y
        torch.testing.assert_close(losses[t], (r * r).sum(-1))
        theta = theta - 0.01 * 2 * torch.einsum("nji,nj->ni", task.W, r)
    r = torch.einsum("nij,nj->ni", task.W, theta) - task.y
    torch.testing.assert_close(losses[5], (r * r).sum(-1))


def test_divergence_scores_as_diverged_not_missing():
    family = QuadraticFamily(dim=5)
    task = family.sample(4, seeded_generator("t", 0))
    losses = train_with_optimizer(lambda ps: torch.optim.SGD(ps, lr=100.0), task, 50, seeded_generator("i", 0))
    assert losses.shape == (51, 4)
    assert (log10_losses(losses[-1]) == DIVERGED_LOG10).all()
    assert log10_losses(torch.tensor([1e-3, float("nan"), float("inf"), 1e40])).tolist() == pytest.approx(
        [-3.0, DIVERGED_LOG10, DIVERGED_LOG10, DIVERGED_LOG10]
    )


def test_tuning_picks_the_grid_point_with_the_lowest_held_out_score():
    family = QuadraticFamily(dim=5)
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 10.0)
    best, scores = tune_learning_rate(BASELINES["adam"], family, steps=20, num_instances=16, lr_grid=grid)
    assert set(scores) == set(grid)
    assert scores[best] == min(scores.values())
    assert scores[1e-4] > scores[1e-1]  # a tiny rate barely moves in 20 steps


def test_t_interval_matches_the_t_table():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    mean, half = t_interval(x)
    # t_{0.975, 4} = 2.776 (standard table); s = sqrt(2.5)
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)


@pytest.fixture
def small_checkpoint(in_tmp):
    torch.manual_seed(0)
    lopt = CoordinatewiseLSTM(hidden_size=4, output_scale=0.01)
    return str(learnopt.export_checkpoint(lopt, in_tmp / "tiny.pt", {"note": "untrained"}))


def test_evaluate_writes_table_raw_numbers_plot_and_one_wandb_run_per_optimizer(small_checkpoint, in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ev = evaluate(
        small_checkpoint, QuadraticFamily(dim=4), steps=10, num_instances=6, seeds=[0, 1],
        baselines=["sgd", "adam"], lr_grid=[1e-3, 1e-2, 1e-1], tune_instances=6, out_dir="out", group="g",
        record_in_checkpoint=True,
    )
    out = in_tmp / "out"
    assert (out / "curves.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    raw = json.loads((out / "results.json").read_text())
    assert set(raw["results"]) == {"tiny", "sgd", "adam"}
    for name, r in raw["results"].items():
        finals = torch.tensor(r["final_losses"], dtype=torch.float64)
        assert finals.numel() == 12  # 2 seeds × 6 instances
        mean = float(log10_losses(finals).mean())
        assert r["mean_log10_final_loss"] == pytest.approx(mean)
        assert f"| {name} |" in table and f"{mean:.3f}" in table
        assert len(r["curve_mean_log10_loss"]) == 11
    assert raw["results"]["adam"]["lr"] in (1e-3, 1e-2, 1e-1)
    assert raw["results"]["tiny"]["lr"] is None
    # the learned optimizer ran through the drop-in path: a direct run on seed 0 gives the same numbers
    gen = seeded_generator("test", 0)
    task = QuadraticFamily(dim=4).sample(6, gen)
    direct = train_with_optimizer(lambda ps: learnopt.load_optimizer(small_checkpoint, ps), task, 10, gen)
    assert ev.result("tiny").final_losses[:6] == pytest.approx(direct[-1].tolist())
    runs = glob.glob(str(in_tmp / "runs/wandb/offline-run-*"))
    assert len(runs) == 3
    # the summary went into the checkpoint's metadata; weights and old metadata kept
    reloaded = learnopt.load(small_checkpoint)
    meta = reloaded.checkpoint_metadata
    assert meta["note"] == "untrained"
    assert meta["evaluation"]["results"]["adam"]["mean_log10_final_loss"] == pytest.approx(
        raw["results"]["adam"]["mean_log10_final_loss"])


def test_evaluate_rejects_a_bad_checkpoint_before_any_work(in_tmp):
    (in_tmp / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(learnopt.CheckpointError, match="bad.pt"):
        evaluate(str(in_tmp / "bad.pt"), QuadraticFamily(dim=3), wandb=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate(str(in_tmp / "bad.pt"), QuadraticFamily(dim=3), baselines=["adamw2"], wandb=False)


def test_evaluate_cli_reads_yaml_and_rejects_unknown_keys(small_checkpoint, in_tmp, capsys):
    (in_tmp / "ev.yaml").write_text(
        "task_family:\n  class_path: tasks.quadratic.QuadraticFamily\n  init_args: {dim: 3}\n"
        "steps: 5\nnum_instances: 4\nseeds: [0]\nbaselines: [sgd]\nlr_grid: [0.01, 0.1]\n"
        "tune_instances: 4\nout_dir: cli_out\nwandb: false\n"
    )
    ev = evaluate_cli(["--config", "ev.yaml", "--checkpoint", small_checkpoint])
    assert ev.steps == 5 and (in_tmp / "cli_out/table.md").exists()
    with pytest.raises(SystemExit):
        evaluate_cli(["--config", "ev.yaml", "--checkpoint", small_checkpoint, "--stepz", "3"])
    assert "stepz" in capsys.readouterr().err
