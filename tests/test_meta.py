"""Tests of ``learnopt.meta`` (truncated BPTT, unrolls) and of the quadratic task family.

Float64 throughout. References: central finite differences of the meta-loss; an unroll written
out by hand here (with and without the gradient fed to the LSTM treated as a constant, as
Andrychowicz et al. 2016 do); a closed-form meta-loss for an optimizer whose update is a known
constant; closed-form gradient descent on ||Wθ − y||².
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import directional_derivative
from learnopt import optim as lo
from learnopt.learned import CoordinatewiseLSTM
from learnopt.meta import GradientEstimate, TruncatedBPTT, inner_step, rollout
from tasks.quadratic import QuadraticFamily, QuadraticTask

DT = torch.float64
FD_EPS = 1e-6
FD_RTOL = 1e-5


def _tiny_lstm(seed=0, hidden_size=3, num_layers=2, preprocess="none", output_scale=0.1) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(
        hidden_size=hidden_size, num_layers=num_layers, preprocess=preprocess, output_scale=output_scale
    ).double()


def _family(dim=3):
    return QuadraticFamily(dim, dtype=DT)


def _meta_loss_at(est: TruncatedBPTT, lopt, state) -> float:
    loss, _, _ = est.unroll(lopt, state)
    return loss.item()


def _fd_along(est, lopt, state, direction: dict[str, torch.Tensor], eps=FD_EPS) -> float:
    """Central difference of the truncation's meta-loss along ``direction`` in weight space."""
    named = dict(lopt.named_parameters())
    return directional_derivative(lambda: _meta_loss_at(est, lopt, state), {n: named[n] for n in direction},
                                  direction, eps)


def _check_against_fd(est, lopt, state, meta_grads, n_single=8, seed=0):
    """Meta-gradient vs FD on randomly chosen single weights and on a random direction."""
    g = torch.Generator().manual_seed(seed)
    named = dict(lopt.named_parameters())
    names = sorted(named)
    checked_nonzero = 0
    for _ in range(n_single):
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        idx = int(torch.randint(named[name].numel(), (1,), generator=g))
        direction = {name: torch.zeros_like(named[name]).view(-1).index_fill_(0, torch.tensor([idx]), 1.0)}
        direction[name] = direction[name].view_as(named[name])
        fd = _fd_along(est, lopt, state, direction)
        analytic = meta_grads[name].reshape(-1)[idx].item()
        assert analytic == pytest.approx(fd, rel=FD_RTOL, abs=1e-9), (name, idx)
        checked_nonzero += abs(fd) > 1e-6
    assert checked_nonzero >= n_single // 2
    direction = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in named.items()}
    fd = _fd_along(est, lopt, state, direction)
    analytic = sum((meta_grads[n] * direction[n]).sum() for n in named).item()
    assert abs(fd) > 1e-6
    assert analytic == pytest.approx(fd, rel=FD_RTOL)


def _hand_unroll(lopt, task, theta0, opt_state, k, second_order, transform=lambda f: f):
    """The meta-loss (1/K) Σ_{t=1..K} mean_n transform(f_n(θ_t)), written independently of
    ``learnopt.meta``. With ``second_order=False`` the gradient fed to the optimizer is a
    detached constant."""
    theta = theta0.detach().clone().requires_grad_(True)
    state = opt_state
    terms, thetas = [], []
    for _ in range(k):
        f = task.loss({"theta": theta})
        (grad,) = torch.autograd.grad(f.sum(), theta, create_graph=second_order, retain_graph=True)
        if not second_order:
            grad = grad.detach()
        upd, state = lopt.update({"theta": grad}, state, {"theta": theta})
        theta = theta + upd["theta"]
        thetas.append(theta)
        terms.append(transform(task.loss({"theta": theta})).mean())
    return torch.stack(terms).mean(), thetas, state


