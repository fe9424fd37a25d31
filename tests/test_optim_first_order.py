"""Tests of learnopt's first-order optimizers beyond SGD/RMSprop/Adam (``tests/test_optim.py``).

Every optimizer is one row of ``CASES`` and runs through the same contracts. The reference
for each row is independent of learnopt's code: ``torch.optim`` where torch has the method,
``pytorch_optimizer`` (with its variant pinned by explicit arguments) where it has it, and
otherwise a direct transcription of the paper's or the authors' update written below as a
small ``torch.optim.Optimizer`` (plain per-tensor or per-coordinate loops).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import io
import math

import pytest
import pytorch_optimizer
import torch

from learnopt import optim as lo
from learnopt.optim import transforms as lo_transforms
from optim_helpers import (grads as _grads, model_loss as _model_loss, problem as _problem,
                           run_functional as _run_functional, tiny_model as _tiny_model)
from conftest import central_difference

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-12
STEPS = 25


# --------------------------------------------------------------------------- transcriptions


class QuickpropReference(torch.optim.Optimizer):
    """Fahlman (1988), transcribed per coordinate in the structure of his quickprop code:
    ``slope = -(dE/dw + decay * w)``; the step is added to the weight. ``branches`` counts
    which rule fired, so the test can tell the trajectory exercised all of them."""

    def __init__(self, params, lr, mu=1.75, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, mu=mu, weight_decay=weight_decay))
        self.branches = collections.Counter()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu, decay = group["lr"], group["mu"], group["weight_decay"]
            shrink = mu / (1.0 + mu)
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["prev_step"] = [0.0] * p.numel()
                    state["prev_slope"] = [0.0] * p.numel()
                flat, grad = p.view(-1), p.grad.view(-1)
                for i in range(p.numel()):
                    slope = -(grad[i].item() + decay * flat[i].item())
                    prev_step, prev_slope = state["prev_step"][i], state["prev_slope"][i]
                    if prev_step > 0:
                        step = lr * slope if slope > 0 else 0.0
                        if slope > shrink * prev_slope:
                            step += mu * prev_step
                            self.branches["max_growth"] += 1
                        elif prev_slope != slope:
                            step += slope / (prev_slope - slope) * prev_step
                            self.branches["secant"] += 1
                        else:
                            step += lr * slope
                    elif prev_step < 0:
                        step = lr * slope if slope < 0 else 0.0
                        if slope < shrink * prev_slope:
                            step += mu * prev_step
                            self.branches["max_growth"] += 1
                        elif prev_slope != slope:
                            step += slope / (prev_slope - slope) * prev_step
                            self.branches["secant"] += 1
                        else:
                            step += lr * slope
                    else:
                        step = lr * slope
                        self.branches["gradient_descent"] += 1
                    flat[i] += step
                    state["prev_step"][i], state["prev_slope"][i] = step, slope


class GeneralizedSignSGDReference(torch.optim.Optimizer):
    """Crawshaw et al. (2022), Algorithm 1, as the authors' ``GeneralizedSignSGD.step``."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, use_bias_correction=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.use_bias_correction = use_bias_correction

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                bc1 = 1 - beta1**t if self.use_bias_correction else 1
                bc2 = 1 - beta2**t if self.use_bias_correction else 1
                grad = p.grad + group["weight_decay"] * p
                state["m"] = beta1 * state["m"] + (1 - beta1) * grad
                state["v"] = beta2 * state["v"] + (1 - beta2) * state["m"] ** 2
                p -= group["lr"] * (state["m"] / bc1) / ((state["v"] / bc2).sqrt() + group["eps"])


class EAdamReference(torch.optim.Optimizer):
    """Yuan & Gao (2020), the authors' ``EAdam.step`` (amsgrad off)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                grad = p.grad + group["weight_decay"] * p
                state["m"] = beta1 * state["m"] + (1 - beta1) * grad
                state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad + group["eps"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p -= step_size * state["m"] / state["v"].sqrt()


class AdaGradNormReference(torch.optim.Optimizer):
    """Ward, Wu & Bottou (2018), Algorithm 1: ``b^2 += ||g||^2`` over all parameters, then
    ``x -= eta / b * g``."""

    def __init__(self, params, lr, b0):
        super().__init__(params, dict(lr=lr))
        self.b_squared = b0**2

    @torch.no_grad()
    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        self.b_squared += sum(float((p.grad**2).sum()) for p in params)
        for p in params:
            p -= self.param_groups[0]["lr"] / math.sqrt(self.b_squared) * p.grad


class LambReference(torch.optim.Optimizer):
    """You et al. (2020), Algorithm 2 (LAMB), with phi(z) = min(z, clamp). One departure from
    the paper, as in learnopt and pytorch_optimizer: eps is added to ||r + lambda x|| in the
    trust ratio, and the ratio is 1 when either norm is 0."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, clamp=10.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.clamp = clamp

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                state["m"] = beta1 * state["m"] + (1 - beta1) * p.grad
                state["v"] = beta2 * state["v"] + (1 - beta2) * p.grad**2
                m_hat = state["m"] / (1 - beta1**t)
                v_hat = state["v"] / (1 - beta2**t)
                r = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm = min(float(p.norm()), self.clamp)
                r_norm = float(r.norm())
                ratio = w_norm / (r_norm + group["eps"]) if w_norm > 0 and r_norm > 0 else 1.0
                p -= group["lr"] * ratio * r


