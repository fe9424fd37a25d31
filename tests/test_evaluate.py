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
    assert len(runs) == 4  # one per optimizer and the group's summary run (the W&B table and plot)
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


# --------------------------------------------------------------------------- learnopt baselines


def test_baseline_names_torch_four_plain_learnopt_names_and_the_lo_prefix():
    from learnopt.evaluate import LearnoptBaseline, baseline_factory

    ps = [torch.zeros(3, 2, requires_grad=True)]
    assert type(baseline_factory("adam")(ps, 0.1)) is torch.optim.Adam  # the four keep torch.optim
    assert type(baseline_factory("nag")(ps, 0.1)) is torch.optim.SGD
    for name in ("lo:adam", "lion", "lo:lion", "adabelief", "momentum"):
        make = baseline_factory(name)
        assert isinstance(make, LearnoptBaseline) and not make.needs_closure
        opt = make(ps, 0.1)
        assert isinstance(opt, learnopt.optim.TransformOptimizer) and opt.check_finite is False
    with pytest.raises(ValueError, match="unknown baseline 'lo:adamw2'.*did you mean 'adamw'"):
        baseline_factory("lo:adamw2")


def test_learnopt_baseline_gets_its_lr_and_follows_torch_adam():
    from learnopt.evaluate import baseline_factory

    family = QuadraticFamily(dim=4, dtype=torch.float64)
    task = family.sample(3, seeded_generator("t", 0))
    ours = train_with_optimizer(lambda ps: baseline_factory("lo:adam")(ps, 0.03), task, 15, seeded_generator("i", 0))
    ref = train_with_optimizer(lambda ps: BASELINES["adam"](ps, 0.03), task, 15, seeded_generator("i", 0))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert (ours[-1] < ours[0]).all()


class _FixedStartTask:
    """A quadratic task whose start is given (so one instance can be run alone with the same start)."""

    def __init__(self, task, theta0):
        self.task, self.theta0 = task, theta0

    def init(self, generator=None):
        return {"theta": self.theta0.clone()}

    def loss(self, params, batch=None):
        return self.task.loss(params, batch)

    def sample_batch(self, generator=None):
        return None


@pytest.mark.parametrize("name", ["lamb", "adagrad_norm"])
def test_reducing_learnopt_baselines_get_batch_dims_so_instances_stay_independent(name):
    from learnopt.evaluate import baseline_factory
    from tasks.quadratic import QuadraticTask

    task = QuadraticFamily(dim=4, dtype=torch.float64).sample(3, seeded_generator("t", 1))
    theta0 = task.init(seeded_generator("i", 1))["theta"]
    make = baseline_factory(name)
    together = train_with_optimizer(lambda ps: make(ps, 0.05), _FixedStartTask(task, theta0), 10, None)
    for i in range(3):
        one = QuadraticTask(task.W[i:i + 1], task.y[i:i + 1])
        alone = train_with_optimizer(lambda ps: make(ps, 0.05), _FixedStartTask(one, theta0[i:i + 1]), 10, None)
        torch.testing.assert_close(together[:, i], alone[:, 0], rtol=1e-10, atol=1e-12)
    assert (together[-1] < together[0]).all()


def test_closure_step_trains_with_an_optimizer_that_needs_one():
    """torch.optim.LBFGS reads its loss only through the closure; one instance, so the summed loss
    the closure returns is that instance's loss, and L-BFGS solves the quadratic."""
    family = QuadraticFamily(dim=4, dtype=torch.float64)
    task = family.sample(1, seeded_generator("t", 2))
    losses = train_with_optimizer(lambda ps: torch.optim.LBFGS(ps, lr=1.0, line_search_fn="strong_wolfe"),
                                  task, 5, seeded_generator("i", 2), closure=True)
    optimum = task.loss({"theta": task.optimum()})
    assert float(losses[-1, 0] - optimum[0]) < 1e-8 < float(losses[0, 0] - optimum[0])
    with pytest.raises(TypeError, match="closure"):  # without the closure the same optimizer cannot step
        train_with_optimizer(lambda ps: torch.optim.LBFGS(ps), task, 2, seeded_generator("i", 2))