# --------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize(
    "lstm_kw",
    [
        dict(num_layers=1, preprocess="none"),
        dict(num_layers=2, preprocess="none"),
        dict(num_layers=2, preprocess="log_sign"),
    ],
    ids=["1layer", "2layer", "2layer_logsign"],
)
def test_second_order_meta_gradient_matches_finite_differences(lstm_kw):
    lopt = _tiny_lstm(seed=1, **lstm_kw)
    est = TruncatedBPTT(_family(3), num_tasks=3, unroll_length=5, horizon=5, second_order=True, seed=2)
    state = est.init_unroll(lopt)
    result = est.estimate(lopt, state)
    assert isinstance(result, GradientEstimate) and result.finite
    assert set(result.meta_grads) == {n for n, _ in lopt.named_parameters()}
    assert result.meta_loss.item() == pytest.approx(_meta_loss_at(est, lopt, state), rel=1e-12)
    _check_against_fd(est, lopt, state, result.meta_grads, seed=3)


def test_second_order_log_transform_matches_finite_differences():
    lopt = _tiny_lstm(seed=4)
    est = TruncatedBPTT(_family(3), num_tasks=2, unroll_length=4, horizon=4, second_order=True, loss_transform="log")
    state = est.init_unroll(lopt)
    result = est.estimate(lopt, state)
    _check_against_fd(est, lopt, state, result.meta_grads, n_single=4, seed=5)


def test_first_order_equals_hand_written_stop_gradient_unroll():
    lopt = _tiny_lstm(seed=6, output_scale=0.5)
    fam = _family(3)
    first = TruncatedBPTT(fam, num_tasks=3, unroll_length=5, horizon=5, second_order=False, seed=7)
    second = TruncatedBPTT(fam, num_tasks=3, unroll_length=5, horizon=5, second_order=True, seed=7)
    state = first.init_unroll(lopt)
    res1 = first.estimate(lopt, state)
    res2 = second.estimate(lopt, state)
    assert res1.meta_loss.item() == pytest.approx(res2.meta_loss.item(), rel=1e-13)  # same forward pass

    names = [n for n, _ in lopt.named_parameters()]
    weights = list(lopt.parameters())
    for second_order, res in ((False, res1), (True, res2)):
        ref_loss, _, _ = _hand_unroll(
            lopt, state.task, state.params["theta"], lopt.init(state.params), 5, second_order
        )
        ref_grads = torch.autograd.grad(ref_loss, weights)
        assert res.meta_loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        for n, rg in zip(names, ref_grads):
            torch.testing.assert_close(res.meta_grads[n], rg, rtol=1e-9, atol=1e-12)

    # Dropping ∇²f changes the meta-gradient on a quadratic (whose Hessian 2WᵀW is not zero).
    flat1 = torch.cat([res1.meta_grads[n].reshape(-1) for n in names])
    flat2 = torch.cat([res2.meta_grads[n].reshape(-1) for n in names])
    assert (flat1 - flat2).norm() > 1e-2 * flat2.norm()


class LinearTask:
    """f_n(θ) = Σ_i c_ni θ_ni: zero Hessian, so the first-order meta-gradient is exact."""

    def __init__(self, c: torch.Tensor):
        self.c = c

    @property
    def num_instances(self):
        return self.c.shape[0]

    def init(self, generator=None):
        return {"theta": 0.1 * torch.randn(self.c.shape, generator=generator, dtype=self.c.dtype)}

    def loss(self, params, batch=None):
        return (self.c * params["theta"]).sum(-1)

    def sample_batch(self, generator=None):
        return None


class LinearFamily:
    name = "linear"

    def __init__(self, dim):
        self.dim = dim

    def sample(self, n, generator=None):
        return LinearTask(torch.randn(n, self.dim, generator=generator, dtype=DT))


def test_zero_hessian_first_and_second_order_agree_with_finite_differences():
    lopt = _tiny_lstm(seed=8, num_layers=2)
    fam = LinearFamily(4)
    first = TruncatedBPTT(fam, num_tasks=3, unroll_length=5, horizon=5, second_order=False, seed=9)
    second = TruncatedBPTT(fam, num_tasks=3, unroll_length=5, horizon=5, second_order=True, seed=9)
    state = first.init_unroll(lopt)
    res1 = first.estimate(lopt, state)
    res2 = second.estimate(lopt, state)
    for n in res1.meta_grads:
        torch.testing.assert_close(res1.meta_grads[n], res2.meta_grads[n], rtol=1e-10, atol=1e-14)
    _check_against_fd(first, lopt, state, res1.meta_grads, n_single=6, seed=10)


