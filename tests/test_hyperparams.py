"""Tests of learnable hyperparameters: ``learnopt.optim.inject_hyperparams`` and
``learnopt.learned.LearnedHyperparameters``.

References: ``torch.optim`` (with ``param_groups`` changed by hand between steps for schedules
and changed hyperparameters); the plain factory (what injection must not change); central
finite differences of the meta-loss; closed-form inverses of the parametrisations; the
module that was exported (for checkpoints). Float64 wherever values are compared.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

import learnopt
from learnopt import optim as lo
from learnopt.checkpoint import CheckpointError
from learnopt.learned import REGISTRY, LearnedHyperparameters
from learnopt.learned.hyperparams import LOG, LOGIT_ONE_MINUS, optimizer_names, to_constrained, to_unconstrained
from learnopt.meta import TruncatedBPTT
from learnopt.meta.unroll import rollout
from learnopt.task import seeded_generator
from tasks.quadratic import QuadraticFamily
from conftest import central_difference

DT = torch.float64
RTOL, ATOL = 1e-10, 1e-12
STEPS = 25
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "learned_lr_adam_quadratic.yaml"


# --------------------------------------------------------------------------- problem and loops


def _problem(seed: int = 0):
    """A smooth non-quadratic float64 problem on two tensors of different shapes."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 4, generator=g, dtype=DT) / 2
    b = torch.randn(6, 3, generator=g, dtype=DT)
    c = torch.randn(4, generator=g, dtype=DT)

    def loss_fn(params):
        W, v = params["W"], params["v"]
        z = torch.tanh(A @ (W.T + v[:, None]) - b)
        return (z**2).sum() + 0.1 * (W**4).sum() + 0.1 * ((v - c) ** 4).sum()

    start = {"W": torch.randn(3, 4, generator=g, dtype=DT), "v": torch.randn(4, generator=g, dtype=DT)}
    return loss_fn, start


def _trajectory(make_optimizer, loss_fn, start, steps=STEPS, before_step=None):
    """Run any torch optimizer built by ``make_optimizer(named_params)``; ``before_step(opt, t)``
    may change hyperparameters before step ``t``. Returns the parameters after every step."""
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = make_optimizer(list(params.items()))
    traj = []
    for t in range(steps):
        if before_step is not None:
            before_step(opt, t)
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


def _torch(cls, **kw):
    return lambda named: cls([p for _, p in named], **kw)


def _ours(tx):
    return lambda named: lo.as_torch_optimizer(tx, named)


def _assert_same(traj, ref, start, rtol=RTOL, atol=ATOL, moved=1e-2):
    assert len(traj) == len(ref)
    for t, (p, q) in enumerate(zip(traj, ref)):
        for k in p:
            torch.testing.assert_close(p[k], q[k], rtol=rtol, atol=atol, msg=lambda m: f"step {t + 1}, {k}: {m}")
    assert max((ref[-1][k] - start[k]).abs().max().item() for k in start) > moved  # not vacuous


def _grads(loss_fn, params, create_graph=False):
    if not create_graph:
        params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    gs = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=create_graph)
    return dict(zip(params, gs))


# =========================================================================== inject_hyperparams

