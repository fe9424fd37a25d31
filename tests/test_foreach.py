"""The multi-tensor kernels of ``learnopt.optim.foreach`` against the functional path and torch.optim.

Every registered kernel, over a table of option combinations: the drop-in with ``foreach=None``
(the kernel) and with ``foreach=False`` (the transform's functional ``update``) take the same
trajectory and leave the same ``opt.state`` (keys, dtypes, values) on a small float64 model with
two param groups of different ``lr`` under a scheduler; the kernel ran at every step and never
wrote ``.grad``; the torch.optim peer, where the catalogue has one, takes the same trajectory;
and a tensor hyperparameter makes the kernel decline, changing nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest
import torch
from torch import nn

from learnopt import optim as lo
from learnopt.optim import foreach
from learnopt.optim.param_state import shared_keys

DT = torch.float64
STEPS = 20

# (id, catalogue factory, its kwargs, torch.optim peer with the same options or None)
CASES: list[tuple[str, Callable, dict[str, Any], Callable | None]] = [
    ("sgd", lo.sgd, dict(lr=0.05), lambda g: torch.optim.SGD(g, lr=0.05, foreach=True)),
    ("sgd_wd", lo.sgd, dict(lr=0.05, weight_decay=0.1),
     lambda g: torch.optim.SGD(g, lr=0.05, weight_decay=0.1, foreach=True)),
    ("sgd_momentum_dampening", lo.sgd, dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1),
     lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1, foreach=True)),
    ("sgd_nesterov", lo.sgd, dict(lr=0.05, momentum=0.7, nesterov=True),
     lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.7, nesterov=True, foreach=True)),
    ("sgd_nesterov_wd", lo.sgd, dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2),
     lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2, foreach=True)),
    ("momentum", lo.momentum, dict(lr=0.05), lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, foreach=True)),
    ("momentum_wd", lo.momentum, dict(lr=0.05, momentum=0.5, weight_decay=0.1),
     lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.5, weight_decay=0.1, foreach=True)),
    ("nesterov", lo.nesterov, dict(lr=0.05),
     lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, foreach=True)),
    ("nesterov_wd", lo.nesterov, dict(lr=0.05, momentum=0.6, weight_decay=0.1),
     lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.6, nesterov=True, weight_decay=0.1, foreach=True)),
    ("adam", lo.adam, dict(lr=0.02), lambda g: torch.optim.Adam(g, lr=0.02, foreach=True)),
    ("adam_wd", lo.adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1),
     lambda g: torch.optim.Adam(g, lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, foreach=True)),
    ("adamw", lo.adamw, dict(lr=0.02), lambda g: torch.optim.AdamW(g, lr=0.02, foreach=True)),
    ("adamw_options", lo.adamw, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3),
     lambda g: torch.optim.AdamW(g, lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3, foreach=True)),
    ("adagrad", lo.adagrad, dict(lr=0.05), lambda g: torch.optim.Adagrad(g, lr=0.05, foreach=True)),
    ("adagrad_all_options", lo.adagrad,
     dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5, eps=1e-6),
     lambda g: torch.optim.Adagrad(g, lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5,
                                   eps=1e-6, foreach=True)),
    ("rmsprop", lo.rmsprop, dict(lr=0.01), lambda g: torch.optim.RMSprop(g, lr=0.01, foreach=True)),
    ("rmsprop_centered", lo.rmsprop, dict(lr=0.01, alpha=0.9, eps=1e-6, centered=True),
     lambda g: torch.optim.RMSprop(g, lr=0.01, alpha=0.9, eps=1e-6, centered=True, foreach=True)),
    ("rmsprop_momentum_wd", lo.rmsprop, dict(lr=0.01, momentum=0.8, weight_decay=0.1),
     lambda g: torch.optim.RMSprop(g, lr=0.01, momentum=0.8, weight_decay=0.1, foreach=True)),
    ("rmsprop_all_options", lo.rmsprop, dict(lr=0.01, alpha=0.95, eps=1e-5, weight_decay=0.1, momentum=0.5,
                                             centered=True),
     lambda g: torch.optim.RMSprop(g, lr=0.01, alpha=0.95, eps=1e-5, weight_decay=0.1, momentum=0.5, centered=True,
                                   foreach=True)),
    ("adadelta", lo.adadelta, dict(), lambda g: torch.optim.Adadelta(g, foreach=True)),
    ("adadelta_options", lo.adadelta, dict(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1),
     lambda g: torch.optim.Adadelta(g, lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1, foreach=True)),
    ("amsgrad", lo.amsgrad, dict(lr=0.02), lambda g: torch.optim.Adam(g, lr=0.02, amsgrad=True, foreach=True)),
    ("amsgrad_wd", lo.amsgrad, dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1),
     lambda g: torch.optim.Adam(g, lr=0.02, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True, foreach=True)),
    ("nadam", lo.nadam, dict(lr=0.02), lambda g: torch.optim.NAdam(g, lr=0.02, foreach=True)),
    ("nadam_options", lo.nadam, dict(lr=0.02, betas=(0.8, 0.95), momentum_decay=0.05, weight_decay=0.1),
     lambda g: torch.optim.NAdam(g, lr=0.02, betas=(0.8, 0.95), momentum_decay=0.05, weight_decay=0.1,
                                 foreach=True)),
    ("nadam_decoupled", lo.nadam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
     lambda g: torch.optim.NAdam(g, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True, foreach=True)),
    ("radam", lo.radam, dict(lr=0.02), lambda g: torch.optim.RAdam(g, lr=0.02, foreach=True)),
    ("radam_options", lo.radam, dict(lr=0.02, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1),
     lambda g: torch.optim.RAdam(g, lr=0.02, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1, foreach=True)),
    ("radam_decoupled", lo.radam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
     lambda g: torch.optim.RAdam(g, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True, foreach=True)),
    ("eadam", lo.eadam, dict(lr=0.02), None),
    ("eadam_options", lo.eadam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1), None),
    ("adabelief", lo.adabelief, dict(lr=0.02), None),
    ("adabelief_decoupled", lo.adabelief, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.2), None),
    ("adabelief_fixed_decay", lo.adabelief, dict(lr=0.02, weight_decay=0.01, fixed_decay=True), None),
    ("adabelief_l2", lo.adabelief, dict(lr=0.02, weight_decay=0.1, weight_decouple=False), None),
    ("sign_sgd", lo.sign_sgd, dict(lr=0.01, betas=(0.9, 0.99)), None),
    ("sign_sgd_bias_correction_wd", lo.sign_sgd,
     dict(lr=0.01, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1, use_bias_correction=True), None),
    ("signum", lo.sign_sgd, dict(lr=0.01, betas=(0.9, 0.0), eps=0.0), None),
    ("signsgd_plain", lo.sign_sgd, dict(lr=0.01, betas=(0.0, 0.0), eps=0.0), None),
    ("sign_sgd_no_eps", lo.sign_sgd, dict(lr=0.01, betas=(0.9, 0.5), eps=0.0, use_bias_correction=True), None),
    ("lion", lo.lion, dict(lr=0.01), None),
    ("lion_decoupled", lo.lion, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.5), None),
    ("lion_l2", lo.lion, dict(lr=0.01, weight_decay=0.5, weight_decouple=False), None),
    ("adagrad_norm", lo.adagrad_norm, dict(lr=0.1, b0=0.5), None),
    ("quickprop", lo.quickprop, dict(lr=0.02), None),
    ("quickprop_decay", lo.quickprop, dict(lr=0.03, mu=1.5, weight_decay=0.05), None),
    ("lamb", lo.lamb, dict(lr=0.02), None),
    ("lamb_wd", lo.lamb, dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.1), None),
    ("lamb_no_bias_correction_clamp", lo.lamb,
     dict(lr=0.02, weight_decay=0.1, eps=1e-8, clamp_value=0.5, bias_correction=False), None),
    ("lamb_no_clamp", lo.lamb, dict(lr=0.02, clamp_value=None), None),
    ("apollo", lo.apollo, dict(lr=0.02, warmup_steps=5), None),
    ("apollo_l2", lo.apollo, dict(lr=0.02, init_lr=None, beta=0.8, weight_decay=0.1, warmup_steps=30), None),
    ("apollo_decoupled", lo.apollo, dict(lr=0.02, weight_decay=0.1, weight_decay_type="decoupled", warmup_steps=3),
     None),
    ("apollo_stable_belief", lo.apollo, dict(lr=0.02, rebound="belief", weight_decay=0.1,
                                             weight_decay_type="stable", warmup_steps=3), None),
    # lookahead: "inner" is (factory, kwargs) of the wrapped optimizer, "lr" its learning rate
    ("lookahead_adam", lo.lookahead, dict(lr=0.05, inner=(lo.adam, {})), None),
    ("lookahead_momentum", lo.lookahead, dict(lr=0.02, inner=(lo.sgd, dict(momentum=0.9)), k=3, alpha=0.8), None),
    ("lookahead_rmsprop_centered", lo.lookahead,
     dict(lr=0.01, inner=(lo.rmsprop, dict(momentum=0.5, centered=True)), k=4, alpha=0.3), None),
]
IDS = [c[0] for c in CASES]


def build(factory: Callable, kwargs: dict[str, Any]) -> lo.GradientTransformation:
    if factory is lo.lookahead:
        kwargs = dict(kwargs)
        inner, inner_kwargs = kwargs.pop("inner")
        return lo.lookahead(inner(lr=kwargs.pop("lr"), **inner_kwargs), **kwargs)
    return factory(**kwargs)


def test_every_kernel_has_cases():
    covered = {factory for _, factory, _, _ in CASES}
    assert set(foreach._KERNELS) <= covered, "a registered kernel has no row in CASES"


class Problem(nn.Module):
    """A small two-layer regression; its two layers go into two param groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 6, dtype=DT)
        self.second = nn.Linear(6, 2, dtype=DT)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 4, dtype=DT, generator=generator)
        self.y = torch.randn(16, 2, dtype=DT, generator=generator)

    def loss(self) -> torch.Tensor:
        return ((self.second(torch.tanh(self.first(self.x))) - self.y) ** 2).mean()