# --------------------------------------------------------------------------- truncation


def test_truncation_carries_detached_state_and_restarts_after_horizon():
    lopt = _tiny_lstm(seed=11)
    est = TruncatedBPTT(_family(3), num_tasks=2, unroll_length=3, horizon=6, second_order=True, seed=12)
    s0 = est.init_unroll(lopt)
    assert s0.step == 0 and s0.episode == 0

    r1 = est.estimate(lopt, s0)
    s1 = r1.unroll_state
    assert s1.step == 3 and s1.episode == 0 and s1.task is s0.task
    for leaf in [*s1.params.values(), s1.opt_state.h, s1.opt_state.c]:
        assert leaf.grad_fn is None and not leaf.requires_grad
    # The carried parameters are θ_3 of a hand-written unroll from the same start.
    _, thetas, (h3, c3) = _hand_unroll(lopt, s0.task, s0.params["theta"], lopt.init(s0.params), 3, True)
    torch.testing.assert_close(s1.params["theta"], thetas[-1].detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s1.opt_state.h, h3.detach(), rtol=1e-12, atol=1e-14)

    # Second truncation: its meta-gradient is that of its own meta-loss with the carried state held fixed.
    r2 = est.estimate(lopt, s1)
    s2 = r2.unroll_state
    assert s2.step == 6 and s2.episode == 0 and s2.task is s0.task
    _check_against_fd(est, lopt, s1, r2.meta_grads, n_single=5, seed=13)
    # ...and its meta-loss continues the hand-written unroll from θ_3 and (h_3, c_3).
    ref, _, _ = _hand_unroll(lopt, s0.task, s1.params["theta"], s1.opt_state, 3, True)
    assert r2.meta_loss.item() == pytest.approx(ref.item(), rel=1e-12)

    # After the horizon a new episode with new tasks starts.
    r3 = est.estimate(lopt, s2)
    s3 = r3.unroll_state
    assert s3.episode == 1 and s3.step == 3
    assert s3.task is not s0.task and not torch.allclose(s3.task.W, s0.task.W)
    fresh = est.init_unroll(lopt, 1)
    torch.testing.assert_close(s3.task.W, fresh.task.W, rtol=0, atol=0)


def test_horizon_not_multiple_of_unroll_length():
    lopt = _tiny_lstm(seed=14)
    est = TruncatedBPTT(_family(2), num_tasks=2, unroll_length=3, horizon=4, seed=15)
    s = est.init_unroll(lopt)
    steps = []
    for _ in range(3):
        s = est.estimate(lopt, s).unroll_state
        steps.append((s.episode, s.step))
    assert steps == [(0, 3), (0, 4), (1, 3)]


# --------------------------------------------------------------------------- meta-loss value


def _constant_step_lstm(b: float) -> CoordinatewiseLSTM:
    """An LSTM whose output layer is zeroed except its bias: every coordinate moves by ``b``."""
    lopt = _tiny_lstm(seed=16, output_scale=1.0)
    with torch.no_grad():
        lopt.output.weight.zero_()
        lopt.output.bias.fill_(b)
    return lopt