def _po_lamb(params, clamp=None, **kwargs):
    opt = pytorch_optimizer.Lamb(
        params, weight_decouple=False, adam_debias=True, rectify=False, pre_norm=False, adam=False,
        grad_averaging=True, foreach=False, **kwargs,
    )
    if clamp is not None:
        opt.clamp = clamp  # pytorch_optimizer's phi(z) = min(z, Lamb.clamp)
    return opt


# --------------------------------------------------------------------------- the table

# (id, learnopt factory, its kwargs, reference: params -> optimizer)
CASES = [
    ("rprop", lo.rprop, dict(), lambda ps: torch.optim.Rprop(ps)),
    ("rprop_clamped", lo.rprop, dict(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.08)),
     lambda ps: torch.optim.Rprop(ps, lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.08))),
    ("quickprop", lo.quickprop, dict(lr=0.02), lambda ps: QuickpropReference(ps, lr=0.02)),
    ("quickprop_decay", lo.quickprop, dict(lr=0.03, mu=1.5, weight_decay=0.05),
     lambda ps: QuickpropReference(ps, lr=0.03, mu=1.5, weight_decay=0.05)),
    ("sign_sgd", lo.sign_sgd, dict(lr=0.01, betas=(0.9, 0.99)),
     lambda ps: GeneralizedSignSGDReference(ps, lr=0.01, betas=(0.9, 0.99))),
    ("sign_sgd_bias_correction_wd", lo.sign_sgd,
     dict(lr=0.01, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1, use_bias_correction=True),
     lambda ps: GeneralizedSignSGDReference(ps, lr=0.01, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1,
                                            use_bias_correction=True)),
    ("signum", lo.sign_sgd, dict(lr=0.01, betas=(0.9, 0.0), eps=0.0),
     lambda ps: pytorch_optimizer.SignSGD(ps, lr=0.01, momentum=0.9, foreach=False)),
    ("signum_l2", lo.sign_sgd, dict(lr=0.01, betas=(0.8, 0.0), eps=0.0, weight_decay=0.1),
     lambda ps: pytorch_optimizer.SignSGD(ps, lr=0.01, momentum=0.8, weight_decay=0.1, weight_decouple=False,
                                          foreach=False)),
    ("signsgd_plain", lo.sign_sgd, dict(lr=0.01, betas=(0.0, 0.0), eps=0.0),
     lambda ps: pytorch_optimizer.SignSGD(ps, lr=0.01, momentum=0.0, foreach=False)),
    ("adagrad", lo.adagrad, dict(lr=0.05), lambda ps: torch.optim.Adagrad(ps, lr=0.05)),
    ("adagrad_all_options", lo.adagrad,
     dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5, eps=1e-6),
     lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5,
                                    eps=1e-6)),
    ("adagrad_norm", lo.adagrad_norm, dict(lr=0.1, b0=0.5), lambda ps: AdaGradNormReference(ps, lr=0.1, b0=0.5)),
    ("adadelta", lo.adadelta, dict(), lambda ps: torch.optim.Adadelta(ps)),
    ("adadelta_options", lo.adadelta, dict(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1),
     lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1)),
    ("adamw", lo.adamw, dict(lr=0.02), lambda ps: torch.optim.AdamW(ps, lr=0.02)),
    ("adamw_options", lo.adamw, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3),
     lambda ps: torch.optim.AdamW(ps, lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3)),
    ("amsgrad", lo.amsgrad, dict(lr=0.02), lambda ps: torch.optim.Adam(ps, lr=0.02, amsgrad=True)),
    ("amsgrad_wd", lo.amsgrad, dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True)),
    ("nadam", lo.nadam, dict(lr=0.02), lambda ps: torch.optim.NAdam(ps, lr=0.02)),
    ("nadam_options", lo.nadam, dict(lr=0.02, betas=(0.8, 0.95), momentum_decay=0.05, weight_decay=0.1),
     lambda ps: torch.optim.NAdam(ps, lr=0.02, betas=(0.8, 0.95), momentum_decay=0.05, weight_decay=0.1)),
    ("nadam_decoupled", lo.nadam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
     lambda ps: torch.optim.NAdam(ps, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam", lo.radam, dict(lr=0.02), lambda ps: torch.optim.RAdam(ps, lr=0.02)),
    ("radam_options", lo.radam, dict(lr=0.02, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1),
     lambda ps: torch.optim.RAdam(ps, lr=0.02, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1)),
    ("radam_decoupled", lo.radam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
     lambda ps: torch.optim.RAdam(ps, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True)),
    ("eadam", lo.eadam, dict(lr=0.02), lambda ps: EAdamReference(ps, lr=0.02)),
    ("eadam_options", lo.eadam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
     lambda ps: EAdamReference(ps, lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)),
    ("adabelief", lo.adabelief, dict(lr=0.02),
     lambda ps: pytorch_optimizer.AdaBelief(ps, lr=0.02, rectify=False, ams_bound=False, foreach=False)),
    ("adabelief_decoupled", lo.adabelief, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.2),
     lambda ps: pytorch_optimizer.AdaBelief(ps, lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.2,
                                            weight_decouple=True, fixed_decay=False, rectify=False, foreach=False)),
    ("adabelief_fixed_decay", lo.adabelief, dict(lr=0.02, weight_decay=0.01, fixed_decay=True),
     lambda ps: pytorch_optimizer.AdaBelief(ps, lr=0.02, weight_decay=0.01, weight_decouple=True, fixed_decay=True,
                                            rectify=False, foreach=False)),
    ("adabelief_l2", lo.adabelief, dict(lr=0.02, weight_decay=0.1, weight_decouple=False),
     lambda ps: pytorch_optimizer.AdaBelief(ps, lr=0.02, weight_decay=0.1, weight_decouple=False, rectify=False,
                                            foreach=False)),
    ("lion", lo.lion, dict(lr=0.01), lambda ps: pytorch_optimizer.Lion(ps, lr=0.01, foreach=False)),
    ("lion_decoupled", lo.lion, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.5),
     lambda ps: pytorch_optimizer.Lion(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=0.5, foreach=False)),
    ("lion_l2", lo.lion, dict(lr=0.01, weight_decay=0.5, weight_decouple=False),
     lambda ps: pytorch_optimizer.Lion(ps, lr=0.01, weight_decay=0.5, weight_decouple=False, foreach=False)),
    ("lamb", lo.lamb, dict(lr=0.02), lambda ps: LambReference(ps, lr=0.02)),
    ("lamb_wd", lo.lamb, dict(lr=0.02, betas=(0.8, 0.95), weight_decay=0.1),
     lambda ps: LambReference(ps, lr=0.02, betas=(0.8, 0.95), weight_decay=0.1)),
    ("lamb_no_bias_correction", lo.lamb, dict(lr=0.02, bias_correction=False),
     lambda ps: _po_lamb(ps, lr=0.02)),
    ("lamb_no_bias_correction_wd_clamp", lo.lamb,
     dict(lr=0.02, weight_decay=0.1, eps=1e-8, clamp_value=1.5, bias_correction=False),
     lambda ps: _po_lamb(ps, lr=0.02, weight_decay=0.1, eps=1e-8, clamp=1.5)),
    ("lookahead_adam", lambda **kw: lo.lookahead(lo.adam(lr=0.05), **kw), dict(),
     lambda ps: pytorch_optimizer.Lookahead(torch.optim.Adam(ps, lr=0.05))),
    ("lookahead_momentum", lambda **kw: lo.lookahead(lo.sgd(lr=0.02, momentum=0.9), **kw), dict(k=3, alpha=0.8),
     lambda ps: pytorch_optimizer.Lookahead(torch.optim.SGD(ps, lr=0.02, momentum=0.9), k=3, alpha=0.8)),
]
CASE_IDS = [c[0] for c in CASES]
FACTORIES = {c[0]: (c[1], c[2]) for c in CASES}


