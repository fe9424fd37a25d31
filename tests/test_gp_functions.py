"""Tests of ``tasks.gp_functions`` (GP-prior functions, Chen et al. 2017, arXiv 1611.03824) and
``tasks.blackbox_benchmarks``.

References: published minima and minimisers of the benchmarks (Surjanovic & Bingham's library)
and scalar ``math`` transcriptions of their formulas; the SE kernel written out in numpy for
empirical covariances (statistical tolerances of several standard errors); the textbook GP
posterior (Rasmussen & Williams 2006, eq. 2.19) computed with numpy/scipy for conditioning;
central finite differences under common random numbers for gradients; a dense grid for the
RFF minimum estimate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from tasks.blackbox_benchmarks import BENCHMARKS, Branin, GoldsteinPrice, Hartmann3, Hartmann6
from tasks.gp_functions import GPFunctionFamily, LazyGPSample, RFFSample, min_estimate
from conftest import all_partial_derivatives, directional_derivative

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _se_np(a: np.ndarray, b: np.ndarray, ls: np.ndarray, var: float = 1.0) -> np.ndarray:
    d = (a[:, None, :] - b[None, :, :]) / ls
    return var * np.exp(-0.5 * (d**2).sum(-1))


# --------------------------------------------------------------------------- benchmarks

# Published precision of each minimum (the minimisers are rounded, so f there is within it).
_TOL = {"branin": 1e-6, "goldstein_price": 1e-9, "hartmann3": 1e-5, "hartmann6": 1e-5}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_known_minimum(name):
    b = BENCHMARKS[name]
    vals = b(b.minimizers)
    assert vals.shape == (b.minimizers.shape[0],)
    assert torch.allclose(vals, torch.full_like(vals, b.minimum), atol=_TOL[name], rtol=0)
    lo, hi = b.bounds
    assert bool(((b.minimizers >= lo) & (b.minimizers <= hi)).all())


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_nowhere_lower(name):
    b = BENCHMARKS[name]
    u = torch.rand((100_000, b.dim), generator=_gen(0), dtype=DT)
    assert float(b.unit(u).min()) >= b.minimum - _TOL[name]
    # local polish from the best few random points cannot go below the minimum either
    best = u[b.unit(u).topk(3, largest=False).indices]
    lo, hi = b.bounds.numpy()
    for start in best:
        res = scipy.optimize.minimize(lambda z: float(b(torch.tensor(z))), b.from_unit(start).numpy(),
                                      method="L-BFGS-B", bounds=list(zip(lo, hi)))
        assert res.fun >= b.minimum - _TOL[name]


def _branin_ref(x1, x2):
    return ((x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2
            + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10)


def _gp_ref(x1, x2):
    return ((1 + (x1 + x2 + 1) ** 2 * (19 - 14 * x1 + 3 * x1**2 - 14 * x2 + 6 * x1 * x2 + 3 * x2**2))
            * (30 + (2 * x1 - 3 * x2) ** 2 * (18 - 32 * x1 + 12 * x1**2 + 48 * x2 - 36 * x1 * x2 + 27 * x2**2)))


def test_benchmark_batching_and_scalar_reference():
    g = _gen(1)
    for b, ref in ((Branin(), _branin_ref), (GoldsteinPrice(), _gp_ref)):
        x = b.from_unit(torch.rand((3, 4, 2), generator=g, dtype=DT))
        out = b(x)
        assert out.shape == (3, 4)
        for i in range(3):
            for j in range(4):
                assert out[i, j].item() == pytest.approx(ref(*x[i, j].tolist()), rel=1e-12)
    # Hartmann3 at its minimiser computed term by term from the published table
    at_minimiser = Hartmann3()(torch.tensor([0.114614, 0.555649, 0.852547], dtype=DT)).item()
    assert at_minimiser == pytest.approx(-3.86278, abs=1e-5)
    assert Hartmann6().dim == 6 and Hartmann6().bounds.shape == (2, 6)
    with pytest.raises(ValueError):
        Branin()(torch.zeros(5, 3))


# --------------------------------------------------------------------------- lazy exact GP sampler

X5 = torch.tensor([[0.1, 0.2], [0.15, 0.25], [0.5, 0.5], [0.9, 0.1], [0.3, 0.8]], dtype=DT)
LS = 0.3


@pytest.mark.parametrize("sequential", [False, True])
def test_lazy_covariance_matches_kernel(sequential):
    n = 20_000
    fam = GPFunctionFamily(dim=2, lengthscale_range=(LS, LS), signal_variance=2.0)
    s = fam.lazy(n, generator=_gen(2))
    x = X5.expand(n, 5, 2)
    if sequential:  # chain rule, one point at a time
        y = torch.cat([s.query(x[:, i:i + 1]) for i in range(5)], dim=1)
    else:  # one joint draw
        y = s.query(x)
    assert y.shape == (n, 5) and s.num_observed == 5
    emp = np.cov(y.numpy(), rowvar=False)
    ref = _se_np(X5.numpy(), X5.numpy(), np.full(2, LS), 2.0)
    # standard error of a covariance entry: sqrt((K_ii K_jj + K_ij²)/n) <= 2·sqrt(2/n) ≈ 0.02
    np.testing.assert_allclose(emp, ref, atol=0.1)
    assert abs(float(y.mean())) < 0.05


def test_lazy_conditioning_matches_textbook_posterior_and_repeats():
    n = 3
    fam = GPFunctionFamily(dim=2, lengthscale_range=(0.2, 0.4))
    s = fam.lazy(n, generator=_gen(3))
    hist = torch.rand((n, 6, 2), generator=_gen(4), dtype=DT)
    y1 = s.query(hist[:, :4])
    y2 = s.query(hist[:, 4:])
    yh = torch.cat([y1, y2], 1)
    xq = torch.rand((n, 3, 2), generator=_gen(5), dtype=DT)
    mean, cov = s.predict(xq)
    for k in range(n):
        ls = s.lengthscales[k].numpy()
        Khh = _se_np(hist[k].numpy(), hist[k].numpy(), ls) + 1e-6 * np.eye(6)
        Kqh = _se_np(xq[k].numpy(), hist[k].numpy(), ls)
        c = scipy.linalg.cho_factor(Khh, lower=True)
        np.testing.assert_allclose(mean[k].numpy(), Kqh @ scipy.linalg.cho_solve(c, yh[k].numpy()), atol=1e-8)
        ref_cov = _se_np(xq[k].numpy(), xq[k].numpy(), ls) - Kqh @ scipy.linalg.cho_solve(c, Kqh.T)
        np.testing.assert_allclose(cov[k].numpy(), ref_cov, atol=1e-8)
    # zero noise: a repeated point returns its earlier value (up to the jitter)
    rep = s.query(hist[:, 2:3])
    torch.testing.assert_close(rep[:, 0], yh[:, 2], atol=1e-2, rtol=0)
    # variance is small next to observed points and near the prior far from them
    _, near = s.predict(hist[:, :1] + 1e-3)
    assert bool((near.squeeze() < 1e-3).all())


def test_lazy_variance_decreases_near_observations_empirically():
    # y0 = f(x0), then y = f(x0 + d): the residual y − ρ(d) y0 (ρ the kernel correlation) has
    # the conditional variance 1 − ρ², which vanishes as d → 0
    n, ls = 4000, 0.2
    fam = GPFunctionFamily(dim=1, lengthscale_range=(ls, ls))
    emp = []
    for i, d in enumerate((0.01, 0.05, 0.15, 0.9)):
        s = fam.lazy(n, generator=_gen(60 + i))
        y0 = s.query(torch.full((n, 1, 1), 0.05, dtype=DT))[:, 0]
        y = s.query(torch.full((n, 1, 1), 0.05 + d, dtype=DT))[:, 0]
        rho = math.exp(-0.5 * (d / ls) ** 2)
        emp.append(float((y - rho * y0).var()))
        assert emp[-1] == pytest.approx(1 - rho**2, rel=0.1, abs=1e-5)
    assert emp[0] < emp[1] < emp[2] < emp[3]


def test_lazy_gradient_matches_finite_differences():
    fam = GPFunctionFamily(dim=2, lengthscale_range=(0.2, 0.5))
    hist = torch.rand((2, 3, 2), generator=_gen(7), dtype=DT)

    def value(x):
        s = fam.lazy(2, generator=_gen(8))  # same seed → same lengthscales and z (common random numbers)
        s.query(hist)
        return s.query(x)

    x = torch.rand((2, 2, 2), generator=_gen(9), dtype=DT).requires_grad_(True)
    (grad,) = torch.autograd.grad(value(x).sum(), x)
    probe = x.detach().clone()
    fd = all_partial_derivatives(lambda: value(probe).sum(), probe)
    torch.testing.assert_close(grad, fd, atol=1e-5, rtol=1e-4)
    # and through the history: d y_new / d x_hist is nonzero
    xh = hist.clone().requires_grad_(True)
    s = fam.lazy(2, generator=_gen(8))
    s.query(xh)
    (gh,) = torch.autograd.grad(s.query(x.detach()).sum(), xh)
    assert float(gh.abs().sum()) > 0


def test_lazy_deterministic_shapes_and_errors():
    fam = GPFunctionFamily(dim=3)
    x = torch.rand((4, 2, 3), generator=_gen(10), dtype=DT)
    a, b = fam.lazy(4, generator=_gen(11)), fam.lazy(4, generator=_gen(11))
    assert torch.equal(a.query(x), b.query(x)) and torch.equal(a.query(x[:, :1]), b.query(x[:, :1]))
    assert a.lengthscales.shape == (4, 3)
    lo, hi = fam.lengthscale_range
    assert bool(((a.lengthscales >= lo) & (a.lengthscales <= hi)).all())
    assert isinstance(a, LazyGPSample) and a.num_observed == 3
    with pytest.raises(ValueError):
        a.query(torch.rand(4, 2, 2, dtype=DT))
    with pytest.raises(ValueError):
        a.query(torch.rand(3, 2, 3, dtype=DT))
    for kwargs in ({"dim": 0}, {"lengthscale_range": (0.0, 0.3)}, {"lengthscale_range": (0.5, 0.3)},
                   {"signal_variance": 0.0}, {"noise": -1.0}, {"num_features": 0}):
        with pytest.raises(ValueError):
            GPFunctionFamily(**kwargs)
    with pytest.raises(ValueError):
        fam.lazy(0)
    with pytest.raises(ValueError):
        fam.lazy(2, lengthscales=torch.ones(2, 2))


def test_moving_a_sample_keeps_its_history_and_its_noise_stream():
    """``LazyGPSample.to`` / ``RFFSample.to`` (how episodes follow the proposer to its device):
    a moved sample continues exactly as the original would, history and noise stream included.
    On CPU the move is a copy; tests/test_device.py runs the same on CUDA."""
    fam = GPFunctionFamily(dim=2)
    x1, x2 = torch.rand((3, 2, 2), generator=_gen(20), dtype=DT), torch.rand((3, 1, 2), generator=_gen(21), dtype=DT)
    a, b = fam.lazy(3, generator=_gen(22)), fam.lazy(3, generator=_gen(22))
    a.query(x1), b.query(x1)
    moved = b.to("cpu")
    assert moved is not b and moved.num_observed == 2
    assert torch.equal(moved.query(x2), a.query(x2)) and moved.num_observed == 3 and b.num_observed == 2
    f = fam.rff(3, _gen(23))
    assert torch.equal(f.to("cpu")(x1), f(x1))


def test_lazy_noise_is_observation_variance():
    n = 10_000
    fam = GPFunctionFamily(dim=1, lengthscale_range=(0.3, 0.3), noise=0.25)
    s = fam.lazy(n, generator=_gen(12))
    x = torch.full((n, 1, 1), 0.4, dtype=DT)
    y1, y2 = s.query(x), s.query(x)
    # two noisy looks at one point: Var = σ² + noise each, Cov = σ²
    emp = np.cov(torch.cat([y1, y2], 1).numpy(), rowvar=False)
    np.testing.assert_allclose(emp, [[1.25, 1.0], [1.0, 1.25]], atol=0.06)


# --------------------------------------------------------------------------- random Fourier features


def _rff_np(s: RFFSample, x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[:2])
    M = s.num_features
    for k in range(s.num_instances):
        z = x[k] / s.lengthscales[k].numpy()
        arg = z @ s.omega[k].numpy().T + s.phase[k].numpy()
        out[k] = math.sqrt(2 * s.signal_variance / M) * np.cos(arg) @ s.weights[k].numpy()
    return out


def test_rff_matches_formula_shapes_and_determinism():
    fam = GPFunctionFamily(dim=3, num_features=64)
    s = fam.rff(5, generator=_gen(13))
    x = torch.rand((5, 7, 3), generator=_gen(14), dtype=DT)
    y = s(x)
    assert y.shape == (5, 7) and s.omega.shape == (5, 64, 3)
    np.testing.assert_allclose(y.numpy(), _rff_np(s, x.numpy()), rtol=1e-12, atol=1e-12)
    assert torch.equal(fam.rff(5, generator=_gen(13))(x), y)
    assert torch.equal(s.observe(x), y)  # noise-free family
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s(xg).sum(), xg)
    e = torch.zeros_like(x)
    e[..., 1] = 1.0
    fd = directional_derivative(lambda: s(x), [x], [e])  # every point along its own x[..., 1] at once
    torch.testing.assert_close(g[..., 1], fd, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        s(torch.rand(5, 7, 2, dtype=DT))
    with pytest.raises(ValueError):
        fam.rff(2, num_features=0)


def test_rff_covariance_approximates_kernel():
    X = X5.numpy()
    ref = _se_np(X, X, np.full(2, LS), 1.5)
    fam = GPFunctionFamily(dim=2, lengthscale_range=(LS, LS), signal_variance=1.5)
    # conditional on (ω, b) the covariance is Φ Φᵀ, → k as M grows (error ~ 1/sqrt(M))
    big = fam.rff(1, generator=_gen(15), num_features=20_000)
    phi = big.features(X5[None])[0].numpy()
    np.testing.assert_allclose(phi @ phi.T, ref, atol=0.05)
    # over many instances the empirical covariance of f matches k
    n = 20_000
    s = fam.rff(n, generator=_gen(16), num_features=256)
    y = s(X5.expand(n, 5, 2)).numpy()
    np.testing.assert_allclose(np.cov(y, rowvar=False), ref, atol=0.1)


def test_min_estimate_against_dense_grid():
    fam = GPFunctionFamily(dim=2, lengthscale_range=(0.1, 0.3), num_features=128)
    s = fam.rff(3, generator=_gen(17))
    vals, pts = min_estimate(s, num_candidates=1024, generator=_gen(18))
    assert vals.shape == (3,) and pts.shape == (3, 2)
    assert bool(((pts >= 0) & (pts <= 1)).all())
    torch.testing.assert_close(s(pts[:, None])[:, 0], vals)
    g = torch.linspace(0, 1, 301, dtype=DT)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(1, -1, 2).expand(3, -1, 2)
    grid_min = s(grid).min(1).values
    # at least as good as a 90k-point grid (to a small tolerance), never better than possible
    assert bool((vals <= grid_min + 1e-3).all())
    assert bool((vals >= grid_min - 0.05).all())
    v2, _ = s.min_estimate(num_candidates=1024, steps=0, generator=_gen(18))
    assert bool((vals <= v2).all())
    with pytest.raises(ValueError):
        min_estimate(s, num_candidates=0)


def test_family_bounds_and_kernel():
    fam = GPFunctionFamily(dim=4)
    assert fam.bounds.tolist() == [[0.0] * 4, [1.0] * 4]
    x = torch.rand((2, 3, 4), generator=_gen(19), dtype=DT)
    ls = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]], dtype=DT)
    K = fam.kernel(x, x, ls)
    for k in range(2):
        np.testing.assert_allclose(K[k].numpy(), _se_np(x[k].numpy(), x[k].numpy(), ls[k].numpy()), rtol=1e-12)
    s = fam.lazy(2, lengthscales=0.25)
    assert torch.equal(s.lengthscales, torch.full((2, 4), 0.25, dtype=DT))