def groups(model: Problem, lr: float) -> list[dict[str, Any]]:
    return [{"params": list(model.first.parameters()), "lr": lr},
            {"params": list(model.second.parameters()), "lr": lr * 0.3}]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # torch.optim keeps its step counts (and NAdam's mu_product) in the default dtype; float64
    # there makes the peer exact to float64 rounding.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run(make_opt: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], lr: float, check_grads: bool = False):
    """``STEPS`` steps under a StepLR schedule; the parameter trajectory and the optimizer."""
    model = Problem()
    opt = make_opt(groups(model, lr))
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.5)
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        model.loss().backward()
        before = [p.grad.clone() for p in model.parameters()] if check_grads else None
        opt.step()
        if check_grads:
            for p, g in zip(model.parameters(), before):
                assert torch.equal(p.grad, g), "a kernel wrote into .grad"
        schedule.step()
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return torch.stack(trajectory), opt, model


@pytest.fixture
def spy(monkeypatch):
    """Wrap every registered kernel to record, per factory, what it returned (``lookahead``'s
    kernel calls its inner optimizer's, which records its own)."""
    calls: dict[Callable, list[bool]] = {}

    def wrap(factory, kernel):
        def recorded(*args):
            handled = kernel(*args)
            calls.setdefault(factory, []).append(handled)
            return handled
        return recorded

    for factory, kernel in list(foreach._KERNELS.items()):
        monkeypatch.setitem(foreach._KERNELS, factory, wrap(factory, kernel))
    return calls


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max()) / scale
    assert err <= rtol, f"{what}: relative difference {err:.3g} > {rtol:g}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_functional_path(case, spy):
    _, factory, kwargs, _ = case
    lr = kwargs.get("lr", 1.0)
    kernel_traj, kernel_opt, kernel_model = run(
        lambda g: lo.as_torch_optimizer(build(factory, kwargs), g), lr, check_grads=True)
    ran = spy.get(factory, [])
    assert len(ran) == 2 * STEPS and all(ran), f"the kernel did not run at every step: {ran}"
    spy.clear()
    functional_traj, functional_opt, functional_model = run(
        lambda g: lo.as_torch_optimizer(build(factory, kwargs), g, foreach=False), lr)
    assert not spy
    assert_close(kernel_traj, functional_traj, 1e-10, "trajectory")
    for pk, pf in zip(kernel_model.parameters(), functional_model.parameters()):
        sk, sf = kernel_opt.state[pk], functional_opt.state[pf]
        assert list(sk) == list(sf)
        for key in sf:
            assert sk[key].dtype == sf[key].dtype and sk[key].shape == sf[key].shape, key
            assert_close(sk[key].to(DT), sf[key].to(DT), 1e-10, f"state {key!r}")
    # a shared leaf (step count) is one tensor for the parameters updated together
    for group in kernel_opt.param_groups:
        first = group["params"][0]
        for key in shared_keys(kernel_opt._skeletons[first]):
            assert all(kernel_opt.state[p][key] is kernel_opt.state[first][key] for p in group["params"]), key