@pytest.mark.parametrize("transform", ["identity", "log"])
def test_meta_loss_value_closed_form(transform):
    b, K, T = 0.05, 4, 8
    lopt = _constant_step_lstm(b)
    est = TruncatedBPTT(_family(3), num_tasks=3, unroll_length=K, horizon=T, loss_transform=transform, seed=17)
    s0 = est.init_unroll(lopt)
    W, y, theta0 = s0.task.W, s0.task.y, s0.params["theta"]
    tf = (lambda f: math.log(f + 1e-12)) if transform == "log" else (lambda f: f)

    def f(theta):  # per instance, by hand
        return [float(((W[n] @ theta[n] - y[n]) ** 2).sum()) for n in range(W.shape[0])]

    state = s0
    for trunc in range(2):
        t0 = trunc * K
        # θ_t = θ_0 + t·b for every coordinate; meta-loss = mean over t0+1..t0+K of mean over instances.
        expected = sum(sum(tf(v) for v in f(theta0 + t * b)) / 3 for t in range(t0 + 1, t0 + K + 1)) / K
        res = est.estimate(lopt, state)
        state = res.unroll_state
        assert res.meta_loss.item() == pytest.approx(expected, rel=1e-12)
    first_loss = sum(f(theta0 + K * b)) / 3
    assert res.metrics["inner_loss_first"] == pytest.approx(first_loss, rel=1e-12)
    assert res.metrics["inner_loss_last"] == pytest.approx(sum(f(theta0 + 2 * K * b)) / 3, rel=1e-12)
    assert res.metrics["inner_step"] == 2 * K


@pytest.mark.parametrize("transform", ["identity", "log"])
def test_meta_loss_value_hand_unroll(transform):
    lopt = _tiny_lstm(seed=18)
    est = TruncatedBPTT(_family(3), num_tasks=4, unroll_length=5, horizon=5, loss_transform=transform, seed=19)
    s0 = est.init_unroll(lopt)
    tf = (lambda f: torch.log(f + 1e-12)) if transform == "log" else (lambda f: f)
    ref, _, _ = _hand_unroll(lopt, s0.task, s0.params["theta"], lopt.init(s0.params), 5, False, tf)
    res = est.estimate(lopt, s0)
    assert res.meta_loss.item() == pytest.approx(ref.item(), rel=1e-12)


def test_invalid_estimator_arguments():
    with pytest.raises(ValueError):
        TruncatedBPTT(_family(), unroll_length=0)
    with pytest.raises(ValueError):
        TruncatedBPTT(_family(), horizon=0)
    with pytest.raises(ValueError, match="loss_transform"):
        TruncatedBPTT(_family(), loss_transform="sqrt")


# --------------------------------------------------------------------------- non-finite guard


@pytest.mark.parametrize("how", ["huge_scale", "nan_weight"])
def test_non_finite_truncation_is_dropped_and_restarted(how):
    if how == "huge_scale":
        lopt = _tiny_lstm(seed=20, output_scale=1e200)  # steps of ~1e199: f ~ 1e398 = inf in float64
    else:
        lopt = _tiny_lstm(seed=20)
        with torch.no_grad():
            lopt.output.bias.fill_(float("nan"))
    est = TruncatedBPTT(_family(3), num_tasks=2, unroll_length=3, horizon=9, seed=21)
    s0 = est.init_unroll(lopt)
    res = est.estimate(lopt, s0)
    assert res.finite is False
    assert not math.isfinite(res.meta_loss.item())
    assert res.metrics["nonfinite"] == 1.0
    assert set(res.meta_grads) == {n for n, _ in lopt.named_parameters()}
    for n, g in res.meta_grads.items():
        assert torch.equal(g, torch.zeros_like(g)), n
    s = res.unroll_state
    assert s.episode == 1 and s.step == 0
    fresh = est.init_unroll(lopt, 1)
    torch.testing.assert_close(s.task.W, fresh.task.W, rtol=0, atol=0)
    torch.testing.assert_close(s.params["theta"], fresh.params["theta"], rtol=0, atol=0)
    assert torch.isfinite(s.params["theta"]).all()
    # A finite truncation of the same estimator is reported as finite.
    ok = est.estimate(_tiny_lstm(seed=20), s0)
    assert ok.finite and ok.metrics["nonfinite"] == 0.0


# --------------------------------------------------------------------------- inner loops


