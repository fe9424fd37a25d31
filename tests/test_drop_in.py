"""The drop-in contract of ``TransformOptimizer`` (``as_torch_optimizer``, ``load_optimizer``):
param groups, schedulers, grad-None parameters, ``state[p]``, ``state_dict``, hooks, bad input.

References: ``torch.optim.Adam`` / ``torch.optim.SGD`` driven by the same scheduler (float64
trajectories), and torch.optim's own behaviour for the contract (skipped parameters, layouts).
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

import learnopt
from learnopt import optim as lo
from learnopt.learned.lstm import CoordinatewiseLSTM
from learnopt.learned.mlp_lopt import FeatureMLPOptimizer
from learnopt.optim.registry import OPTIMIZERS

DT = torch.float64
STEPS = 24


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g, dtype=DT), torch.randn(32, 3, generator=g, dtype=DT)


def _groups(model: nn.Module, lr0: float, lr1: float) -> list[dict]:
    return [{"params": model[0].parameters(), "lr": lr0}, {"params": model[2].parameters(), "lr": lr1}]


# Every scheduler of torch.optim.lr_scheduler, built on an optimizer with two groups.
SCHEDULERS = {
    "StepLR": lambda o: sched.StepLR(o, step_size=5, gamma=0.5),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[4, 11], gamma=0.3),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=STEPS, cycle_momentum=True),
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda e: 1.0 / (1.0 + 0.3 * e)),
    "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda e: 0.95),
    "SequentialLR": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.1, total_iters=5), sched.ExponentialLR(o, gamma=0.9)], milestones=[5]),
    "ChainedScheduler": lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, factor=0.5, total_iters=6), sched.ExponentialLR(o, gamma=0.95)]),
    "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=STEPS, power=2.0),
    "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=[0.001, 0.002], max_lr=[0.03, 0.05], step_size_up=4,
                                         cycle_momentum=True, base_momentum=0.8, max_momentum=0.9),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=1, threshold=0.05),
}

# (learnopt drop-in, its torch.optim peer) with the same defaults.
PEERS = {
    "adam": (lambda g: lo.as_torch_optimizer(lo.adam(lr=0.01, betas=(0.9, 0.99)), g),
             lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.9, 0.99))),
    "sgd_momentum": (lambda g: lo.as_torch_optimizer(lo.sgd(lr=0.01, momentum=0.9), g),
                     lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9)),
}


def _run(make_opt, make_sched, model, steps=STEPS):
    X, Y = _data()
    opt = make_opt(_groups(model, 0.02, 0.005))
    scheduler = make_sched(opt)
    traj, lrs = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        if isinstance(scheduler, sched.ReduceLROnPlateau):
            scheduler.step(loss.item())
        else:
            scheduler.step()
        traj.append([p.detach().clone() for p in model.parameters()])
        lrs.append([g["lr"] for g in opt.param_groups])
    return traj, lrs, opt


@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_drives_the_drop_in_like_torch_optim(name, peer):
    ours_opt, torch_opt = PEERS[peer]
    ours, our_lrs, opt = _run(ours_opt, SCHEDULERS[name], _model())
    ref, ref_lrs, ref_opt = _run(torch_opt, SCHEDULERS[name], _model())
    assert our_lrs == ref_lrs
    assert len({tuple(lr) for lr in ref_lrs}) > 1  # the schedule changed the rates
    for t, (a, b) in enumerate(zip(ours, ref)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9, msg=lambda m: f"step {t + 1}: {m}")
    if name in ("OneCycleLR", "CyclicLR"):  # momentum cycling reached the groups, as torch's
        key = "betas" if peer == "adam" else "momentum"
        assert [g[key] for g in opt.param_groups] == [g[key] for g in ref_opt.param_groups]


def test_writing_a_group_lr_takes_effect_at_the_next_step():
    model = _model()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.01), _groups(model, 0.01, 0.01))
    X, Y = _data()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.param_groups[0]["lr"] = 0.0
    frozen = [p.detach().clone() for p in model[0].parameters()]
    moving = [p.detach().clone() for p in model[2].parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    assert all(not torch.equal(p, q) for p, q in zip(model[2].parameters(), moving))


def test_groups_show_every_hyperparameter_under_torch_names_with_defaults_filled():
    model = _model()
    opt = lo.as_torch_optimizer(lo.adamw(lr=3e-4), [{"params": model[0].parameters(), "weight_decay": 0.0},
                                                   {"params": model[2].parameters()}])
    ref = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.0},
                             {"params": model[2].parameters()}], lr=3e-4)
    for ours, theirs in zip(opt.param_groups, ref.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert ours[key] == theirs[key]
    sgd = lo.as_torch_optimizer(lo.sgd(lr=0.1, momentum=0.9, nesterov=True), model.parameters())
    assert {k: sgd.param_groups[0][k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")} == \
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": True}
    # a wrapper shows its inner optimizer's hyperparameters too
    la = lo.as_torch_optimizer(lo.lookahead(lo.rmsprop(lr=0.01), k=3), model.parameters())
    assert {"lr", "alpha", "momentum", "k", "lookahead_alpha"} <= set(la.param_groups[0])


def test_add_param_group_gives_new_parameters_a_fresh_state_and_trains_them():
    model = _model()
    X, Y = _data()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.01), model[0].parameters())
    ref = torch.optim.Adam(copy.deepcopy(model)[0].parameters(), lr=0.01)
    ref_model = copy.deepcopy(model)
    ref = torch.optim.Adam(ref_model[0].parameters(), lr=0.01)
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": model[2].parameters(), "lr": 0.03})
            ref.add_param_group({"params": ref_model[2].parameters(), "lr": 0.03})
        for o, m in ((opt, model), (ref, ref_model)):
            o.zero_grad()
            nn.functional.mse_loss(m(X), Y).backward()
            o.step()
    assert int(opt.state[model[2].weight]["count"]) == 3 and int(opt.state[model[0].weight]["count"]) == 6
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# -- grad-None parameters -------------------------------------------------------------------------
def _every_drop_in():
    """(id, factory of a drop-in over named params, extra step keywords): the whole catalogue
    and the learned optimizers."""
    out = []
    for name, info in OPTIMIZERS.items():
        kwargs = {"num_examples": 4} if name in ("saga", "jacsketch") else {}
        out.append((name, lambda params, info=info, kwargs=kwargs:
                    lo.as_torch_optimizer(info.make(0.01, **kwargs), params)))
    torch.manual_seed(0)
    lstm = CoordinatewiseLSTM(hidden_size=4, num_layers=1).to(DT)
    out.append(("lstm", lambda params: lstm.as_torch_optimizer(params)))
    mlp = FeatureMLPOptimizer(hidden_sizes=(8,)).to(DT)
    out.append(("mlp_lopt", lambda params: mlp.as_torch_optimizer(params)))
    return out


def _step_extras(name: str, model: nn.Module, X, Y):
    """The extra ``step`` keywords a catalogue entry needs, from a loss over the used layer only."""
    def loss_of(params, idx=None):
        x, y = (X, Y) if idx is None else (X[idx], Y[idx])
        return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    if name in ("svrg", "stochastic_lbfgs"):
        @torch.enable_grad()
        def batch_grad_fn(params, indices):
            p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            return dict(zip(p, torch.autograd.grad(loss_of({**dict(model.named_parameters()), **p}, indices),
                                                   list(p.values()))))
        full = lambda params: batch_grad_fn(params, torch.arange(4))  # noqa: E731
        extra = {"indices": torch.tensor([0, 1]), "batch_grad_fn": batch_grad_fn, "full_grad_fn": full,
                 "num_examples": 4}
        if name == "stochastic_lbfgs":
            extra["loss_fn"] = lambda params: loss_of({**dict(model.named_parameters()), **params})
        return extra
    if name in ("saga", "jacsketch"):
        @torch.enable_grad()
        def example_grads_fn(params, indices):
            out = {k: [] for k in params}
            for i in indices.tolist():
                p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                g = torch.autograd.grad(loss_of({**dict(model.named_parameters()), **p}, torch.tensor([i])),
                                        list(p.values()))
                for k, gi in zip(p, g):
                    out[k].append(gi)
            return {k: torch.stack(v) for k, v in out.items()}
        return {"indices": torch.tensor([0, 2]), "example_grads_fn": example_grads_fn}
    return {}


@pytest.mark.parametrize("name,make", _every_drop_in(), ids=[n for n, _ in _every_drop_in()])
def test_a_parameter_whose_grad_stays_none_is_bit_identical_after_100_steps(name, make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X, Y = _data()
    opt = make(list(model.named_parameters()))
    unused = [p.detach().clone() for p in model[2].parameters()]
    state_before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model[2].parameters()}
    used_before = [p.detach().clone() for p in model[0].parameters()]
    extra = _step_extras(name, model, X, Y)
    create_graph = name in ("adahessian", "sophia")

    def closure():
        opt.zero_grad()
        loss = model[0](X).tanh().pow(2).mean()  # the second layer takes no part
        loss.backward(create_graph=create_graph)
        return loss

    for _ in range(100):
        if name in ("lbfgs", "newton"):
            opt.step(closure)
        else:
            closure()
            opt.step(**extra)
    assert all(p.grad is None for p in model[2].parameters())
    for p, q in zip(model[2].parameters(), unused):
        assert torch.equal(p, q)
    for p, saved in state_before.items():
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert any(not torch.equal(p, q) for p, q in zip(model[0].parameters(), used_before))  # the rest trained


def test_freezing_then_unfreezing_a_layer_under_a_learned_optimizer():
    torch.manual_seed(0)
    lstm = CoordinatewiseLSTM(hidden_size=4, num_layers=1).to(DT)
    model = _model()
    X, Y = _data()
    opt = lstm.as_torch_optimizer(model.parameters())
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    model[0].requires_grad_(True)
    opt.zero_grad()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))


# -- state and state_dict -------------------------------------------------------------------------
def test_state_dict_has_torchs_layout_and_loads_into_an_optimizer_over_a_fresh_model():
    model = _model()
    X, Y = _data()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.01), _groups(model, 0.02, 0.005))
    scheduler = sched.StepLR(opt, 2, 0.5)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
        scheduler.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert set(sd["state"]) == {0, 1, 2, 3} and set(sd["state"][0]) == {"count", "mu", "nu"}
    assert sd["param_groups"][0]["lr"] == opt.param_groups[0]["lr"] and "betas" in sd["param_groups"][1]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    fresh = _model(seed=7)
    fresh.load_state_dict(saved["model"])
    opt2 = lo.as_torch_optimizer(lo.adam(lr=0.01), _groups(fresh, 0.02, 0.005))
    opt2.load_state_dict(saved["opt"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt2.state_dict()["state"].keys() == sd["state"].keys()
    for _ in range(5):
        for o, m in ((opt, model), (opt2, fresh)):
            o.zero_grad()
            nn.functional.mse_loss(m(X), Y).backward()
            o.step()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_step_hooks_run_around_every_step():
    model = _model()
    opt = lo.as_torch_optimizer(lo.sgd(lr=0.1), model.parameters())
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", model[0].bias[0].item())))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", model[0].bias[0].item())))
    X, Y = _data()
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()
    assert [k for k, _ in seen] == ["pre", "post"] and seen[0][1] != seen[1][1]


def test_sparse_gradient_is_refused_naming_the_parameter_and_nothing_changes():
    emb = nn.Embedding(10, 3, sparse=True).to(DT)
    lin = nn.Linear(3, 1).to(DT)
    opt = lo.as_torch_optimizer(lo.adam(lr=0.1), list(emb.named_parameters(prefix="emb")) +
                                list(lin.named_parameters(prefix="lin")))
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
    with pytest.raises(RuntimeError, match="'emb.weight' has a sparse gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip((*emb.parameters(), *lin.parameters()), before))
    with pytest.raises(RuntimeError, match="sparse"):  # torch.optim.Adam refuses it too
        torch.optim.Adam(emb.parameters()).step()


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,error,words", [
    (lambda m: [{"params": m[0].parameters(), "lrr": 0.1}], ValueError, ["param group 0", "'lrr'", "lr"]),
    (lambda m: [{"params": m[0].parameters()}, {"params": [m[0].weight]}], ValueError,
     ["param group 1", "already in another param group"]),
    (lambda m: [{"params": m[0].parameters(), "lr": float("nan")}], ValueError, ["param group 0", "lr=nan", "finite"]),
    (lambda m: [{"params": m[0].parameters()}, {"params": [], "lr": 0.1}], ValueError,
     ["param group 1", "no parameters"]),
    (lambda m: [{"lr": 0.1}], ValueError, ["param group 0", "no 'params'"]),
    (lambda m: [{"params": [m[0].weight, m[0].weight]}], ValueError, ["param group 0", "twice"]),
])
def test_bad_param_groups_get_clear_errors(groups, error, words):
    model = _model()
    with pytest.raises(error) as info:
        lo.as_torch_optimizer(lo.adam(), groups(model))
    for w in words:
        assert w in str(info.value)


def test_bad_add_param_group_and_bad_lr_at_step_change_nothing():
    model = _model()
    X, Y = _data()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.01), model[0].parameters())
    with pytest.raises(ValueError, match="param group 1: unknown option"):
        opt.add_param_group({"params": model[2].parameters(), "momentum": 0.9})
    assert len(opt.param_groups) == 1 and model[2].weight not in opt.state
    opt.add_param_group({"params": model[2].parameters()})  # the same parameters are still free
    nn.functional.mse_loss(model(X), Y).backward()
    opt.param_groups[1]["lr"] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="param group 1: lr=inf is not finite"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_load_state_dict_refuses_a_state_of_another_layout_naming_parameter_and_key():
    model = _model()
    opt = lo.as_torch_optimizer(lo.adam(), model.parameters())
    sd = opt.state_dict()
    sd["state"][1]["mu"] = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="parameter '1', state 'mu' has shape"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="layout"):
        opt.load_state_dict({"tx_state": []})


# -- learned optimizers ---------------------------------------------------------------------------
def test_learned_optimizer_groups_have_an_lr_multiplier(tmp_path):
    torch.manual_seed(0)
    path = learnopt.export_checkpoint(CoordinatewiseLSTM(hidden_size=4, num_layers=1), tmp_path / "l.pt")
    X, Y = _data()
    runs = {}
    for lr in (1.0, 0.5):
        model = _model().float()
        opt = learnopt.load_optimizer(path, [{"params": model[0].parameters(), "lr": lr},
                                             {"params": model[2].parameters(), "lr": 0.0}])
        start = [p.detach().clone() for p in model.parameters()]
        model[2].weight.grad = None
        nn.functional.mse_loss(model(X.float()), Y.float()).backward()
        opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), start[2:]))  # lr 0: never moves
        runs[lr] = [p.detach() - q for p, q in zip(model[0].parameters(), start[:2])]
    assert opt.defaults == {"lr": 1.0}
    for full, half in zip(runs[1.0], runs[0.5]):  # the first step from the same state: exactly half
        torch.testing.assert_close(half, 0.5 * full)


# -- Lightning ------------------------------------------------------------------------------------
LIGHTNING_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "lstm_digits_mlp.pt"


def _lightning_module():
    import lightning as L

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = learnopt.load_optimizer(LIGHTNING_CHECKPOINT, [
                {"params": self.net[0].parameters(), "lr": 1.0},
                {"params": self.net[2].weight, "lr": 0.0},
                {"params": self.net[2].bias, "lr": 0.5},
            ])
            return {"optimizer": opt, "lr_scheduler": sched.StepLR(opt, step_size=2, gamma=0.5)}

    return Regression


def _fit(root, epochs, resume=None):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    X, Y = (t.float() for t in _data())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8)
    module = _lightning_module()()
    trainer = L.Trainer(max_epochs=epochs, logger=CSVLogger(root, name="log"), log_every_n_steps=1,
                        callbacks=[LearningRateMonitor(logging_interval="epoch"),
                                   ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, loader, ckpt_path=resume)
    return module, trainer


def test_lightning_fit_with_lr_monitor_steplr_frozen_group_and_bit_identical_resume(tmp_path):
    import csv

    start = [p.detach().clone() for p in _lightning_module()().parameters()]
    full, trainer = _fit(tmp_path / "full", epochs=6)
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    logged = {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0] if k.startswith("lr-")}
    assert sorted(logged) == ["lr-TransformOptimizer/pg1", "lr-TransformOptimizer/pg2", "lr-TransformOptimizer/pg3"]
    assert logged["lr-TransformOptimizer/pg1"] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert logged["lr-TransformOptimizer/pg3"] == [0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    assert logged["lr-TransformOptimizer/pg2"] == [0.0] * 6
    params = list(full.parameters())
    assert torch.equal(params[2], start[2])  # the group at lr 0 never moved
    assert not torch.equal(params[0], start[0]) and not torch.equal(params[3], start[3])

    _fit(tmp_path / "first", epochs=3)
    resumed, _ = _fit(tmp_path / "second", epochs=6, resume=tmp_path / "first" / "ckpt" / "last.ckpt")
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_momentum_cycled_up_from_zero_creates_the_buffer_as_torch_sgd_does():
    """SGD built without momentum has no momentum state; OneCycleLR's cycling makes it appear."""
    make_ours = lambda g: lo.as_torch_optimizer(lo.sgd(lr=0.01), g)  # noqa: E731
    make_ref = lambda g: torch.optim.SGD(g, lr=0.01)  # noqa: E731
    ours, _, opt = _run(make_ours, SCHEDULERS["OneCycleLR"], _model())
    ref, _, _ = _run(make_ref, SCHEDULERS["OneCycleLR"], _model())
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"count", "trace"}
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name,make", _every_drop_in()[-2:] + [("adam", lambda p: lo.as_torch_optimizer(lo.adam(), p))],
                         ids=["lstm", "mlp_lopt", "adam"])
def test_zero_size_parameters_step_as_no_ops(name, make):
    empty = nn.Parameter(torch.zeros(0, 3, dtype=DT))
    opt = make([("empty", empty)])
    empty.grad = torch.zeros(0, 3, dtype=DT)
    opt.step()
    assert empty.shape == (0, 3)