def test_evaluate_tunes_learnopt_baselines_by_name(small_checkpoint, in_tmp):
    ev = evaluate(
        small_checkpoint, QuadraticFamily(dim=4), steps=10, num_instances=4, seeds=[0],
        baselines=["adam", "lo:adam", "lion", "lamb"], lr_grid=[1e-3, 1e-2, 1e-1], tune_instances=4,
        out_dir="out", wandb=False,
    )
    raw = json.loads((in_tmp / "out/results.json").read_text())
    assert set(raw["results"]) == {"tiny", "adam", "lo:adam", "lion", "lamb"}
    for name in ("lo:adam", "lion", "lamb"):
        assert raw["results"][name]["lr"] in (1e-3, 1e-2, 1e-1)
        assert set(raw["results"][name]["tuning"]) == {"0.001", "0.01", "0.1"}
    # learnopt's Adam and torch's Adam are the same algorithm: same tuned rate, same losses (float32)
    assert raw["results"]["lo:adam"]["lr"] == raw["results"]["adam"]["lr"]
    assert ev.result("lo:adam").final_losses == pytest.approx(ev.result("adam").final_losses, rel=1e-3)
    with pytest.raises(ValueError, match="unknown baseline.*'lo:nope'"):
        evaluate(small_checkpoint, QuadraticFamily(dim=3), baselines=["lo:nope"], wandb=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate(small_checkpoint, QuadraticFamily(dim=3), baselines=["lion", "lion"], wandb=False)


def test_lbfgs_baseline_steps_through_the_closure_per_instance_like_torch_lbfgs():
    """learnopt's L-BFGS (batch_dims=1, per-instance losses from the closure) against
    torch.optim.LBFGS run on each instance alone."""
    from learnopt.evaluate import LearnoptBaseline
    from tasks.quadratic import QuadraticTask

    task = QuadraticFamily(dim=4, dtype=torch.float64).sample(3, seeded_generator("t", 3))
    theta0 = task.init(seeded_generator("i", 3))["theta"]
    make = LearnoptBaseline("lbfgs", history_size=100, max_iter=3)
    assert make.needs_closure and not make.needs_hessian
    together = train_with_optimizer(lambda ps: make(ps, 0.1), _FixedStartTask(task, theta0), 4, None, closure=True)
    for i in range(3):
        one = QuadraticTask(task.W[i:i + 1], task.y[i:i + 1])
        alone = train_with_optimizer(lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=3),
                                     _FixedStartTask(one, theta0[i:i + 1]), 4, None, closure=True)
        torch.testing.assert_close(together[:, i], alone[:, 0], rtol=1e-9, atol=1e-12)
    assert (together[-1] < together[0]).all()


def test_hessian_baselines_get_hessian_vector_products_through_the_closure():
    """AdaHessian stepped by ``train_with_optimizer`` (closure gradients with a graph) follows the
    functional AdaHessian given ``loss_fn`` directly (same seeded probes)."""
    from learnopt import optim as lo
    from learnopt.evaluate import baseline_factory

    task = QuadraticFamily(dim=3, dtype=torch.float64).sample(2, seeded_generator("t", 4))
    make = baseline_factory("adahessian")
    assert make.needs_closure and make.needs_hessian
    losses = train_with_optimizer(lambda ps: make(ps, 0.05), task, 6, seeded_generator("i", 4), closure=True,
                                  create_graph=True)
    tx = lo.adahessian(lr=0.05)
    params = task.init(seeded_generator("i", 4))
    state = tx.init(params)
    for t in range(6):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = task.loss(p)
        torch.testing.assert_close(losses[t], loss.detach(), rtol=1e-10, atol=1e-12)
        grads = dict(zip(p, torch.autograd.grad(loss.sum(), list(p.values()))))
        updates, state = tx.update(grads, state, params, loss_fn=lambda q: task.loss(q).sum())
        params = lo.apply_updates(params, updates)
    assert losses[-1].sum() < losses[0].sum()