def test_inner_step_is_sgd_step_for_sgd():
    task = _family(3).sample(2, torch.Generator().manual_seed(22))
    theta = torch.randn(2, 3, dtype=DT, requires_grad=True)
    tx = lo.sgd(lr=0.01)
    loss, new, _ = inner_step(tx, task, {"theta": theta}, tx.init({"theta": theta}))
    W, y, th = task.W, task.y, theta.detach()
    r = torch.einsum("nij,nj->ni", W, th) - y
    torch.testing.assert_close(loss.detach(), (r * r).sum(-1), rtol=1e-13, atol=0)
    expected = th - 0.01 * 2 * torch.einsum("nji,nj->ni", W, r)
    torch.testing.assert_close(new["theta"].detach(), expected, rtol=1e-13, atol=1e-15)


def test_rollout_with_sgd_decreases_loss():
    task = QuadraticFamily(10, distribution="uniform", dtype=DT).sample(5, torch.Generator().manual_seed(23))
    losses = rollout(lo.sgd(lr=0.001), task, 30, generator=torch.Generator().manual_seed(24))
    assert losses.shape == (31, 5)
    assert torch.isfinite(losses).all()
    assert (losses[-1] < losses[0]).all()
    assert (losses[1:] <= losses[:-1] + 1e-12).all()


def test_rollout_matches_closed_form_gradient_descent():
    import numpy as np

    d, n, steps, lr = 3, 2, 6, 0.02
    task = _family(d).sample(n, torch.Generator().manual_seed(25))
    theta0 = torch.randn(n, d, generator=torch.Generator().manual_seed(26), dtype=DT)
    losses = rollout(lo.sgd(lr=lr), task, steps, params={"theta": theta0})
    assert losses.shape == (steps + 1, n)
    W, y = task.W.numpy(), task.y.numpy()
    for i in range(n):
        th = theta0[i].numpy().copy()
        ref = []
        for _ in range(steps):
            r = W[i] @ th - y[i]
            ref.append(r @ r)
            th = th - lr * 2 * W[i].T @ r
        r = W[i] @ th - y[i]
        ref.append(r @ r)
        np.testing.assert_allclose(losses[:, i].numpy(), np.array(ref), rtol=1e-12)
    # The rollout keeps no graph and leaves the given start untouched.
    assert not losses.requires_grad


def test_rollout_with_learned_optimizer_has_no_graph():
    lopt = _tiny_lstm(seed=27)
    task = _family(3).sample(2, torch.Generator().manual_seed(28))
    losses = rollout(lopt, task, 4, generator=torch.Generator().manual_seed(29))
    assert losses.shape == (5, 2) and not losses.requires_grad
    assert all(p.grad is None for p in lopt.parameters())


# --------------------------------------------------------------------------- quadratic family


def test_quadratic_shapes_and_init_scale():
    fam = QuadraticFamily(10, init_scale=0.01, dtype=DT)
    task = fam.sample(7, torch.Generator().manual_seed(30))
    assert isinstance(task, QuadraticTask)
    assert task.W.shape == (7, 10, 10) and task.y.shape == (7, 10) and task.W.dtype == DT
    assert task.num_instances == 7 and task.dim == 10
    params = task.init(torch.Generator().manual_seed(31))
    assert set(params) == {"theta"} and params["theta"].shape == (7, 10)
    assert task.loss(params).shape == (7,)
    big = QuadraticFamily(10, init_scale=0.01, dtype=DT).sample(2000, torch.Generator().manual_seed(32))
    theta = big.init(torch.Generator().manual_seed(33))["theta"]
    assert theta.std().item() == pytest.approx(0.01, rel=0.03)
    assert abs(theta.mean().item()) < 0.01 * 0.03
    theta2 = QuadraticFamily(4, init_scale=0.5).sample(3000, torch.Generator().manual_seed(34)).init()["theta"]
    assert theta2.std().item() == pytest.approx(0.5, rel=0.03)
    assert fam.sample(2).W.dtype == DT and QuadraticFamily(3).sample(2).W.dtype == torch.float32