# (id, factory, kwargs, torch.optim class, its kwargs)
INJECT_CASES = [
    ("sgd", lo.sgd, dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    ("sgd_momentum_wd", lo.sgd, dict(lr=0.03, momentum=0.8, dampening=0.1, weight_decay=0.05),
     torch.optim.SGD, dict(lr=0.03, momentum=0.8, dampening=0.1, weight_decay=0.05)),
    ("nesterov", lo.nesterov, dict(lr=0.02), torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    ("rmsprop_centered_momentum", lo.rmsprop, dict(lr=0.005, alpha=0.95, momentum=0.8, centered=True),
     torch.optim.RMSprop, dict(lr=0.005, alpha=0.95, momentum=0.8, centered=True)),
    ("adam", lo.adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3), torch.optim.Adam,
     dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3)),
    ("adam_wd", lo.adam, dict(lr=0.02, weight_decay=0.1), torch.optim.Adam, dict(lr=0.02, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,factory,kwargs,torch_cls,torch_kwargs", INJECT_CASES, ids=[c[0] for c in INJECT_CASES])
def test_injected_trajectory_equals_plain_factory_and_torch_optim(name, factory, kwargs, torch_cls, torch_kwargs):
    loss_fn, start = _problem()
    injected = _trajectory(_ours(lo.inject_hyperparams(factory)(**kwargs)), loss_fn, start)
    plain = _trajectory(_ours(factory(**kwargs)), loss_fn, start)
    ref = _trajectory(_torch(torch_cls, **torch_kwargs), loss_fn, start)
    _assert_same(injected, plain, start, rtol=1e-13, atol=1e-15)
    _assert_same(injected, ref, start)


def test_state_holds_hyperparameters_as_tensors_of_the_parameters_dtype():
    _, start = _problem()
    state = lo.inject_hyperparams(lo.adam)(lr=0.1, betas=(0.8, 0.99)).init(start)
    assert isinstance(state, lo.InjectHyperparamsState)
    hp = state.hyperparams
    assert set(hp) == {"lr", "betas", "eps", "weight_decay"}  # the factory's defaults are injected too
    assert isinstance(hp["betas"], tuple) and len(hp["betas"]) == 2
    for value in (hp["lr"], *hp["betas"], hp["eps"]):
        assert isinstance(value, torch.Tensor) and value.dtype == DT and value.dim() == 0
    assert hp["lr"].item() == 0.1 and hp["betas"][1].item() == 0.99
    # float32 parameters get float32 hyperparameters unless asked otherwise
    start32 = {k: v.float() for k, v in start.items()}
    assert lo.inject_hyperparams(lo.adam)(lr=0.1).init(start32).hyperparams["lr"].dtype == torch.float32
    forced = lo.inject_hyperparams(lo.adam, hyperparam_dtype=DT)(lr=0.1).init(start32)
    assert forced.hyperparams["lr"].dtype == DT


def test_static_args_bools_and_integer_sizes_stay_as_given():
    _, start = _problem()
    # momentum named static stays a float 0.0, so sgd keeps no momentum buffer
    state = lo.inject_hyperparams(lo.sgd, static_args=("momentum",))(lr=0.1).init(start)
    assert "momentum" not in state.hyperparams and "nesterov" not in state.hyperparams
    assert not any(isinstance(s, tuple) and hasattr(s, "trace") for s in state.inner_state.states)
    # an int with an int default (a size, not a rate) is not injected; a float is
    clip = lo.inject_hyperparams(lo.clip_by_global_norm)(max_norm=1.0, batch_dims=0).init(start)
    assert set(clip.hyperparams) == {"max_norm"}
    with pytest.raises(TypeError, match="static_args"):
        lo.inject_hyperparams(lo.sgd, static_args=("nope",))


@pytest.mark.parametrize("factory,kwargs", [(lo.sgd, dict(lr=0.05, momentum=0.5)), (lo.adam, dict(lr=0.02))])
def test_changing_lr_in_the_state_scales_the_next_step(factory, kwargs):
    """lr is the last stage of both, so the step with lr' is exactly lr'/lr times the step with lr,
    and the rest of the state evolves identically."""
    loss_fn, params = _problem()
    tx = lo.inject_hyperparams(factory)(**kwargs)
    state = tx.init(params)
    for _ in range(4):
        updates, state = tx.update(_grads(loss_fn, params), state, params)
        params = lo.apply_updates(params, updates)
    grads = _grads(loss_fn, params)
    u_same, s_same = tx.update(grads, state, params)
    changed = lo.set_hyperparams(state, lr=3 * kwargs["lr"])
    assert changed.hyperparams["lr"].dtype == DT and state.hyperparams["lr"].item() == kwargs["lr"]
    u_new, s_new = tx.update(grads, changed, params)
    for k in params:
        torch.testing.assert_close(u_new[k], 3 * u_same[k], rtol=1e-13, atol=0)
        assert u_new[k].abs().max() > 1e-4
    for a, b in zip(lo.tree_leaves(s_same.inner_state), lo.tree_leaves(s_new.inner_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert s_new.hyperparams["lr"].item() == pytest.approx(3 * kwargs["lr"], rel=1e-15)
    with pytest.raises(KeyError, match="lr2"):
        lo.set_hyperparams(state, lr2=0.1)


def test_changing_lr_through_the_torch_optimizer_matches_torch_param_groups():
    loss_fn, start = _problem()

    def change(opt, t):
        if t == 10:
            opt.param_groups[0].update(lr=0.005, betas=(0.5, 0.9))

    ours = _trajectory(_ours(lo.adam(lr=0.03)), loss_fn, start, before_step=change)
    ref = _trajectory(_torch(torch.optim.Adam, lr=0.03), loss_fn, start, before_step=change)
    unchanged = _trajectory(_torch(torch.optim.Adam, lr=0.03), loss_fn, start)
    _assert_same(ours, ref, start)
    assert (ours[-1]["W"] - unchanged[-1]["W"]).abs().max() > 1e-3  # the change mattered


def test_schedules_are_evaluated_every_step_also_inside_tuples():
    """lr follows a cosine schedule and beta1 a linear warm-up; torch.optim.Adam is given the same
    values in its param_groups before every step (it uses the current beta1 in the bias
    correction 1 - beta1^t, as learnopt does)."""
    lr_schedule = lo.cosine_decay_schedule(0.05, decay_steps=20, alpha=0.1)
    b1_schedule = lo.linear_warmup_schedule(0.5, 0.9, warmup_steps=10)

    def at(schedule, t):
        return float(schedule(torch.tensor(t)))

    loss_fn, start = _problem()
    seen = []

    def record(opt, t):
        if t > 0:
            seen.append((opt.tx_state.hyperparams["lr"].item(), opt.tx_state.hyperparams["betas"][0].item()))

    def torch_schedule(opt, t):
        opt.param_groups[0].update(lr=at(lr_schedule, t), betas=(at(b1_schedule, t), 0.999))

    tx = lo.inject_hyperparams(lo.adam)(lr=lr_schedule, betas=(b1_schedule, 0.999))
    ours = _trajectory(_ours(tx), loss_fn, start, before_step=record)
    ref = _trajectory(_torch(torch.optim.Adam, lr=1.0), loss_fn, start, before_step=torch_schedule)
    _assert_same(ours, ref, start)
    # the state shows the values used by the last update: those of step t - 1
    for t, (lr, b1) in enumerate(seen, start=1):
        assert lr == at(lr_schedule, t - 1) and b1 == at(b1_schedule, t - 1)
    assert seen[0][0] != seen[-1][0] and seen[0][1] != seen[-1][1]
    # the schedule wins over a value written into the state
    state = tx.init(start)
    _, state = tx.update(_grads(loss_fn, start), lo.set_hyperparams(state, lr=123.0), start)
    assert state.hyperparams["lr"].item() == at(lr_schedule, 0)


def test_state_round_trip_through_torch_optimizer_state_dict():
    loss_fn, start = _problem()
    make = _ours(lo.inject_hyperparams(lo.adam)(lr=0.03, betas=(0.8, 0.99)))
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = make(list(params.items()))

    def step(opt, params):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()

    for _ in range(5):
        step(opt, params)
    opt.tx_state = lo.set_hyperparams(opt.tx_state, lr=0.007)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    params2 = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt2 = _ours(lo.inject_hyperparams(lo.adam)(lr=0.03, betas=(0.8, 0.99)))(list(params2.items()))
    opt2.load_state_dict(loaded)
    assert opt2.tx_state.hyperparams["lr"].item() == 0.007  # the changed value travelled
    assert int(opt2.tx_state.count) == 5
    for _ in range(5):
        step(opt, params)
        step(opt2, params2)
    for k in params:
        torch.testing.assert_close(params2[k], params[k], rtol=0, atol=0)


def test_hypergradient_wrt_tensor_lr_matches_finite_differences_and_survives_detached_state():
    loss_fn, start = _problem(seed=3)

    def final_loss(lr):
        tx = lo.inject_hyperparams(lo.adam)(lr=lr, betas=(0.8, 0.95))
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        state = tx.init(params)
        for _ in range(8):
            updates, state = tx.update(_grads(loss_fn, params, create_graph=True), state, params)
            params = lo.apply_updates(params, updates)
        return loss_fn(params)

    lr = torch.tensor(0.03, dtype=DT, requires_grad=True)
    (analytic,) = torch.autograd.grad(final_loss(lr), lr)
    fd = central_difference(final_loss, lr)
    assert abs(fd) > 1e-3
    assert analytic.item() == pytest.approx(fd, rel=1e-6)
    # a tensor that requires grad is read afresh at every update, so cutting the state (as
    # truncated BPTT does at its boundaries) does not cut the hypergradient
    tx = lo.inject_hyperparams(lo.sgd)(lr=lr)
    state = lo.detach_state(tx.init(start))
    grads = _grads(loss_fn, start)
    updates, _ = tx.update(grads, state, start)
    (g,) = torch.autograd.grad(updates["v"].sum(), lr)
    torch.testing.assert_close(g, -grads["v"].sum())


def test_injected_batched_equals_per_instance_and_double_backward_at_zero_gradient_is_finite():
    g = torch.Generator().manual_seed(4)
    family_w = torch.randn(3, 5, 5, generator=g, dtype=DT)
    start = {"x": torch.randn(3, 5, generator=g, dtype=DT)}

    def loss(params, w):
        return (torch.tanh(torch.einsum("nij,nj->ni", w, params["x"])) ** 2).sum() + (params["x"] ** 4).sum()

    make = lambda: lo.inject_hyperparams(lo.adam)(lr=0.05)  # noqa: E731
    batched = _trajectory(_ours(make()), lambda p: loss(p, family_w), start, steps=10)
    for i in range(3):
        single = _trajectory(_ours(make()), lambda p, i=i: loss(p, family_w[i : i + 1]),
                             {"x": start["x"][i : i + 1]}, steps=10)
        for b, s in zip(batched, single):
            torch.testing.assert_close(b["x"][i : i + 1], s["x"], rtol=1e-13, atol=1e-15)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    params = {"x": torch.zeros(4, dtype=DT, requires_grad=True)}
    tx = lo.inject_hyperparams(lo.adam)(lr=lr)
    zero = {"x": params["x"] * 0}
    updates, _ = tx.update(zero, tx.init(params), params)
    first = torch.autograd.grad(updates["x"].sum(), [params["x"], lr], create_graph=True, allow_unused=True)
    total = sum(f.sum() for f in first if f is not None)
    second = torch.autograd.grad(total, [params["x"]], allow_unused=True)
    assert all(s is None or torch.isfinite(s).all() for s in second)


# =========================================================================== LearnedHyperparameters


@pytest.mark.parametrize("kind,values", [
    (LOG, [1e-8, 1e-3, 0.316, 1.0, 7.5, 1e4]),
    (LOGIT_ONE_MINUS, [1e-6, 0.1, 0.5, 0.9, 0.99, 0.999, 0.999999]),
])
def test_parametrisation_round_trips_and_respects_bounds(kind, values):
    x = torch.tensor(values, dtype=DT)
    raw = to_unconstrained(kind, x)
    assert torch.isfinite(raw).all()
    torch.testing.assert_close(to_constrained(kind, raw), x, rtol=1e-12, atol=0)
    # closed forms: log x, and logit(1 - x) = log((1 - x) / x)
    expected_raw = torch.log(x) if kind == LOG else torch.log((1 - x) / x)
    torch.testing.assert_close(raw, expected_raw, rtol=1e-9, atol=1e-12)
    # any raw value maps inside the bounds (strictly, where float64 can tell)
    raw = torch.linspace(-30, 30, 601, dtype=DT)
    out = to_constrained(kind, raw)
    assert torch.isfinite(out).all() and (out > 0).all()
    if kind == LOGIT_ONE_MINUS:
        assert (out < 1).all()
        assert torch.all(out[1:] < out[:-1])  # 1 - sigmoid(raw) decreases in raw
    else:
        assert torch.all(out[1:] > out[:-1])


def test_module_stores_readable_raw_parameters_and_reports_constrained_values():
    m = LearnedHyperparameters("adam", init={"lr": 0.05, "betas": [0.8, 0.99], "eps": 1e-6},
                               learn=["lr", "betas", "eps"]).double()
    names = dict(m.named_parameters())
    assert set(names) == {"raw.log_lr", "raw.logit_one_minus_beta1", "raw.logit_one_minus_beta2", "raw.log_eps"}
    assert names["raw.log_lr"].item() == pytest.approx(math.log(0.05), rel=1e-7)
    assert names["raw.logit_one_minus_beta2"].item() == pytest.approx(math.log(0.01 / 0.99), rel=1e-7)
    hp = m.hyperparameters()
    assert hp["lr"] == pytest.approx(0.05, rel=1e-7) and hp["eps"] == pytest.approx(1e-6, rel=1e-7)
    assert hp["betas"] == pytest.approx((0.8, 0.99), rel=1e-7) and isinstance(hp["betas"], tuple)
    # changing the raw parameter changes the constrained value accordingly
    with torch.no_grad():
        names["raw.log_lr"].add_(math.log(2))
        names["raw.logit_one_minus_beta1"].fill_(50.0)
    assert m.hyperparameters()["lr"] == pytest.approx(0.1, rel=1e-7)
    assert 0 < m.hyperparameters()["betas"][0] < 1e-20
    cfg = m.config()
    json.dumps(cfg)
    assert cfg == {"optimizer": "adam", "init": {"lr": 0.05, "betas": [0.8, 0.99], "eps": 1e-6},
                   "learn": ["lr", "betas", "eps"]}
    rebuilt = LearnedHyperparameters(**json.loads(json.dumps(cfg)))
    assert rebuilt.hyperparameters()["betas"] == pytest.approx((0.8, 0.99), rel=1e-6)
    assert "LearnedHyperparameters" in REGISTRY and REGISTRY["LearnedHyperparameters"] is LearnedHyperparameters


def test_unknown_or_invalid_configurations_are_clear_errors():
    assert {"adam", "sgd", "nesterov", "rmsprop", "momentum"} <= set(optimizer_names())
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'.*adam"):
        LearnedHyperparameters("adamm")
    with pytest.raises(ValueError, match="unknown optimizer 'apply_updates'"):
        LearnedHyperparameters("apply_updates")
    with pytest.raises(ValueError, match="does not take.*lr, momentum"):
        LearnedHyperparameters("sgd", learn=["betas"])
    with pytest.raises(ValueError, match="init names \\['lrr'\\]"):
        LearnedHyperparameters("adam", init={"lrr": 0.1})
    with pytest.raises(ValueError, match="momentum=0.0 cannot be learned.*in \\(0, 1\\)"):
        LearnedHyperparameters("sgd", learn=["lr", "momentum"])
    with pytest.raises(ValueError, match="lr=-0.1 cannot be learned.*positive"):
        LearnedHyperparameters("adam", init={"lr": -0.1})
    with pytest.raises(ValueError, match="at least one"):
        LearnedHyperparameters("adam", learn=[])
    with pytest.raises(ValueError, match="cannot learn sgd's 'nesterov'"):
        LearnedHyperparameters("sgd", learn=["lr", "nesterov"])
    with pytest.raises(ValueError, match="'lr' has no default; give its initial value in init"):
        LearnedHyperparameters("scale_by_learning_rate")
    lopt = LearnedHyperparameters("adam", learn=["lr", "betas"])
    with pytest.raises(KeyError, match="'eps' is not learned"):
        lopt.set_hyperparameters(eps=1e-6)
    with pytest.raises(ValueError, match="outside its range"):
        lopt.set_hyperparameters(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="takes 2 values"):
        lopt.set_hyperparameters(betas=(0.9,))


def _double(optimizer, init, learn=("lr",)) -> LearnedHyperparameters:
    """A float64 module whose raw values are computed from ``init`` in float64 (``.double()`` alone
    would keep the float32 rounding of the raw values made at construction)."""
    lopt = LearnedHyperparameters(optimizer, init=init, learn=list(learn)).double()
    lopt.set_hyperparameters(**{k: init[k] for k in learn if k in init})
    return lopt


# (id, optimizer, init, learn, torch.optim class, its kwargs)
LEARNED_CASES = [
    ("adam_lr", "adam", dict(lr=0.02), ["lr"], torch.optim.Adam, dict(lr=0.02)),
    ("adam_all", "adam", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05), ["lr", "betas", "eps"],
     torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05)),
    ("adam_wd", "adam", dict(lr=0.02, weight_decay=0.1), ["lr", "weight_decay"], torch.optim.Adam,
     dict(lr=0.02, weight_decay=0.1)),
    ("sgd_momentum", "sgd", dict(lr=0.03, momentum=0.8), ["lr", "momentum"], torch.optim.SGD,
     dict(lr=0.03, momentum=0.8)),
    ("nesterov", "nesterov", dict(lr=0.02, momentum=0.7), ["lr", "momentum"], torch.optim.SGD,
     dict(lr=0.02, momentum=0.7, nesterov=True)),
    ("rmsprop", "rmsprop", dict(lr=0.005, alpha=0.95, eps=1e-4), ["lr", "alpha", "eps"], torch.optim.RMSprop,
     dict(lr=0.005, alpha=0.95, eps=1e-4)),
]


@pytest.mark.parametrize("name,optimizer,init,learn,torch_cls,torch_kwargs", LEARNED_CASES,
                         ids=[c[0] for c in LEARNED_CASES])
def test_learned_hyperparameters_trajectory_equals_factory_and_torch_optim(
    name, optimizer, init, learn, torch_cls, torch_kwargs
):
    loss_fn, start = _problem(seed=1)
    lopt = _double(optimizer, init, learn)
    ours = _trajectory(lopt.as_torch_optimizer, loss_fn, start)
    plain = _trajectory(_ours(getattr(lo, optimizer)(**init)), loss_fn, start)
    ref = _trajectory(_torch(torch_cls, **torch_kwargs), loss_fn, start)
    # exp(log x) and 1 - sigmoid(logit(1 - x)) return x to within a few ulps
    _assert_same(ours, plain, start, rtol=1e-11, atol=1e-13)
    _assert_same(ours, ref, start)


def _fd_meta_grad(est, lopt, state, name, eps=1e-6):
    p = dict(lopt.named_parameters())[name]
    with torch.no_grad():
        p.add_(eps)
    plus = est.unroll(lopt, state)[0].item()
    with torch.no_grad():
        p.sub_(2 * eps)
    minus = est.unroll(lopt, state)[0].item()
    with torch.no_grad():
        p.add_(eps)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("optimizer,init,learn,loss_transform", [
    ("adam", dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3), ["lr", "betas", "eps"], "identity"),
    ("nesterov", dict(lr=0.01, momentum=0.8), ["lr", "momentum"], "log"),
    ("rmsprop", dict(lr=0.01, alpha=0.9), ["lr", "alpha"], "identity"),
])
def test_meta_gradient_through_truncated_bptt_matches_finite_differences(optimizer, init, learn, loss_transform):
    """Second order, float64, one truncation covering the whole horizon: the meta-gradient is the
    exact derivative of the meta-loss, which central differences confirm weight by weight."""
    lopt = _double(optimizer, init, learn)
    est = TruncatedBPTT(QuadraticFamily(4, dtype=DT), num_tasks=3, unroll_length=12, horizon=12,
                        second_order=True, loss_transform=loss_transform)
    state = est.init_unroll(lopt)
    estimate = est.estimate(lopt, state)
    assert estimate.finite
    assert set(estimate.meta_grads) == {n for n, _ in lopt.named_parameters()}
    for name, analytic in estimate.meta_grads.items():
        fd = _fd_meta_grad(est, lopt, state, name)
        assert abs(fd) > 1e-7, name
        assert analytic.item() == pytest.approx(fd, rel=1e-5, abs=1e-10), name


def _meta_train(lopt, steps=15, meta_lr=0.3):
    est = TruncatedBPTT(QuadraticFamily(5, dtype=DT), num_tasks=16, unroll_length=10, horizon=30,
                        second_order=True, loss_transform="log")
    opt = torch.optim.Adam(lopt.parameters(), lr=meta_lr)
    state = None
    for _ in range(steps):
        estimate = est.estimate(lopt, state)
        state = estimate.unroll_state
        opt.zero_grad()
        for name, p in lopt.named_parameters():
            p.grad = estimate.meta_grads[name]
        opt.step()


def _val_loss(lopt):
    g = seeded_generator("val", 0)
    task = QuadraticFamily(5, dtype=DT).sample(32, g)
    return torch.log10(rollout(lopt.transform(), task, 30, generator=g)[-1]).mean().item()


@pytest.mark.parametrize("optimizer,lr,grows", [("adam", 1e-4, True), ("sgd", 1e-4, True), ("adam", 3.0, False)])
def test_a_few_meta_steps_move_lr_the_right_way(optimizer, lr, grows):
    """Far too small a rate grows and far too large a rate shrinks, and the validation loss drops."""
    lopt = _double(optimizer, {"lr": lr})
    before = _val_loss(lopt)
    _meta_train(lopt)
    after_lr = lopt.hyperparameters()["lr"]
    if grows:
        assert after_lr > lr * 20, after_lr
    else:
        assert after_lr < lr / 10, after_lr
    assert _val_loss(lopt) < before - 0.3


def test_checkpoint_export_load_round_trip(tmp_path):
    lopt = LearnedHyperparameters("adam", init={"lr": 0.01, "betas": (0.85, 0.99)}, learn=["lr", "betas"])
    lopt.set_hyperparameters(lr=0.2, betas=[0.7, 0.99])  # as if meta-trained: away from the initial values
    path = learnopt.export_checkpoint(lopt, tmp_path / "lr.pt", {"meta_steps": 7})
    loaded = learnopt.load(path)
    assert isinstance(loaded, LearnedHyperparameters)
    assert loaded.hyperparameters() == lopt.hyperparameters()
    assert loaded.hyperparameters()["lr"] == pytest.approx(0.2, rel=1e-6)
    assert loaded.hyperparameters()["betas"][0] == pytest.approx(0.7, rel=1e-6)
    assert loaded.config() == lopt.config() and loaded.checkpoint_metadata["meta_steps"] == 7
    # the drop-in optimizer takes the same steps as the module it came from, and the same as
    # torch.optim.Adam with the learned values
    loss_fn, start = _problem(seed=2)
    via_load = _trajectory(lambda named: learnopt.load_optimizer(path, named), loss_fn, start)
    original = _trajectory(lopt.as_torch_optimizer, loss_fn, start)
    hp = lopt.hyperparameters()
    ref = _trajectory(_torch(torch.optim.Adam, lr=hp["lr"], betas=hp["betas"]), loss_fn, start)
    _assert_same(via_load, original, start, rtol=0, atol=0)
    _assert_same(via_load, ref, start)
    # a config naming an unknown optimizer is refused with the file and the name
    payload = torch.load(path, weights_only=True)
    payload["config"]["optimizer"] = "adamm"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt.*adamm"):
        learnopt.load(tmp_path / "bad.pt")


def test_meta_train_cli_with_the_shipped_config_exports_a_learned_lr(in_tmp):
    from learnopt.train.cli import meta_train

    callbacks = [{"class_path": "learnopt.train.callbacks.ExportLearnedOptimizer", "init_args": {"path": "lr.pt"}}]
    cli = meta_train([
        "--config", str(CONFIG),
        "--model.estimator.num_tasks", "8", "--model.estimator.horizon", "10", "--model.estimator.unroll_length", "5",
        "--model.val_tasks", "8",
        "--model.task_family.init_args.dim", "3", "--model.meta_lr", "0.3",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.logger", "false",
        "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_progress_bar", "false",
    ])
    assert cli.trainer.global_step == 6
    lopt = cli.model.learned_optimizer
    assert isinstance(lopt, LearnedHyperparameters) and lopt.learn == ["lr"]
    loaded = learnopt.load(in_tmp / "lr.pt")
    assert isinstance(loaded, LearnedHyperparameters)
    assert loaded.config()["init"]["lr"] == 0.001
    # six meta-steps of 0.3 in log space from lr = 1e-3, far too small here: lr grew
    assert loaded.hyperparameters()["lr"] > 0.001 * math.e
    assert loaded.checkpoint_metadata["config"]["model"]["learned_optimizer"]["init_args"]["optimizer"] == "adam"
