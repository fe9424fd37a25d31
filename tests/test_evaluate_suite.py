"""``learnopt.evaluate_suite`` (the held-out suite of issue 23) and the task families it adds
(``tasks.autoencoder``, the GELU MLP).

References: closed forms (the interquartile mean of small lists, the cosine schedule, the
reconstruction error of a zero network), ``torch.nn.functional.gelu`` and hand-made records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from learnopt.checkpoint import export_checkpoint, update_metadata
from learnopt.evaluate_suite import ScheduledOptimizer, evaluate_suite, iqm, summarize
from learnopt.learned import NormalizedMLPOptimizer
from learnopt.task import seeded_generator
from tasks.autoencoder import AutoencoderFamily
from tasks.mlp import MLPFamily

SUITE = Path(__file__).resolve().parents[1] / "configs" / "evaluate_general_suite.yaml"


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert iqm([100.0, 1.0, 3.0, 2.0]) == pytest.approx(2.5)   # mean of 2, 3: outliers do not count
    assert iqm([0.0, 1.0, math.inf, 2.0]) == pytest.approx(1.5)


def test_cosine_schedule_follows_its_closed_form():
    w = torch.zeros(2, requires_grad=True)
    base = torch.optim.Adam([w], lr=0.1)
    opt = ScheduledOptimizer(base, torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=8))
    for k in range(1, 9):
        w.grad = torch.ones(2)
        opt.step()
        assert base.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * k / 8)), abs=1e-12)


def test_summarize_counts_wins_and_takes_iqms():
    def row(beats, speedup, stable=True):
        return {"beats_adam_1e-3": beats[0], "beats_adam": beats[1], "beats_adam_cosine": beats[2],
                "speedup_vs_adam": speedup, "speedup_vs_adam_cosine": speedup / 2,
                "stability": [{"stable": stable}]}

    problems = {f"p{i}": {"results": {"lopt": r, "adam": {"lr": 0.01}}} for i, r in enumerate([
        row((True, True, False), 1.0), row((True, False, False), 2.0), row((False, False, False), 3.0),
        row((True, True, True), 40.0, stable=False)])}
    s = summarize(problems)["lopt"]
    assert s["fraction_beating_adam_1e-3"] == 0.75 and s["fraction_beating_adam"] == 0.5
    assert s["fraction_beating_adam_cosine"] == 0.25
    assert s["speedup_iqm_vs_adam"] == pytest.approx(2.5) and s["speedup_iqm_vs_adam_cosine"] == pytest.approx(1.25)
    assert s["stable_everywhere"] is False and s["problems"] == 4


def test_autoencoder_of_a_zero_network_scores_the_data_mean_square():
    family = AutoencoderFamily("digits", (8, 2, 8), "tanh")
    task = family.sample(3, seeded_generator("ae", 0))
    zero = {k: torch.zeros_like(v) for k, v in task.init(seeded_generator("ae", 1)).items()}
    assert task.sizes == (64, 8, 2, 8, 64)
    torch.testing.assert_close(family.normalize(task.full_loss(zero)), torch.ones(3))
    x, y = task.sample_batch(seeded_generator("ae", 2))
    torch.testing.assert_close(task.loss(zero, (x, y)), (x * x).mean(dim=(-2, -1)))


def test_gelu_mlp_uses_torch_gelu():
    task = MLPFamily("digits", (5,), "gelu").sample(1, seeded_generator("gelu", 0))
    p = task.init(seeded_generator("gelu", 1))
    x = task.x[:7]
    expected = torch.nn.functional.gelu(x @ p["w0"][0] + p["b0"][0]) @ p["w1"][0] + p["b1"][0]
    torch.testing.assert_close(task.logits(p, x)[0], expected)


def test_suite_config_names_at_least_eight_problems_and_three_seeds():
    import yaml

    cfg = yaml.safe_load(SUITE.read_text())
    assert len(cfg["problems"]) >= 8 and cfg["seeds"] == [0, 1, 2]


def test_suite_runs_end_to_end(in_tmp):
    path = export_checkpoint(NormalizedMLPOptimizer(num_steps=4, batch_dims=1), in_tmp / "lopt.pt")
    problems = {"linear_digits": MLPFamily("digits", (), "relu"),
                "ae_digits": AutoencoderFamily("digits", (4, 2, 4), "tanh")}
    result = evaluate_suite(str(path), problems, steps=4, seeds=[0, 1], num_instances=2, tune_instances=2,
                            lr_grid=[1e-3, 1e-2], stability_factor=2, stability_seeds=[1], out_dir="suite")
    assert set(result["summary"]) == {"lopt", "lopt+ns"}
    for name, record in result["problems"].items():
        assert (in_tmp / "suite" / name / "curves.png").exists()
        res = record["results"]
        assert res["adam"]["lr"] in (1e-3, 1e-2) and res["adam_1e-3"]["lr"] is None
        for lname in ("lopt", "lopt+ns"):
            mine = res[lname]["mean_log10_final_loss"]
            assert res[lname]["beats_adam"] == (mine < res["adam"]["mean_log10_final_loss"])
            [stab] = res[lname]["stability"]
            assert stab["seed"] == 1 and stab["ordinary_log10_final"] == res[lname]["seed_means"][1]
    saved = json.loads((in_tmp / "suite" / "suite.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert "speedup IQM" in (in_tmp / "suite" / "suite.md").read_text()


def test_baselines_are_cached_by_what_they_depend_on(in_tmp, monkeypatch):
    import learnopt.evaluate_suite as suite

    calls = []
    original = suite.suite_baselines

    def counted(steps):
        def wrap(name, make):
            return lambda *a: calls.append(name) or make(*a)
        return {name: wrap(name, make) for name, make in original(steps).items()}

    monkeypatch.setattr(suite, "suite_baselines", counted)
    assert suite.baseline_key("p", MLPFamily("digits", (), "relu"), 4, [0], 2, 2, [1e-3]) == \
        suite.baseline_key("p", MLPFamily("digits", (), "relu"), 4, [0], 2, 2, [1e-3])  # a fresh family, same key
    assert suite.baseline_key("p", MLPFamily("digits", (), "relu"), 4, [0], 2, 2, [1e-3]) != \
        suite.baseline_key("p", MLPFamily("digits", (), "tanh"), 4, [0], 2, 2, [1e-3])
    first = export_checkpoint(NormalizedMLPOptimizer(num_steps=4, batch_dims=1), in_tmp / "first.pt")
    second = export_checkpoint(NormalizedMLPOptimizer(num_steps=4, batch_dims=1, nominal=0.5), in_tmp / "second.pt")
    kw = dict(steps=4, seeds=[0], num_instances=2, tune_instances=2, lr_grid=[1e-3, 1e-2], orthogonalize=False,
              stability_factor=2, out_dir="suite")
    a = evaluate_suite(str(first), {"linear": MLPFamily("digits", (), "relu")}, **kw)
    assert calls and (in_tmp / "suite" / "baselines.json").exists()
    calls.clear()
    b = evaluate_suite(str(second), {"linear": MLPFamily("digits", (), "relu")}, **kw)
    assert calls == []  # only the learned optimizer trained
    for name in ("adam_1e-3", "adam", "adam_cosine", "adamw", "sgd_momentum", "muon"):
        assert b["problems"]["linear"]["results"][name] == a["problems"]["linear"]["results"][name]
    assert "second" in b["summary"]
    evaluate_suite(str(second), {"linear": MLPFamily("digits", (), "relu")}, **{**kw, "steps": 3})
    assert calls  # another run length: the baselines ran again


def test_a_stopped_suite_resumes_from_the_finished_problems(in_tmp, monkeypatch):
    import learnopt.evaluate_suite as suite

    path = export_checkpoint(NormalizedMLPOptimizer(num_steps=4, batch_dims=1), in_tmp / "lopt.pt")
    problems = {"first": MLPFamily("digits", (), "relu"), "second": MLPFamily("digits", (), "tanh")}
    kw = dict(steps=4, seeds=[0], num_instances=2, tune_instances=2, lr_grid=[1e-3], orthogonalize=False,
              stability_factor=2, out_dir="suite")
    trained, original = [], suite.learned_factories

    def killed_on_second(checkpoint, steps, orthogonalize):
        trained.append(steps)
        if len(trained) == 3:  # the second problem's ordinary run: the process dies there
            raise KeyboardInterrupt
        return original(checkpoint, steps, orthogonalize)

    monkeypatch.setattr(suite, "learned_factories", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate_suite(str(path), problems, **kw)
    assert (in_tmp / "suite" / "first" / "record.json").exists()
    assert not (in_tmp / "suite" / "second" / "record.json").exists()
    trained.clear()
    counted = lambda *a: trained.append(a[1]) or original(*a)  # noqa: E731
    monkeypatch.setattr(suite, "learned_factories", counted)
    resumed = evaluate_suite(str(path), problems, **kw)
    assert trained == [4, 8]  # only the second problem trained (its ordinary and its stability run)
    fresh = evaluate_suite(str(path), problems, **{**kw, "out_dir": "fresh"})
    assert json.loads(json.dumps(resumed["problems"])) == json.loads(json.dumps(fresh["problems"]))
    update_metadata(path, note="metadata only")
    trained.clear()
    evaluate_suite(str(path), problems, **kw)
    assert trained == []  # the same learned optimizer: nothing trains again
    export_checkpoint(NormalizedMLPOptimizer(num_steps=4, batch_dims=1, nominal=0.5), path)
    evaluate_suite(str(path), problems, **kw)
    assert trained == [4, 8, 4, 8]  # another learned optimizer in the same file: every problem again