def test_finite_sum_baselines_are_refused_with_the_reason():
    from learnopt.evaluate import baseline_factory

    for name in ("svrg", "saga", "jacsketch", "stochastic_lbfgs"):
        with pytest.raises(ValueError, match=f"baseline '{name}' needs the extra update argument.*indices"):
            baseline_factory(name)


def test_compare_checkpoints_run_side_by_side(small_checkpoint, in_tmp):
    torch.manual_seed(1)
    other = str(learnopt.export_checkpoint(CoordinatewiseLSTM(hidden_size=3, output_scale=0.02), in_tmp / "other.pt"))
    ev = evaluate(small_checkpoint, QuadraticFamily(dim=3), steps=5, num_instances=4, seeds=[0], baselines=["sgd"],
                  lr_grid=[0.01, 0.1], tune_instances=4, out_dir="cmp", wandb=False, compare_checkpoints=[other])
    assert {r.name for r in ev.results} == {"tiny", "other", "sgd"}
    assert ev.result("tiny").final_losses != ev.result("other").final_losses
    with pytest.raises(ValueError, match="taken"):
        evaluate(small_checkpoint, QuadraticFamily(dim=3), baselines=["sgd"], wandb=False,
                 compare_checkpoints=[small_checkpoint])


def test_fixed_lr_skips_tuning_and_baselines_run_without_a_checkpoint(in_tmp):
    family = QuadraticFamily(dim=4)
    ev = evaluate(task_family=family, steps=8, num_instances=5, seeds=[0], baselines=["adam"], lr=0.05,
                  out_dir="fixed", wandb=False)
    (adam,) = ev.results
    assert adam.lr == 0.05 and adam.tuning == {}
    gen = seeded_generator("test", 0)
    task = family.sample(5, gen)
    direct = train_with_optimizer(lambda ps: torch.optim.Adam(ps, lr=0.05), task, 8, gen)
    assert adam.final_losses == pytest.approx(direct[-1].tolist())
    # the normalised loss divides by the family's closed-form expected initial loss d (1 + d s²)
    scale = 4 * (1 + 4 * 0.01 ** 2)
    assert adam.summary()["mean_log10_normalized_loss"] == pytest.approx(
        float(torch.log10(direct[-1].double() / scale).mean()), rel=1e-5)
    assert adam.time_per_step > 0


def test_tune_split_with_a_fixed_rate_scores_what_grid_tuning_scores(in_tmp):
    family = QuadraticFamily(dim=4)
    _, scores = tune_learning_rate(BASELINES["sgd"], family, steps=6, num_instances=5, lr_grid=(0.01, 0.1))
    for lr in (0.01, 0.1):
        ev = evaluate(task_family=family, steps=6, num_instances=5, seeds=[0], baselines=["sgd"], lr=lr,
                      split="tune", out_dir=f"t{lr}", wandb=False)
        assert ev.results[0].summary()["mean_log10_final_loss"] == pytest.approx(scores[lr])


def test_evaluate_argument_errors_name_the_problem(in_tmp):
    family = QuadraticFamily(dim=3)
    with pytest.raises(ValueError, match="give a fixed lr"):
        evaluate(task_family=family, baselines=["sgd"], split="tune", wandb=False)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(task_family=family, baselines=[], wandb=False)
    with pytest.raises(ValueError, match="lr must be a positive"):
        evaluate(task_family=family, baselines=["sgd"], lr=-1.0, wandb=False)
    with pytest.raises(ValueError, match="task_family"):
        evaluate(baselines=["sgd"], wandb=False)


def test_speedup_column_uses_the_compare_definition(small_checkpoint, in_tmp):
    from learnopt.compare import speedup

    ev = evaluate(small_checkpoint, QuadraticFamily(dim=4), steps=8, num_instances=4, seeds=[0],
                  baselines=["sgd", "adam"], lr_grid=[0.01, 0.1], tune_instances=4, out_dir="sp", wandb=False)
    adam = ev.result("adam").curve
    for r in ev.results:
        assert ev.speedup(r) == speedup(r.curve, adam)
    assert ev.speedup(ev.result("adam")) == 1.0
    assert "| speedup vs Adam |" in (in_tmp / "sp/table.md").read_text()