def test_quadratic_distributions():
    g = torch.Generator().manual_seed(35)
    uni = QuadraticFamily(10, distribution="uniform", dtype=DT).sample(500, g)
    for t in (uni.W, uni.y):
        assert t.min() >= 0.0 and t.max() < 1.0
        assert t.mean().item() == pytest.approx(0.5, abs=0.01)
        assert t.var().item() == pytest.approx(1 / 12, rel=0.05)
    gau = QuadraticFamily(10, distribution="gaussian", dtype=DT).sample(500, g)
    for t in (gau.W, gau.y):
        assert (t < 0).any()
        assert abs(t.mean().item()) < 0.05
        assert t.std().item() == pytest.approx(1.0, rel=0.05)


def test_quadratic_loss_and_optimum():
    task = _family(5).sample(4, torch.Generator().manual_seed(36))
    theta = torch.randn(4, 5, dtype=DT)
    by_hand = torch.stack([((task.W[n] @ theta[n] - task.y[n]) ** 2).sum() for n in range(4)])
    torch.testing.assert_close(task.loss({"theta": theta}), by_hand, rtol=1e-13, atol=0)
    opt = task.optimum()
    assert opt.shape == (4, 5)
    torch.testing.assert_close(opt, torch.linalg.solve(task.W, task.y), rtol=1e-8, atol=1e-10)
    assert task.loss({"theta": opt}).abs().max() < 1e-16
    assert (task.loss({"theta": opt + 0.1}) > 1e-4).all()


def test_quadratic_same_seed_same_tasks():
    fam = QuadraticFamily(4, dtype=DT)
    a = fam.sample(3, torch.Generator().manual_seed(37))
    b = fam.sample(3, torch.Generator().manual_seed(37))
    c = fam.sample(3, torch.Generator().manual_seed(38))
    assert torch.equal(a.W, b.W) and torch.equal(a.y, b.y)
    assert not torch.equal(a.W, c.W)
    ga, gb = torch.Generator().manual_seed(39), torch.Generator().manual_seed(39)
    assert torch.equal(a.init(ga)["theta"], a.init(gb)["theta"])
    # The estimator's episodes are reproducible and differ between episodes and seeds.
    lopt = _tiny_lstm()
    est = TruncatedBPTT(fam, num_tasks=3, seed=5)
    assert torch.equal(est.init_unroll(lopt, 2).task.W, est.init_unroll(lopt, 2).task.W)
    assert not torch.equal(est.init_unroll(lopt, 2).task.W, est.init_unroll(lopt, 3).task.W)
    assert not torch.equal(est.init_unroll(lopt, 2).task.W, TruncatedBPTT(fam, 3, seed=6).init_unroll(lopt, 2).task.W)


def test_quadratic_invalid_arguments():
    with pytest.raises(ValueError, match="dim"):
        QuadraticFamily(0)
    with pytest.raises(ValueError, match="distribution"):
        QuadraticFamily(3, distribution="cauchy")


def test_inner_step_feeds_finite_sum_extras_to_saga():
    """inner_step passes a finite-sum task's extra_args (indices, per-example gradients) to the
    optimizer: SAGA driven by inner_step reaches the optimum that full-batch descent finds."""
    from learnopt import optim as lo
    from learnopt.meta import inner_step
    from learnopt.task import seeded_generator
    from tasks.logistic import LogisticRegressionFamily

    fam = LogisticRegressionFamily(num_examples=40, dim=3, batch_size=4, dtype=torch.float64)
    gen = seeded_generator("saga", 0)
    task = fam.sample(2, gen)
    start = task.init(gen)
    tx = lo.saga(lr=0.5, num_examples=40)
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    state = tx.init(params)
    for _ in range(1500):
        _, params, state = inner_step(tx, task, params, state, task.sample_batch(gen))
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    theta = {k: v.clone() for k, v in start.items()}
    for _ in range(5000):  # full-batch gradient descent as the reference optimum
        g = task.full_grad(theta)
        theta = {k: v - 0.5 * g[k] for k, v in theta.items()}
    with torch.no_grad():
        gap = task.full_loss(params) - task.full_loss(theta)
    assert torch.all(gap.abs() < 1e-8), gap
