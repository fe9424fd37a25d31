"""Tests of ``learnopt.optim``: hand-designed optimizers as pure gradient transformations.

The reference for every named optimizer is its ``torch.optim`` namesake, run in float64 on
the same problem from the same start; the reference for derivatives is a central finite
difference; the reference for batching is the same problem solved one instance at a time.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from learnopt import optim as lo
from learnopt.optim import numerics as lo_numerics
from optim_helpers import (grads as _grads, model_loss as _model_loss, problem as _problem,
                           run_functional as _run_functional, tiny_model as _tiny_model)
from conftest import central_difference

DT = torch.float64
RTOL, ATOL = 1e-10, 1e-12

# (id, learnopt factory, its kwargs, torch.optim class, its kwargs)
CASES = [
    ("sgd", lo.sgd, dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    ("sgd_momentum", lo.sgd, dict(lr=0.03, momentum=0.9), torch.optim.SGD, dict(lr=0.03, momentum=0.9)),
    (
        "sgd_momentum_dampening",
        lo.sgd,
        dict(lr=0.03, momentum=0.8, dampening=0.3),
        torch.optim.SGD,
        dict(lr=0.03, momentum=0.8, dampening=0.3),
    ),
    (
        "sgd_nesterov",
        lo.sgd,
        dict(lr=0.03, momentum=0.9, nesterov=True),
        torch.optim.SGD,
        dict(lr=0.03, momentum=0.9, nesterov=True),
    ),
    (
        "sgd_weight_decay",
        lo.sgd,
        dict(lr=0.05, momentum=0.5, weight_decay=0.1),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.5, weight_decay=0.1),
    ),
    ("momentum", lo.momentum, dict(lr=0.02), torch.optim.SGD, dict(lr=0.02, momentum=0.9)),
    (
        "momentum_wd",
        lo.momentum,
        dict(lr=0.02, momentum=0.7, weight_decay=0.05),
        torch.optim.SGD,
        dict(lr=0.02, momentum=0.7, weight_decay=0.05),
    ),
    ("nesterov", lo.nesterov, dict(lr=0.02), torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    ("rmsprop", lo.rmsprop, dict(lr=0.01, alpha=0.9), torch.optim.RMSprop, dict(lr=0.01, alpha=0.9)),
    (
        "rmsprop_centered",
        lo.rmsprop,
        dict(lr=0.01, alpha=0.9, centered=True),
        torch.optim.RMSprop,
        dict(lr=0.01, alpha=0.9, centered=True),
    ),
    (
        "rmsprop_momentum",
        lo.rmsprop,
        dict(lr=0.005, alpha=0.95, momentum=0.8),
        torch.optim.RMSprop,
        dict(lr=0.005, alpha=0.95, momentum=0.8),
    ),
    (
        "rmsprop_centered_momentum",
        lo.rmsprop,
        dict(lr=0.005, alpha=0.95, momentum=0.8, centered=True),
        torch.optim.RMSprop,
        dict(lr=0.005, alpha=0.95, momentum=0.8, centered=True),
    ),
    (
        "rmsprop_weight_decay",
        lo.rmsprop,
        dict(lr=0.01, weight_decay=0.1),
        torch.optim.RMSprop,
        dict(lr=0.01, weight_decay=0.1),
    ),
    ("adam", lo.adam, dict(lr=0.02), torch.optim.Adam, dict(lr=0.02)),
    (
        "adam_betas_eps",
        lo.adam,
        dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3),
        torch.optim.Adam,
        dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3),
    ),
    (
        "adam_weight_decay",
        lo.adam,
        dict(lr=0.02, weight_decay=0.1),
        torch.optim.Adam,
        dict(lr=0.02, weight_decay=0.1),
    ),
]
CASE_IDS = [c[0] for c in CASES]


# --------------------------------------------------------------------------- problems


def _run_torch(opt_cls, opt_kwargs, loss_fn, start, steps):
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = opt_cls(list(params.values()), **opt_kwargs)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


def _tiny_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(8, 4, generator=g, dtype=DT)
    Y = torch.randn(8, 3, generator=g, dtype=DT)
    return X, Y


# --------------------------------------------------------------------------- 1. vs torch.optim


@pytest.mark.parametrize("name,factory,kwargs,torch_cls,torch_kwargs", CASES, ids=CASE_IDS)
def test_functional_trajectory_matches_torch_optim(name, factory, kwargs, torch_cls, torch_kwargs):
    loss_fn, start = _problem()
    ours = _run_functional(factory(**kwargs), loss_fn, start, 25)
    ref = _run_torch(torch_cls, torch_kwargs, loss_fn, start, 25)
    for t, (p, q) in enumerate(zip(ours, ref)):
        for k in start:
            torch.testing.assert_close(p[k], q[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"step {t + 1}, {k}: {m}")
    # The comparison is not vacuous: the parameters moved well beyond the tolerance.
    for k in start:
        assert (ref[-1][k] - start[k]).abs().max() > 1e-2
    # And the loss went down (sign convention).
    assert loss_fn(ours[-1]) < loss_fn(start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_keeps_dtype_and_matches_torch_optim(dtype):
    """Adam's bias corrections are computed in the parameters' precision (not the default dtype)."""
    loss_fn, start64 = _problem(seed=7)
    start = {k: v.to(dtype) for k, v in start64.items()}
    ours = _run_functional(lo.adam(lr=0.02), loss_fn, start, 10)
    ref = _run_torch(torch.optim.Adam, dict(lr=0.02), loss_fn, start, 10)
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(ours, ref):
        for k in start:
            assert p[k].dtype == dtype
            torch.testing.assert_close(p[k], q[k], **tol)


def test_tensor_hyperparameters_match_floats():
    """Hyperparameters given as (meta-learnable) float64 tensors compute the same trajectory."""
    loss_fn, start = _problem(seed=8)
    t = lambda x: torch.tensor(x, dtype=DT, requires_grad=True)  # noqa: E731
    pairs = [
        (lo.adam(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
         lo.adam(lr=t(0.02), betas=(t(0.8), t(0.95)), eps=t(1e-6), weight_decay=t(0.1))),
        (lo.rmsprop(lr=0.01, alpha=0.9, momentum=0.5, centered=True),
         lo.rmsprop(lr=t(0.01), alpha=t(0.9), momentum=t(0.5), centered=True)),
        (lo.sgd(lr=0.03, momentum=0.8, dampening=0.2, nesterov=True),
         lo.sgd(lr=t(0.03), momentum=t(0.8), dampening=t(0.2), nesterov=True)),
    ]
    for tx_float, tx_tensor in pairs:
        a = _run_functional(tx_float, loss_fn, start, 10)
        b = _run_functional(tx_tensor, loss_fn, start, 10)
        for p, q in zip(a, b):
            for k in start:
                assert q[k].dtype == DT
                torch.testing.assert_close(p[k], q[k], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- 2. as_torch_optimizer


@pytest.mark.parametrize("name,factory,kwargs,torch_cls,torch_kwargs", CASES, ids=CASE_IDS)
def test_as_torch_optimizer_matches_torch_optim(name, factory, kwargs, torch_cls, torch_kwargs):
    X, Y = _tiny_data()
    m_ours = _tiny_model()
    m_ref = copy.deepcopy(m_ours)
    w0 = m_ours.weight.detach().clone()
    opt = lo.as_torch_optimizer(factory(**kwargs), m_ours.parameters())
    ref = torch_cls(m_ref.parameters(), **torch_kwargs)
    assert isinstance(opt, torch.optim.Optimizer)
    for t in range(25):
        for o, m in ((opt, m_ours), (ref, m_ref)):
            o.zero_grad()
            _model_loss(m, X, Y).backward()
            o.step()
        for (n, p), q in zip(m_ours.named_parameters(), m_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda s: f"step {t + 1}, {n}: {s}")
    assert (m_ref.weight.detach() - w0).abs().max() > 1e-2


CLOSURE_CASES = [c for c in CASES if c[0] in ("sgd_momentum", "rmsprop_centered", "adam")]


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=lambda c: c[0])
def test_as_torch_optimizer_closure_step(case):
    _, factory, kwargs, torch_cls, torch_kwargs = case
    X, Y = _tiny_data()
    m_ours = _tiny_model()
    m_ref = copy.deepcopy(m_ours)
    opt = lo.as_torch_optimizer(factory(**kwargs), m_ours.named_parameters())
    ref = torch_cls(m_ref.parameters(), **torch_kwargs)

    def make_closure(o, m):
        def closure():
            o.zero_grad()
            loss = _model_loss(m, X, Y)
            loss.backward()
            return loss

        return closure

    for _ in range(5):
        expected = _model_loss(m_ours, X, Y).detach()
        loss = opt.step(make_closure(opt, m_ours))
        ref_loss = ref.step(make_closure(ref, m_ref))
        assert isinstance(loss, torch.Tensor)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-14, atol=0)
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=RTOL, atol=ATOL)
        for p, q in zip(m_ours.parameters(), m_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
    assert opt.step() is None  # without a closure, step returns None like torch.optim


def test_as_torch_optimizer_missing_grad_and_frozen_params():
    """As torch.optim: a parameter without ``.grad`` is skipped (not moved, no state change), and a
    ``requires_grad=False`` one gets its state at its first gradient."""
    a = torch.ones(2, dtype=DT, requires_grad=True)
    b = torch.ones(3, dtype=DT, requires_grad=True)
    frozen = torch.ones(1, dtype=DT)
    opt = lo.as_torch_optimizer(lo.sgd(lr=0.5, weight_decay=1.0, momentum=0.9),
                                [("a", a), ("frozen", frozen), ("b", b)])
    assert [opt.param_name(p) for p in opt.param_groups[0]["params"]] == ["a", "frozen", "b"]
    assert frozen not in opt.state and set(opt.state[b]) == {"count", "trace"}
    b_state = {k: v.clone() for k, v in opt.state[b].items()}
    a.grad = torch.ones(2, dtype=DT)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.zeros(2, dtype=DT))  # 1 - 0.5 * (1 + 1)
    torch.testing.assert_close(b.detach(), torch.ones(3, dtype=DT))
    assert all(torch.equal(opt.state[b][k], v) for k, v in b_state.items())
    torch.testing.assert_close(frozen, torch.ones(1, dtype=DT))
    frozen.grad = torch.ones(1, dtype=DT)  # unfrozen: trained from its first gradient on
    opt.step()
    torch.testing.assert_close(frozen, torch.zeros(1, dtype=DT))
    assert int(opt.state[frozen]["count"]) == 1 and int(opt.state[a]["count"]) == 2
    with pytest.raises(ValueError):
        lo.as_torch_optimizer(lo.sgd(), [])


# --------------------------------------------------------------------------- 3. batched


BATCH_CASES = [
    ("adam", lo.adam, dict(lr=0.05, betas=(0.8, 0.95))),
    ("rmsprop", lo.rmsprop, dict(lr=0.02, alpha=0.9)),
    ("rmsprop_centered_momentum", lo.rmsprop, dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5)),
    ("adam_weight_decay", lo.adam, dict(lr=0.05, weight_decay=0.1)),
    ("nesterov", lo.nesterov, dict(lr=0.02)),
]


@pytest.mark.parametrize("name,factory,kwargs", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batched_instances_match_individual_runs(name, factory, kwargs):
    B, d, steps = 4, 3, 20
    g = torch.Generator().manual_seed(3)
    M = torch.randn(B, d, d, generator=g, dtype=DT)
    H = M @ M.transpose(1, 2) + 0.5 * torch.eye(d, dtype=DT)  # B different SPD matrices
    c = torch.randn(B, d, generator=g, dtype=DT)
    x0 = torch.randn(B, d, generator=g, dtype=DT)
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=DT)  # very different gradient magnitudes

    def loss_batched(params):
        r = params["x"] - c
        return (scales * 0.5 * torch.einsum("bi,bij,bj->b", r, H, r)).sum()

    def loss_single(i):
        def f(params):
            r = params["x"] - c[i]
            return scales[i] * 0.5 * r @ H[i] @ r

        return f

    batched = _run_functional(factory(**kwargs), loss_batched, {"x": x0}, steps)
    for i in range(B):
        single = _run_functional(factory(**kwargs), loss_single(i), {"x": x0[i]}, steps)
        for t in range(steps):
            torch.testing.assert_close(batched[t]["x"][i], single[t]["x"], rtol=1e-12, atol=1e-14)
    assert (batched[-1]["x"] - x0).abs().min() > 1e-3


# --------------------------------------------------------------------------- 4. differentiability


HYPER_CASES = [
    ("sgd", lambda lr: lo.sgd(lr=lr), 0.05),
    ("sgd_momentum_wd", lambda lr: lo.sgd(lr=lr, momentum=0.8, dampening=0.1, weight_decay=0.1), 0.03),
    ("nesterov", lambda lr: lo.nesterov(lr=lr), 0.03),
    ("rmsprop", lambda lr: lo.rmsprop(lr=lr, alpha=0.9), 0.01),
    ("rmsprop_centered_momentum", lambda lr: lo.rmsprop(lr=lr, alpha=0.9, centered=True, momentum=0.5), 0.01),
    ("adam", lambda lr: lo.adam(lr=lr), 0.02),
]


def _unrolled_loss(make_tx, lr, loss_fn, start, steps=5):
    params = {k: v.clone() for k, v in start.items()}
    if isinstance(lr, torch.Tensor) and lr.requires_grad:
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        create_graph = True
    else:
        create_graph = False
    tx = make_tx(lr)
    state = tx.init(params)
    for _ in range(steps):
        grads = _grads(loss_fn, params, create_graph=create_graph)
        updates, state = tx.update(grads, state, params)
        params = lo.apply_updates(params, updates)
    return loss_fn(params)


@pytest.mark.parametrize("name,make_tx,lr0", HYPER_CASES, ids=[c[0] for c in HYPER_CASES])
def test_hypergradient_wrt_lr_matches_finite_difference(name, make_tx, lr0):
    loss_fn, start = _problem(seed=4)
    lr = torch.tensor(lr0, dtype=DT, requires_grad=True)
    (hyper,) = torch.autograd.grad(_unrolled_loss(make_tx, lr, loss_fn, start), lr)
    fd = torch.tensor(central_difference(
        lambda v: _unrolled_loss(make_tx, torch.tensor(v, dtype=DT), loss_fn, start), lr0), dtype=DT)
    assert abs(fd.item()) > 1e-2  # a non-trivial hypergradient
    torch.testing.assert_close(hyper, fd, rtol=1e-6, atol=1e-8)


ZERO_GRAD_CASES = [
    ("rmsprop", lambda: lo.rmsprop(lr=0.1)),
    ("rmsprop_centered", lambda: lo.rmsprop(lr=0.1, centered=True)),
    ("adam", lambda: lo.adam(lr=0.1)),
]


def _double_backward_at_zero_grad(make_tx, steps=2):
    """Second derivatives through the optimizer where one gradient coordinate is exactly 0.

    ``x[2] == 0`` and the loss is ``x[2] ** 2 + ...``, so ``g[2] == 0`` (with a nonzero derivative
    wrt ``x``); ``w[3]`` is ignored by the loss, so ``g[3] == 0`` identically."""
    x = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=DT, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)

    def loss_fn(p):
        y = p["x"]
        return (y[:3] ** 2).sum() + y[0] ** 3 * y[1]

    tx = make_tx()
    params = {"x": x}
    state = tx.init(params)
    total = 0.0
    for _ in range(steps):
        grads = _grads(loss_fn, params, create_graph=True)
        assert grads["x"][2] == 0 and grads["x"][3] == 0
        updates, state = tx.update(grads, state, params)
        updates = {k: lr * u for k, u in updates.items()}
        total = total + sum(u.sum() for u in updates.values())
        params = lo.apply_updates(params, updates)
    final = loss_fn(params) + total
    first = torch.autograd.grad(final, [x, lr], create_graph=True)
    second = torch.autograd.grad(first[0].sum() + first[1], [x, lr], allow_unused=True)
    return [t for t in (*first, *second) if t is not None]


@pytest.mark.parametrize("name,make_tx", ZERO_GRAD_CASES, ids=[c[0] for c in ZERO_GRAD_CASES])
def test_no_nan_in_double_backward_at_zero_gradient(name, make_tx):
    for t in _double_backward_at_zero_grad(make_tx):
        assert torch.isfinite(t).all(), t


def test_zero_gradient_check_detects_plain_sqrt(monkeypatch):
    """Control for the test above: with a plain ``torch.sqrt`` the same computation gives NaN."""
    monkeypatch.setattr(lo_numerics, "safe_sqrt", torch.sqrt)  # Adam's sqrt (numerics.adam_direction)
    out = _double_backward_at_zero_grad(lambda: lo.adam(lr=0.1))
    assert any(not torch.isfinite(t).all() for t in out)


def test_safe_sqrt_values_and_derivatives():
    x = torch.tensor([0.0, 4.0, 0.25], dtype=DT, requires_grad=True)
    y = lo.safe_sqrt(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 2.0, 0.5], dtype=DT))
    (d,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(d, torch.tensor([0.0, 0.25, 1.0], dtype=DT))
    (d2,) = torch.autograd.grad(d.sum(), x)
    torch.testing.assert_close(d2, torch.tensor([0.0, -1 / 32, -2.0], dtype=DT))


# --------------------------------------------------------------------------- 5. out of place


@pytest.mark.parametrize("name,factory,kwargs,torch_cls,torch_kwargs", CASES, ids=CASE_IDS)
def test_update_is_out_of_place(name, factory, kwargs, torch_cls, torch_kwargs):
    loss_fn, start = _problem(seed=5)
    tx = factory(**kwargs)
    params = {k: v.clone() for k, v in start.items()}
    state = tx.init(params)
    for _ in range(2):  # get a nonzero state
        updates, state = tx.update(_grads(loss_fn, params), state, params)
        params = lo.apply_updates(params, updates)
    grads = _grads(loss_fn, params)
    snap = [lo.tree_map(lambda x: x.clone(), t) for t in (grads, state, params)]
    updates, new_state = tx.update(grads, state, params)
    new_params = lo.apply_updates(params, updates)
    for before, after in zip(snap, (grads, state, params)):
        for a, b in zip(lo.tree_leaves(before), lo.tree_leaves(after), strict=True):
            assert torch.equal(a, b)
    # Outputs do not alias inputs either.
    inputs = {t.data_ptr() for t in lo.tree_leaves((grads, state, params))}
    for t in lo.tree_leaves((updates, new_state, new_params)):
        if t.numel():
            assert t.data_ptr() not in inputs
    assert all(u.abs().max() > 0 for u in updates.values())


# --------------------------------------------------------------------------- 6. state_dict


SD_CASES = [
    ("adam", lambda: lo.adam(lr=0.05)),
    ("sgd_momentum", lambda: lo.sgd(lr=0.05, momentum=0.9)),
    ("rmsprop_centered_momentum", lambda: lo.rmsprop(lr=0.01, centered=True, momentum=0.5)),
]


def _state_tensors(opt):
    return [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _train(opt, model, X, Y, steps):
    for _ in range(steps):
        opt.zero_grad()
        _model_loss(model, X, Y).backward()
        opt.step()


@pytest.mark.parametrize("name,make_tx", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_state_dict_round_trip(name, make_tx):
    X, Y = _tiny_data()
    model = _tiny_model()
    opt = lo.as_torch_optimizer(make_tx(), model.parameters())
    _train(opt, model, X, Y, 5)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    model2 = copy.deepcopy(model)
    model3 = copy.deepcopy(model)
    opt2 = lo.as_torch_optimizer(make_tx(), model2.parameters())
    opt2.load_state_dict(loaded)
    opt3 = lo.as_torch_optimizer(make_tx(), model3.parameters())  # fresh state: must differ

    _train(opt, model, X, Y, 5)
    _train(opt2, model2, X, Y, 5)
    _train(opt3, model3, X, Y, 5)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.allclose(model.weight, model3.weight, rtol=1e-6, atol=0)


def test_load_state_dict_rejects_foreign_states():
    X, Y = _tiny_data()
    model = _tiny_model()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.05), model.parameters())
    _train(opt, model, X, Y, 2)
    before = [t.clone() for t in _state_tensors(opt)]

    other = nn.Linear(5, 3).to(DT)  # same names, other shapes
    other_opt = lo.as_torch_optimizer(lo.adam(lr=0.05), other.parameters())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other_opt.state_dict())

    no_bias = nn.Linear(4, 3, bias=False).to(DT)  # another number of parameters
    with pytest.raises(ValueError):
        opt.load_state_dict(lo.as_torch_optimizer(lo.adam(), no_bias.parameters()).state_dict())

    sgd_opt = lo.as_torch_optimizer(lo.sgd(lr=0.1, momentum=0.9), copy.deepcopy(model).parameters())
    with pytest.raises(ValueError):  # another transform: another state structure
        opt.load_state_dict(sgd_opt.state_dict())

    torch_adam = torch.optim.Adam(copy.deepcopy(model).parameters())
    _train(torch_adam, copy.deepcopy(model), X, Y, 1)
    with pytest.raises(ValueError, match="unknown option"):
        opt.load_state_dict(torch_adam.state_dict())

    after = _state_tensors(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# --------------------------------------------------------------------------- 7. NaN guard


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_non_finite_gradient_raises_and_changes_nothing(bad, named):
    X, Y = _tiny_data()
    model = _tiny_model()
    params = model.named_parameters() if named else model.parameters()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.05), params)
    _train(opt, model, X, Y, 3)  # a nonzero state

    opt.zero_grad()
    _model_loss(model, X, Y).backward()
    model.bias.grad[1] = bad
    p_before = [p.detach().clone() for p in model.parameters()]
    s_before = [t.clone() for t in _state_tensors(opt)]

    expected_name = "bias" if named else "1"
    with pytest.raises(FloatingPointError, match=f"'{expected_name}'"):
        opt.step()
    for p, q in zip(model.parameters(), p_before, strict=True):
        assert torch.equal(p, q)
    for a, b in zip(_state_tensors(opt), s_before, strict=True):
        assert torch.equal(a, b)

    # With the guard off the step goes through (and poisons the parameter, as torch.optim would).
    opt.check_finite = False
    opt.step()
    assert not torch.isfinite(model.bias).all()


def test_finite_check_is_exact_where_the_cheap_sum_is_not():
    # the guard first sums each gradient; opposite infinities and finite values whose sum
    # overflows are where that alone would mislead
    w = torch.nn.Parameter(torch.zeros(4))
    opt = lo.as_torch_optimizer(lo.sgd(lr=1e-40), [w])
    w.grad = torch.tensor([3e38, 3e38, -1.0, 2.0])  # finite, but the float32 sum is inf
    opt.step()
    assert torch.isfinite(w).all()
    w.grad = torch.tensor([float("inf"), float("-inf"), 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


# --------------------------------------------------------------------------- 8. convergence


CONVERGENCE_CASES = [
    ("sgd", lambda: lo.sgd(lr=0.05)),
    ("sgd_momentum_dampening", lambda: lo.sgd(lr=0.02, momentum=0.9, dampening=0.5)),
    ("momentum", lambda: lo.momentum(lr=0.01)),
    ("nesterov", lambda: lo.nesterov(lr=0.01)),
    ("rmsprop", lambda: lo.rmsprop(lr=0.01)),
    ("rmsprop_centered_momentum", lambda: lo.rmsprop(lr=0.002, centered=True, momentum=0.9)),
    ("adam", lambda: lo.adam(lr=0.05)),
]


@pytest.mark.parametrize("name,make_tx", CONVERGENCE_CASES, ids=[c[0] for c in CONVERGENCE_CASES])
def test_converges_on_convex_quadratic(name, make_tx):
    g = torch.Generator().manual_seed(6)
    A = torch.eye(5, dtype=DT).repeat(2, 1) + 0.1 * torch.randn(10, 5, generator=g, dtype=DT)
    b = torch.randn(10, generator=g, dtype=DT)
    x_star = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    f_star = ((A @ x_star - b) ** 2).sum()
    assert torch.linalg.cond(A) < 3

    def loss_fn(p):
        return ((A @ p["x"] - b) ** 2).sum()

    start = {"x": torch.zeros(5, dtype=DT)}
    f0 = loss_fn(start)
    assert f0 - f_star > 1.0
    final = _run_functional(make_tx(), loss_fn, start, 400)[-1]
    assert loss_fn(final) - f_star < 1e-3, (loss_fn(final) - f_star).item()


# --------------------------------------------------------------------------- 9. chain, apply_updates


def test_chain_composes_in_order():
    p = {"a": torch.tensor([1.0, -2.0], dtype=DT)}
    g = {"a": torch.tensor([0.5, 3.0], dtype=DT)}
    scale_then_decay = lo.chain(lo.scale(2.0), lo.add_decayed_weights(1.0))
    decay_then_scale = lo.chain(lo.add_decayed_weights(1.0), lo.scale(2.0))
    u1, _ = scale_then_decay.update(g, scale_then_decay.init(p), p)
    u2, _ = decay_then_scale.update(g, decay_then_scale.init(p), p)
    torch.testing.assert_close(u1["a"], 2 * g["a"] + p["a"], rtol=0, atol=0)  # [2, 4]
    torch.testing.assert_close(u2["a"], 2 * (g["a"] + p["a"]), rtol=0, atol=0)  # [3, 2]

    # States come back in the order of the members; a stateful member sees what came before it.
    tx = lo.chain(lo.scale(3.0), lo.trace(momentum=0.5), lo.scale_by_learning_rate(0.1))
    state = tx.init(p)
    assert len(state.states) == 3 and isinstance(state.states[0], lo.EmptyState)
    u, state = tx.update(g, state, p)
    torch.testing.assert_close(state.states[1].trace["a"], 3 * g["a"])
    torch.testing.assert_close(u["a"], -0.1 * 3 * g["a"])
    u, state = tx.update(g, state, p)
    torch.testing.assert_close(state.states[1].trace["a"], 0.5 * 3 * g["a"] + 3 * g["a"])
    torch.testing.assert_close(u["a"], -0.1 * 1.5 * 3 * g["a"])

    # Extra keyword arguments reach every member.
    seen = []

    def recorder(tag):
        def update(updates, state, params=None, **extra):
            seen.append((tag, extra))
            return updates, state

        return lo.GradientTransformation(lambda params: lo.EmptyState(), update)

    tx = lo.chain(recorder("first"), lo.scale(2.0), recorder("second"))
    tx.update(g, tx.init(p), p, loss_closure="fn")
    assert seen == [("first", {"loss_closure": "fn"}), ("second", {"loss_closure": "fn"})]


def test_apply_updates():
    p = {"a": torch.ones(2), "b": torch.zeros(3)}
    out = lo.apply_updates(p, {"a": torch.full((2,), 0.5, dtype=DT), "b": torch.ones(3)})
    assert out["a"].dtype == torch.float32  # keeps each parameter's dtype
    torch.testing.assert_close(out["a"], torch.full((2,), 1.5))
    torch.testing.assert_close(out["b"], torch.ones(3))
    torch.testing.assert_close(p["a"], torch.ones(2))  # out of place
    with pytest.raises(KeyError):
        lo.apply_updates(p, {"a": torch.ones(2)})  # missing key
    with pytest.raises(KeyError):
        lo.apply_updates(p, {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)})  # extra key
    with pytest.raises(KeyError, match="'c'"):
        lo.apply_updates(p, {"a": torch.ones(2), "c": torch.ones(3)})


def _previous_gradient_step(lr: float) -> lo.GradientTransformation:
    """Steps along the *previous* gradient, keeping the gradient tensor itself in the state: the
    pattern (a transform storing what it was given) that in-place zeroing of .grad would break."""

    def init(params):
        return {k: torch.zeros_like(p) for k, p in params.items()}

    def update(grads, state, params=None, **extra):
        return {k: -lr * state[k] for k in grads}, dict(grads)

    return lo.GradientTransformation(init, update)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_drop_in_state_never_aliases_grads_zeroed_in_place(set_to_none):
    """A loop that zeroes .grad in place (zero_grad(set_to_none=False)) must follow the same
    trajectory as the functional transform: the optimizer state may not share memory with .grad."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    tx = _previous_gradient_step(0.1)
    opt = lo.as_torch_optimizer(tx, model.named_parameters())
    state = tx.init(params)
    for _ in range(5):
        opt.zero_grad(set_to_none=set_to_none)
        torch.tanh(model(x)).pow(2).sum().backward()
        opt.step()
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = torch.tanh(torch.nn.functional.linear(x, p["weight"], p["bias"])).pow(2).sum()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        updates, state = tx.update(grads, state, params)
        params = lo.apply_updates(params, updates)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), params[k], rtol=1e-12, atol=1e-14)
