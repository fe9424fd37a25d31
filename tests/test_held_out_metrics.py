"""Held-out (test-split) loss and accuracy: the tasks' ``test_metrics``, the ``on_end`` hook of
``train_with_optimizer``, and their place in ``evaluate_optimizers``, the table and the suite.

References: cross-entropy, accuracy and squared error computed by hand with
``torch.nn.functional`` on the test arrays ``tasks.datasets.load_dataset`` returns, and a
manual optimizer loop with the same seed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from learnopt.checkpoint import export_checkpoint
from learnopt.evaluate import BASELINES, Evaluation, OptimizerResult, evaluate_optimizers, train_with_optimizer
from learnopt.learned import NormalizedMLPOptimizer
from learnopt.task import seeded_generator
from tasks.autoencoder import AutoencoderFamily
from tasks.char_lm import CharLMFamily
from tasks.cnn import CNNFamily
from tasks.datasets import held_out_classification, load_dataset
from tasks.mlp import MLPFamily, MLPTask


def _trained_params(task, steps=5, lr=0.5, seed=1):
    """Parameters moved away from the initialisation, so accuracy is not at chance."""
    ends = []
    train_with_optimizer(lambda ps: torch.optim.SGD(ps, lr=lr), task, steps, seeded_generator("i", seed),
                         on_end=ends.append)
    return ends[0]


def _by_hand_classification(logits, y):
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).double().mean()


def test_mlp_test_metrics_match_cross_entropy_and_accuracy_by_hand():
    family = MLPFamily("digits", (7,), "tanh")
    task = family.sample(3, seeded_generator("t", 0))
    params = _trained_params(task)
    _, _, x_te, y_te = load_dataset("digits", 0)
    got = task.test_metrics({k: v.requires_grad_(True) for k, v in params.items()})
    assert set(got) == {"test_loss", "test_accuracy"} and got["test_loss"].shape == (3,)
    assert not got["test_loss"].requires_grad  # computed under no_grad
    for k in range(3):
        logits = torch.tanh(x_te @ params["w0"][k] + params["b0"][k]) @ params["w1"][k] + params["b1"][k]
        loss, acc = _by_hand_classification(logits, y_te)
        torch.testing.assert_close(got["test_loss"][k], loss, rtol=1e-5, atol=1e-6)
        assert float(got["test_accuracy"][k]) == pytest.approx(float(acc), abs=1e-6)
    assert len(y_te) == 297 and float(got["test_accuracy"].mean()) > 0.2  # trained: above chance (0.1)
    # the chunked pass equals one pass over the whole split
    chunked = held_out_classification(lambda x: task.logits(params, x), x_te, y_te, chunk=50)
    for key in got:
        torch.testing.assert_close(chunked[key], got[key])


def test_training_data_init_and_minibatches_are_unchanged():
    family = MLPFamily("digits", (6,), "sigmoid", batch_size=16)
    task = family.sample(2, seeded_generator("t", 0))
    x_tr, y_tr, x_te, y_te = load_dataset("digits", 0)
    assert torch.equal(task.x, x_tr) and torch.equal(task.y, y_tr)
    assert torch.equal(task.x_test, x_te) and torch.equal(task.y_test, y_te)
    # the task as built without a test split draws the same initialisation and batches
    plain = MLPTask(task.sizes, task.activation, x_tr, y_tr, 16, 2)
    for a, b in zip(task.init(seeded_generator("i", 3)).values(), plain.init(seeded_generator("i", 3)).values()):
        assert torch.equal(a, b)
    for a, b in zip(task.sample_batch(seeded_generator("b", 3)), plain.sample_batch(seeded_generator("b", 3))):
        assert torch.equal(a, b)
    assert plain.test_metrics(plain.init(seeded_generator("i", 3))) == {}


def test_to_moves_the_test_split():
    task = MLPFamily("digits", (5,), "relu").sample(2, seeded_generator("t", 0))
    params = _trained_params(task)
    wide = task.to(dtype=torch.float64)
    assert wide.x_test.dtype == torch.float64 and wide.y_test.dtype == torch.int64
    got = wide.test_metrics({k: v.double() for k, v in params.items()})
    assert got["test_loss"].dtype == torch.float64
    torch.testing.assert_close(got["test_loss"].float(), task.test_metrics(params)["test_loss"], rtol=1e-4, atol=1e-5)
    ae = AutoencoderFamily("digits", (4, 2, 4), "tanh").sample(2, seeded_generator("t", 0)).to(dtype=torch.float64)
    assert ae.x_test.dtype == torch.float64 and ae.data_scale == pytest.approx(float((ae.x.float() ** 2).mean()))
    cnn = CNNFamily(channels=(2,), kernel_size=3).sample(1, seeded_generator("t", 0)).to(dtype=torch.float64)
    assert cnn.x_test.dtype == torch.float64


def test_autoencoder_test_loss_is_the_mean_squared_reconstruction_error():
    family = AutoencoderFamily("digits", (8, 2, 8), "tanh")
    task = family.sample(2, seeded_generator("ae", 0))
    params = _trained_params(task, lr=0.1)
    x_tr, _, x_te, _ = load_dataset("digits", 0)
    assert torch.equal(task.x, x_tr)
    got = task.test_metrics(params)
    assert set(got) == {"test_loss"}
    for k in range(2):
        h = x_te
        for i in range(4):
            h = h @ params[f"w{i}"][k] + params[f"b{i}"][k]
            h = torch.tanh(h) if i < 3 else h
        torch.testing.assert_close(got["test_loss"][k], F.mse_loss(h, x_te), rtol=1e-5, atol=1e-7)


def test_cnn_test_metrics_match_conv1d_by_hand():
    family = CNNFamily(channels=(3,), kernel_size=3, stride=2, activation="relu")
    task = family.sample(2, seeded_generator("cnn", 0))
    params = _trained_params(task, lr=0.2)
    x_tr, y_tr, x_te, y_te = load_dataset("mnist1d", 0)
    assert torch.equal(task.x, x_tr) and torch.equal(task.y, y_tr)
    got = task.test_metrics(params)
    for k in range(2):
        h = torch.relu(F.conv1d(x_te[:, None, :], params["conv0_w"][k], params["conv0_b"][k], stride=2, padding=1))
        logits = h.flatten(1) @ params["fc_w"][k] + params["fc_b"][k]
        loss, acc = _by_hand_classification(logits, y_te)
        torch.testing.assert_close(got["test_loss"][k], loss, rtol=1e-5, atol=1e-6)
        assert float(got["test_accuracy"][k]) == pytest.approx(float(acc), abs=1e-6)


def test_on_end_receives_the_final_parameters_of_a_manual_loop():
    task = MLPFamily("digits", (5,), "tanh", batch_size=8).sample(2, seeded_generator("t", 0))
    calls = []
    train_with_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.3), task, 4, seeded_generator("i", 0),
                         on_end=calls.append)
    assert len(calls) == 1
    gen = seeded_generator("i", 0)
    params = {k: p.clone().requires_grad_(True) for k, p in task.init(gen).items()}
    init = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.3)
    for _ in range(4):
        opt.zero_grad()
        task.loss(params, task.sample_batch(gen)).sum().backward()
        opt.step()
    for k in params:
        torch.testing.assert_close(calls[0][k], params[k].detach())
        assert not calls[0][k].requires_grad and not torch.equal(calls[0][k], init[k])


def test_on_end_is_called_once_on_divergence():
    from tasks.quadratic import QuadraticFamily

    task = QuadraticFamily(dim=5).sample(2, seeded_generator("t", 0))
    calls = []
    losses = train_with_optimizer(lambda ps: torch.optim.SGD(ps, lr=100.0), task, 50, seeded_generator("i", 0),
                                  on_end=calls.append)
    assert len(calls) == 1 and not torch.isfinite(losses[-1]).any()


def test_evaluate_optimizers_records_test_metrics_and_the_table_shows_them():
    family = MLPFamily("digits", (4,), "tanh", batch_size=16)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.5)  # noqa: E731
    ev = evaluate_optimizers({"sgd": sgd, "adam": BASELINES["adam"]}, family, steps=3, num_instances=2,
                             seeds=(0, 1), tune=("adam",), lr_grid=(1e-2, 1e-1), tune_instances=2, progress=False)
    for r in ev.results:
        assert set(r.test_metrics) == {"test_loss", "test_accuracy"}
        assert all(len(v) == 4 for v in r.test_metrics.values())
        s = r.summary()
        assert s["mean_test_loss"] == pytest.approx(sum(r.test_metrics["test_loss"]) / 4)
        assert s["mean_test_accuracy"] == pytest.approx(sum(r.test_metrics["test_accuracy"]) / 4)
    # the recorded values are those of the final parameters of each seed's run
    sgd_result = ev.result("sgd")
    for i, seed in enumerate((0, 1)):
        gen = seeded_generator("test", seed)
        task = family.sample(2, gen)
        ends = []
        train_with_optimizer(sgd, task, 3, gen, on_end=ends.append)
        again = task.test_metrics(ends[0])
        assert sgd_result.test_metrics["test_loss"][2 * i:2 * i + 2] == pytest.approx(again["test_loss"].tolist())
    table = ev.table()
    assert "| test loss | test accuracy |" in table.splitlines()[2]
    assert table.splitlines()[3].count("---") == 10
    assert f"{ev.result('sgd').mean_test_metrics()['test_accuracy']:.4g} |" in table
    raw = json.loads(json.dumps(ev.to_json()))
    assert raw["results"]["sgd"]["test_metrics"] == sgd_result.test_metrics
    assert raw["results"]["adam"]["mean_test_loss"] == pytest.approx(ev.result("adam").summary()["mean_test_loss"])
    # results stored before test metrics existed still load
    old = dataclasses.asdict(sgd_result)
    old.pop("test_metrics")
    assert OptimizerResult(**old).test_metrics == {} and "mean_test_loss" not in OptimizerResult(**old).summary()


def test_char_lm_has_no_test_metrics_and_the_table_shows_a_dash():
    family = CharLMFamily(context=4, embed_dim=4, hidden_size=8, batch_size=4, eval_windows=16)
    assert not hasattr(family.sample(1, seeded_generator("t", 0)), "test_metrics")
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    lm = evaluate_optimizers({"sgd": sgd}, family, steps=2, num_instances=2, seeds=(0,), tune=(), progress=False)
    assert lm.results[0].test_metrics == {} and "mean_test_loss" not in lm.results[0].summary()
    assert "test loss" not in lm.table()
    mlp = evaluate_optimizers({"sgd_mlp": sgd}, MLPFamily("digits", (3,), "tanh"), steps=2, num_instances=2,
                              seeds=(0,), tune=(), progress=False)
    mixed = Evaluation("mixed", 2, 2, [0], [*lm.results, *mlp.results])
    rows = {line.split(" | ")[0]: line for line in mixed.table().splitlines() if line.startswith("| sgd")}
    assert rows["| sgd"].endswith("| — | — |")
    assert not rows["| sgd_mlp"].endswith("— |")


def test_suite_records_mean_test_metrics(in_tmp):
    from learnopt.evaluate_suite import evaluate_suite

    path = export_checkpoint(NormalizedMLPOptimizer(num_steps=3, batch_dims=1), in_tmp / "lopt.pt")
    problems = {"linear_digits": MLPFamily("digits", (), "relu"),
                "charlm": CharLMFamily(context=4, embed_dim=4, hidden_size=8, batch_size=4, eval_windows=16)}
    result = evaluate_suite(str(path), problems, steps=3, seeds=[0], num_instances=2, tune_instances=2,
                            lr_grid=[1e-2], orthogonalize=False, stability_factor=2, stability_seeds=[0],
                            out_dir="suite")
    raw = json.loads((in_tmp / "suite" / "linear_digits" / "results.json").read_text())
    for name, r in result["problems"]["linear_digits"]["results"].items():
        assert set(r["test_metrics"]) == {"test_loss", "test_accuracy"}
        assert r["test_metrics"]["test_loss"] == pytest.approx(raw["results"][name]["mean_test_loss"])
        assert 0.0 <= r["test_metrics"]["test_accuracy"] <= 1.0
    assert all(r["test_metrics"] == {} for r in result["problems"]["charlm"]["results"].values())
    assert "test accuracy" in (in_tmp / "suite" / "linear_digits" / "table.md").read_text()
    assert "test loss" not in (in_tmp / "suite" / "charlm" / "table.md").read_text()