def make(name: str, **override):
    factory, kwargs = FACTORIES[name]
    return factory(**{**kwargs, **override})


# --------------------------------------------------------------------------- problems and runners


@contextlib.contextmanager
def _default_dtype(dtype):
    # torch.optim keeps scalar state (NAdam's mu_product, the step counts) in the default dtype;
    # float64 there makes the reference exact to float64 rounding.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _run_reference(make_ref, loss_fn, start, steps):
    with _default_dtype(DT):
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        opt = make_ref(list(params.values()))
        traj = []
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(params).backward()
            opt.step()
            traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj, opt


# --------------------------------------------------------------------------- 1. trajectories


@pytest.mark.parametrize("name,factory,kwargs,make_ref", CASES, ids=CASE_IDS)
def test_trajectory_matches_reference(name, factory, kwargs, make_ref):
    loss_fn, start = _problem()
    ours = _run_functional(factory(**kwargs), loss_fn, start, STEPS)
    ref, ref_opt = _run_reference(make_ref, loss_fn, start, STEPS)
    for t, (p, q) in enumerate(zip(ours, ref)):
        for k in start:
            torch.testing.assert_close(p[k], q[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"step {t + 1}, {k}: {m}")
    # Not vacuous: every tensor moved far beyond the tolerance, and the loss went down.
    for k in start:
        assert (ref[-1][k] - start[k]).abs().max() > 1e-3
    assert loss_fn(ours[-1]) < loss_fn(start)
    if isinstance(ref_opt, QuickpropReference):  # all of Fahlman's rules fired along the way
        assert min(ref_opt.branches[b] for b in ("max_growth", "secant", "gradient_descent")) > 0, ref_opt.branches


def test_rprop_trajectory_crosses_sign_changes():
    """The Rprop rows are only meaningful if the trajectory saw gradient sign changes (where
    torch's variant shrinks the step and skips the next adaptation)."""
    loss_fn, start = _problem()
    tx = lo.rprop()
    params, state = dict(start), tx.init(start)
    flips = 0
    prev = None
    for _ in range(STEPS):
        g = _grads(loss_fn, params)
        if prev is not None:
            flips += sum(int((g[k] * prev[k] < 0).sum()) for k in g)
        prev = g
        updates, state = tx.update(g, state, params)
        params = lo.apply_updates(params, updates)
    assert flips >= 5


def test_rprop_sign_change_rule_by_hand():
    """One coordinate, gradients +1, +1, -1, -1, -2, worked by hand with torch.optim.Rprop's rule:
    1: no previous gradient, d = 0.1, move -0.1;  2: same sign, d = 0.2, move -0.2;
    3: sign change, d = 0.1 and the gradient is zeroed: no move;  4: previous (zeroed) gradient
    is 0, d stays 0.1, move +0.1;  5: same sign, d = 0.2, move +0.2."""
    grads = (1.0, 1.0, -1.0, -1.0, -2.0)
    expected = [-0.1, -0.2, 0.0, 0.1, 0.2]
    tx = lo.rprop(lr=0.1, etas=(0.5, 2.0), step_sizes=(1e-3, 1.0))
    p = {"x": torch.zeros(1, dtype=DT)}
    state = tx.init(p)
    moves = []
    for g in grads:
        u, state = tx.update({"x": torch.tensor([g], dtype=DT)}, state, p)
        moves.append(u["x"].item())
    assert moves == pytest.approx(expected, abs=1e-15)
    x = torch.zeros(1, dtype=DT, requires_grad=True)  # and torch agrees with the hand-worked rule
    opt = torch.optim.Rprop([x], lr=0.1, etas=(0.5, 2.0), step_sizes=(1e-3, 1.0))
    torch_moves = []
    for g in grads:
        before = x.detach().clone()
        x.grad = torch.tensor([g], dtype=DT)
        opt.step()
        torch_moves.append((x.detach() - before).item())
    assert torch_moves == pytest.approx(expected, abs=1e-15)


def test_quickprop_secant_solves_a_parabola_in_one_step():
    """On a separable quadratic the secant step lands on the minimum exactly (growth permitting)."""
    tx = lo.quickprop(lr=0.1, mu=100.0)
    h = torch.tensor([2.0, 0.5], dtype=DT)
    x_star = torch.tensor([1.0, -3.0], dtype=DT)
    p = {"x": torch.zeros(2, dtype=DT)}
    state = tx.init(p)
    for _ in range(2):
        u, state = tx.update({"x": h * (p["x"] - x_star)}, state, p)
        p = lo.apply_updates(p, u)
    # Step 2 = secant + gradient term; the secant part alone would land on x_star. With the
    # gradient term the result is x_star shifted by one gradient step from x_1.
    x1 = -0.1 * h * (0 - x_star)
    expected = x_star + 0.1 * (-h * (x1 - x_star))
    torch.testing.assert_close(p["x"], expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- 2. convergence

CONVERGENCE = [
    ("rprop", dict(), 1e-6),
    ("quickprop", dict(lr=0.05), 1e-6),
    ("sign_sgd", dict(lr=0.005), 1e-4),
    ("signum", dict(lr=0.003), 1e-3),
    ("adagrad", dict(lr=0.5), 1e-6),
    ("adagrad_norm", dict(lr=1.0, b0=1.0), 1e-6),
    ("adadelta", dict(), 1e-2),  # slow: 4.4 -> 0.6 -> 8e-4 at steps 100, 300, 600
    ("adamw", dict(lr=0.05, weight_decay=0.0), 1e-6),
    ("amsgrad", dict(lr=0.05), 1e-4),
    ("nadam", dict(lr=0.01), 1e-4),
    ("radam", dict(lr=0.05), 1e-6),
    ("eadam", dict(lr=0.05), 1e-6),
    ("adabelief", dict(lr=0.05), 1e-6),
    ("lion", dict(lr=0.01), 1e-3),  # sign steps of size lr: ends within ~lr of x*
    ("lamb", dict(lr=0.01), 1e-3),
    ("lookahead_adam", dict(), 1e-6),
]


@pytest.mark.parametrize("name,override,tol", CONVERGENCE, ids=[c[0] for c in CONVERGENCE])
def test_converges_on_convex_quadratic(name, override, tol):
    g = torch.Generator().manual_seed(6)
    A = torch.eye(5, dtype=DT).repeat(2, 1) + 0.1 * torch.randn(10, 5, generator=g, dtype=DT)
    b = torch.randn(10, generator=g, dtype=DT)
    x_star = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    f_star = ((A @ x_star - b) ** 2).sum()

    def loss_fn(p):
        return ((A @ p["x"] - b) ** 2).sum()

    start = {"x": torch.full((5,), 0.5, dtype=DT)}  # nonzero: LAMB's trust ratio scales with ||x||
    assert loss_fn(start) - f_star > 1.0
    final = _run_functional(make(name, **override), loss_fn, start, 600)[-1]
    gap = (loss_fn(final) - f_star).item()
    assert gap < tol, gap


# --------------------------------------------------------------------------- 3. state_dict round trip


def _tiny_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)


def _train(opt, model, X, Y, steps):
    for _ in range(steps):
        opt.zero_grad()
        _model_loss(model, X, Y).backward()
        opt.step()


@pytest.mark.parametrize("name", CASE_IDS)
def test_state_dict_round_trip(name):
    X, Y = _tiny_data()
    model = _tiny_model()
    opt = lo.as_torch_optimizer(make(name), model.named_parameters())
    _train(opt, model, X, Y, 4)  # lookahead rows sync within the next steps too

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    model2, model3 = copy.deepcopy(model), copy.deepcopy(model)
    opt2 = lo.as_torch_optimizer(make(name), model2.named_parameters())
    opt2.load_state_dict(loaded)
    opt3 = lo.as_torch_optimizer(make(name), model3.named_parameters())  # fresh state: must differ

    for o, m in ((opt, model), (opt2, model2), (opt3, model3)):
        _train(o, m, X, Y, 4)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(lo.tree_leaves(opt.tx_state), lo.tree_leaves(opt2.tx_state), strict=True):
        assert torch.equal(a, b)
    # A fresh state must lead elsewhere: in the parameters, or (sign-based methods, whose steps
    # often agree) at least in the state.
    params_differ = not all(torch.equal(p, q) for p, q in zip(model.parameters(), model3.parameters()))
    state_differs = not all(
        torch.equal(a, b) for a, b in zip(lo.tree_leaves(opt.tx_state), lo.tree_leaves(opt3.tx_state), strict=True)
    )
    assert params_differ or state_differs


# --------------------------------------------------------------------------- 4. hypergradients

HYPER = [
    ("rprop", 0.01), ("quickprop", 0.02), ("sign_sgd", 0.01), ("signum", 0.01), ("adagrad", 0.05),
    ("adagrad_all_options", 0.1), ("adagrad_norm", 0.1), ("adadelta_options", 0.5), ("adamw_options", 0.02),
    ("amsgrad", 0.02), ("nadam_options", 0.02), ("radam", 0.02), ("eadam", 0.02), ("adabelief_decoupled", 0.02),
    ("adabelief_fixed_decay", 0.02), ("lion_decoupled", 0.01), ("lamb_wd", 0.02),
    ("lamb_no_bias_correction_wd_clamp", 0.02),
]


def _make_with_lr(name, lr):
    if name.startswith("lookahead"):
        return lo.lookahead(lo.adam(lr=lr), k=2, alpha=0.5)
    return make(name, lr=lr)


def _unrolled_loss(name, lr, loss_fn, start, steps=6):
    params = {k: v.clone() for k, v in start.items()}
    create_graph = isinstance(lr, torch.Tensor) and lr.requires_grad
    if create_graph:
        params = {k: v.requires_grad_(True) for k, v in params.items()}
    tx = _make_with_lr(name, lr)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(_grads(loss_fn, params, create_graph=create_graph), state, params)
        params = lo.apply_updates(params, updates)
    return loss_fn(params)


@pytest.mark.parametrize("name,lr0", HYPER + [("lookahead", 0.02)], ids=[h[0] for h in HYPER] + ["lookahead"])
def test_hypergradient_wrt_lr_matches_finite_difference(name, lr0):
    loss_fn, start = _problem(seed=4)
    lr = torch.tensor(lr0, dtype=DT, requires_grad=True)
    (hyper,) = torch.autograd.grad(_unrolled_loss(name, lr, loss_fn, start), lr)
    fd = torch.tensor(central_difference(
        lambda v: _unrolled_loss(name, torch.tensor(v, dtype=DT), loss_fn, start), lr0, eps=1e-6 * lr0), dtype=DT)
    assert abs(fd.item()) > 1e-2  # a non-trivial hypergradient
    torch.testing.assert_close(hyper, fd, rtol=1e-5, atol=1e-8)


def test_tensor_hyperparameters_match_floats():
    """Every hyperparameter given as a float64 tensor (meta-learnable) computes the same trajectory."""
    t = lambda x: torch.tensor(x, dtype=DT, requires_grad=True)  # noqa: E731
    pairs = [
        (lo.rprop(lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-3, 0.08)),
         lo.rprop(lr=t(0.05), etas=(t(0.3), t(1.5)), step_sizes=(t(1e-3), t(0.08)))),
        (lo.quickprop(lr=0.03, mu=1.5, weight_decay=0.05), lo.quickprop(lr=t(0.03), mu=t(1.5), weight_decay=t(0.05))),
        (lo.sign_sgd(lr=0.01, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1, use_bias_correction=True),
         lo.sign_sgd(lr=t(0.01), betas=(t(0.8), t(0.9)), eps=t(1e-4), weight_decay=t(0.1), use_bias_correction=True)),
        (lo.adagrad(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5, eps=1e-6),
         lo.adagrad(lr=t(0.1), lr_decay=t(0.1), weight_decay=t(0.1), initial_accumulator_value=t(0.5), eps=t(1e-6))),
        (lo.adagrad_norm(lr=0.1, b0=0.5), lo.adagrad_norm(lr=t(0.1), b0=t(0.5))),
        (lo.adadelta(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1),
         lo.adadelta(lr=t(0.5), rho=t(0.8), eps=t(1e-3), weight_decay=t(0.1))),
        (lo.adamw(lr=0.02, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3),
         lo.adamw(lr=t(0.02), betas=(t(0.8), t(0.95)), eps=t(1e-4), weight_decay=t(0.3))),
        (lo.amsgrad(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1),
         lo.amsgrad(lr=t(0.02), betas=(t(0.5), t(0.9)), weight_decay=t(0.1))),
        (lo.nadam(lr=0.02, betas=(0.8, 0.95), momentum_decay=0.05, weight_decay=0.1),
         lo.nadam(lr=t(0.02), betas=(t(0.8), t(0.95)), momentum_decay=t(0.05), weight_decay=t(0.1))),
        (lo.radam(lr=0.02, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1, decoupled_weight_decay=True),
         lo.radam(lr=t(0.02), betas=(t(0.8), t(0.9)), eps=t(1e-4), weight_decay=t(0.1), decoupled_weight_decay=True)),
        (lo.eadam(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
         lo.eadam(lr=t(0.02), betas=(t(0.8), t(0.95)), eps=t(1e-3), weight_decay=t(0.1))),
        (lo.adabelief(lr=0.02, weight_decay=0.01, fixed_decay=True),
         lo.adabelief(lr=t(0.02), weight_decay=t(0.01), fixed_decay=True)),
        (lo.lion(lr=0.01, betas=(0.8, 0.95), weight_decay=0.5),
         lo.lion(lr=t(0.01), betas=(t(0.8), t(0.95)), weight_decay=t(0.5))),
        (lo.lamb(lr=0.02, betas=(0.8, 0.95), weight_decay=0.1, clamp_value=1.5),
         lo.lamb(lr=t(0.02), betas=(t(0.8), t(0.95)), weight_decay=t(0.1), clamp_value=t(1.5))),
        (lo.lookahead(lo.adam(lr=0.05), k=3, alpha=0.7), lo.lookahead(lo.adam(lr=t(0.05)), k=3, alpha=t(0.7))),
    ]
    loss_fn, start = _problem(seed=8)
    for tx_float, tx_tensor in pairs:
        a = _run_functional(tx_float, loss_fn, start, 10)
        b = _run_functional(tx_tensor, loss_fn, start, 10)
        for p, q in zip(a, b):
            for k in start:
                assert q[k].dtype == DT
                torch.testing.assert_close(p[k], q[k], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- 5. double backward at zero gradient

ZERO_GRAD = [
    "rprop", "quickprop", "sign_sgd", "signum", "sign_sgd_bias_correction_wd", "adagrad", "adagrad_all_options",
    "adagrad_norm", "adadelta", "adamw", "amsgrad", "nadam", "radam", "eadam", "adabelief", "adabelief_l2", "lion",
    "lamb", "lamb_no_bias_correction_wd_clamp", "lookahead_adam",
]


def _double_backward_at_zero_grad(make_tx, steps=3):
    """Second derivatives through the optimizer where gradients are exactly 0.

    ``x[2] == 0`` and the loss has ``x[2] ** 2``, so ``g[2] == 0`` with a nonzero derivative wrt
    ``x``; ``x[3]`` and the whole tensor ``z`` (zero, so also ``||z|| == 0``) are ignored by the
    loss, so their gradients are 0 identically."""
    x = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=DT, requires_grad=True)
    z = torch.zeros(2, dtype=DT, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)

    def loss_fn(p):
        y = p["x"]
        return (y[:3] ** 2).sum() + y[0] ** 3 * y[1] + 0.0 * p["z"].sum()

    tx = make_tx()
    params = {"x": x, "z": z}
    state = tx.init(params)
    total = 0.0
    for _ in range(steps):
        grads = _grads(loss_fn, params, create_graph=True)
        assert grads["x"][2] == 0 and grads["x"][3] == 0 and (grads["z"] == 0).all()
        updates, state = tx.update(grads, state, params)
        updates = {k: lr * u for k, u in updates.items()}
        total = total + sum(u.sum() for u in updates.values())
        params = lo.apply_updates(params, updates)
    final = loss_fn(params) + total + sum(t.sum() for t in lo.tree_leaves(state) if t.is_floating_point())
    first = torch.autograd.grad(final, [x, z, lr], create_graph=True, allow_unused=True)
    first = [f for f in first if f is not None]
    second = torch.autograd.grad(sum(f.sum() for f in first), [x, z, lr], allow_unused=True)
    return [t for t in (*first, *second) if t is not None]


@pytest.mark.parametrize("name", ZERO_GRAD)
def test_no_nan_in_double_backward_at_zero_gradient(name):
    out = _double_backward_at_zero_grad(lambda: make(name))
    assert out
    for t in out:
        assert torch.isfinite(t).all(), t


@pytest.mark.parametrize("name", ["adagrad", "lamb"])
def test_zero_gradient_check_detects_plain_sqrt(name, monkeypatch):
    """Control for the test above: with a plain ``torch.sqrt`` the same computation gives NaN."""
    monkeypatch.setattr(lo_transforms, "safe_sqrt", torch.sqrt)
    out = _double_backward_at_zero_grad(lambda: make(name))
    assert any(not torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("plain_sqrt", [False, True], ids=["safe_sqrt", "control_plain_sqrt"])
def test_adagrad_norm_with_b0_zero_at_a_stationary_point(plain_sqrt, monkeypatch):
    """``b0 = 0`` and an all-zero first gradient: ``b_1 = 0``, the update is 0 and second
    derivatives stay finite (with a plain sqrt they would be NaN)."""
    if plain_sqrt:
        monkeypatch.setattr(lo_transforms, "safe_sqrt", torch.sqrt)
    x = torch.zeros(3, dtype=DT, requires_grad=True)
    lr = torch.tensor(0.5, dtype=DT, requires_grad=True)
    tx = lo.adagrad_norm(lr=lr, b0=0.0)
    params = {"x": x}
    state = tx.init(params)
    loss_fn = lambda p: (p["x"] ** 2).sum()  # noqa: E731  (g = 0 at x = 0, with a nonzero Hessian)
    for _ in range(2):
        grads = _grads(loss_fn, params, create_graph=True)
        updates, state = tx.update(grads, state, params)
        params = lo.apply_updates(params, updates)
    first = torch.autograd.grad(loss_fn(params) + state.states[0].b_sq.sum(), [x, lr], create_graph=True)
    second = torch.autograd.grad(sum(f.sum() for f in first), [x, lr])
    finite = all(torch.isfinite(t).all() for t in (*first, *second))
    assert finite != plain_sqrt
    assert torch.equal(params["x"], torch.zeros(3, dtype=DT))


# --------------------------------------------------------------------------- 6. batched


def _batched_problem(B=4, d=3):
    g = torch.Generator().manual_seed(3)
    M = torch.randn(B, d, d, generator=g, dtype=DT)
    H = M @ M.transpose(1, 2) + 0.5 * torch.eye(d, dtype=DT)
    c = torch.randn(B, d, generator=g, dtype=DT)
    C = torch.randn(B, 2, 3, generator=g, dtype=DT)
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=DT)[:B]  # very different gradient magnitudes
    start = {"x": torch.randn(B, d, generator=g, dtype=DT), "W": torch.randn(B, 2, 3, generator=g, dtype=DT)}

    def loss_i(x, W, i):
        r = x - c[i]
        return scales[i] * (0.5 * r @ H[i] @ r + (torch.cosh(W - C[i]) - 1).sum())

    def loss_batched(p):
        return sum(loss_i(p["x"][i], p["W"][i], i) for i in range(B))

    def loss_single(i):
        return lambda p: loss_i(p["x"], p["W"], i)

    return start, loss_batched, loss_single


BATCHED = [
    ("lamb", dict(lr=0.05, weight_decay=0.1)),
    ("lamb_no_bias_correction_wd_clamp", dict()),
    ("adagrad_norm", dict(lr=0.3)),
    ("rprop", dict()),
    ("quickprop", dict(lr=0.01)),
    ("sign_sgd", dict()),
    ("lion", dict()),
    ("adadelta_options", dict()),
    ("nadam", dict()),
    ("radam", dict()),
    ("adabelief", dict()),
    ("lookahead_momentum", dict()),
]


def _with_batch_dims(name, override, batch_dims):
    factory, kwargs = FACTORIES[name]
    if "batch_dims" in inspect.signature(factory).parameters:  # reduces over tensors: per instance
        override = {**override, "batch_dims": batch_dims}
    return factory(**{**kwargs, **override})


@pytest.mark.parametrize("name,override", BATCHED, ids=[b[0] for b in BATCHED])
def test_batched_instances_match_individual_runs(name, override):
    B, steps = 4, 20
    start, loss_batched, loss_single = _batched_problem(B)
    batched = _run_functional(_with_batch_dims(name, override, 1), loss_batched, start, steps)
    for i in range(B):
        single = _run_functional(
            _with_batch_dims(name, override, 0), loss_single(i), {k: v[i] for k, v in start.items()}, steps
        )
        for t in range(steps):
            for k in start:
                torch.testing.assert_close(batched[t][k][i], single[t][k], rtol=1e-10, atol=1e-13)
    assert all((batched[-1][k] - start[k]).abs().max() > 1e-3 for k in start)


@pytest.mark.parametrize("name", ["lamb", "adagrad_norm"])
def test_reducing_over_instances_would_mix_them(name):
    """Control for the batched test: without ``batch_dims`` the norms couple the instances."""
    B, steps = 4, 5
    start, loss_batched, loss_single = _batched_problem(B)
    coupled = _run_functional(make(name), loss_batched, start, steps)
    single = _run_functional(make(name), loss_single(0), {k: v[0] for k, v in start.items()}, steps)
    assert not torch.allclose(coupled[-1]["x"][0], single[-1]["x"], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- 7. out of place, dtypes, extras


@pytest.mark.parametrize("name", CASE_IDS)
def test_update_is_out_of_place(name):
    loss_fn, start = _problem(seed=5)
    tx = make(name)
    params = {k: v.clone() for k, v in start.items()}
    state = tx.init(params)
    for _ in range(3):  # a nonzero state (and a lookahead sync for k=3)
        updates, state = tx.update(_grads(loss_fn, params), state, params)
        params = lo.apply_updates(params, updates)
    grads = _grads(loss_fn, params)
    snap = [lo.tree_map(lambda x: x.clone(), t) for t in (grads, state, params)]
    updates, new_state = tx.update(grads, state, params)
    lo.apply_updates(params, updates)
    for before, after in zip(snap, (grads, state, params)):
        for a, b in zip(lo.tree_leaves(before), lo.tree_leaves(after), strict=True):
            assert torch.equal(a, b)
    inputs = {t.data_ptr() for t in lo.tree_leaves((grads, state, params)) if t.numel()}
    for t in lo.tree_leaves((updates, new_state)):
        if t.numel():
            assert t.data_ptr() not in inputs
    assert all(u.abs().max() > 0 for u in updates.values())


@pytest.mark.parametrize("name", CASE_IDS)
def test_float32_parameters_stay_float32(name):
    loss_fn, start64 = _problem(seed=9)
    start = {k: v.float() for k, v in start64.items()}
    traj = _run_functional(make(name), loss_fn, start, 6)
    ref = _run_functional(make(name), loss_fn, start64, 6)
    for k in start:
        assert traj[-1][k].dtype == torch.float32
        assert torch.isfinite(traj[-1][k]).all()
        # float32 follows the float64 run closely (sign-based methods: same signs almost surely)
        torch.testing.assert_close(traj[-1][k].double(), ref[-1][k], rtol=1e-3, atol=1e-4)


def test_lookahead_forwards_extra_arguments_and_needs_params():
    seen = []

    def update(updates, state, params=None, **extra):
        seen.append(extra)
        return {k: -u for k, u in updates.items()}, state

    inner = lo.GradientTransformation(lambda params: lo.EmptyState(), update)
    tx = lo.lookahead(inner, k=2)
    p = {"a": torch.ones(2, dtype=DT)}
    g = {"a": torch.full((2,), 0.25, dtype=DT)}
    state = tx.init(p)
    u, state = tx.update(g, state, p, loss_fn="f")
    assert seen == [{"loss_fn": "f"}]
    torch.testing.assert_close(u["a"], -g["a"])  # fast step
    p = lo.apply_updates(p, u)
    u, state = tx.update(g, state, p)
    # sync: fast = 0.75 - 0.25 = 0.5, slow = 1 + 0.5 * (0.5 - 1) = 0.75; p becomes slow
    torch.testing.assert_close(lo.apply_updates(p, u)["a"], torch.full((2,), 0.75, dtype=DT))
    torch.testing.assert_close(state.slow["a"], torch.full((2,), 0.75, dtype=DT))
    with pytest.raises(ValueError, match="params"):
        tx.update(g, state)