@pytest.mark.parametrize("case", [c for c in CASES if c[3] is not None], ids=[c[0] for c in CASES if c[3] is not None])
def test_kernel_matches_torch_optim(case, spy):
    _, factory, kwargs, peer = case
    lr = kwargs.get("lr", 1.0)
    with default_dtype(DT):
        peer_traj, _, _ = run(lambda g: peer(g), lr)
    kernel_traj, _, _ = run(lambda g: lo.as_torch_optimizer(build(factory, kwargs), g), lr)
    ran = spy.get(factory, [])
    assert len(ran) == 2 * STEPS and all(ran), f"the kernel did not run at every step: {ran}"
    assert_close(kernel_traj, peer_traj, 1e-9, "trajectory against torch.optim")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensor_hyperparameter_falls_back(case, spy):
    _, factory, kwargs, _ = case
    lr = kwargs.get("lr", 1.0)
    model = Problem()
    opt = lo.as_torch_optimizer(build(factory, {**kwargs, "lr": torch.tensor(lr, dtype=DT)}), list(model.parameters()))
    model.loss().backward()
    kernel = foreach._KERNELS[factory]
    params = list(model.parameters())
    states = [opt.state[p] for p in params]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    start = [p.detach().clone() for p in params]
    assert kernel(params, [p.grad for p in params], states, opt.tx.recipe.arguments) is False
    for p, p0 in zip(params, start):
        assert torch.equal(p, p0)
    for s, s0 in zip(states, before):
        assert s.keys() == s0.keys() and all(torch.equal(s[k], s0[k]) for k in s)
    spy.clear()
    opt.step()  # and the drop-in then takes the functional path
    assert spy[factory] == [False]
    assert not all(torch.equal(p, p0) for p, p0 in zip(params, start))


def test_signum_steps_by_the_sign_of_tiny_momenta_and_keeps_no_second_moment():
    # m = 1e-30 in float32: m^2 underflows, but signum's step is sign(m) itself (as
    # pytorch_optimizer's SignSGD), in the kernel and the functional path alike; no v is kept
    grad = torch.tensor([1e-30, 0.0, 1.0, -2.0, -1e-30])
    results = []
    for use_kernel in (None, False):
        p = torch.zeros(5, requires_grad=True)
        opt = lo.as_torch_optimizer(lo.sign_sgd(lr=0.1, betas=(0.0, 0.0), eps=0.0), [p], foreach=use_kernel)
        for _ in range(2):
            p.grad = grad.clone()
            opt.step()
        assert set(opt.state[p]) == {"count", "mu"}
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], torch.tensor([-0.2, 0.0, -0.2, 0.2, 0.2]))
