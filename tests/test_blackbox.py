"""The gradient-free RNN proposer (Chen et al. 2017): losses, proposer, ask/tell API, GP-EI
baseline, meta-gradients, checkpoints and the meta-train config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import learnopt
from learnopt.blackbox import RNNProposer, RunningStandardizer, minimize
from learnopt.blackbox.baselines import gp_ei, optuna_minimize, random_search
from learnopt.blackbox.gp import GPHyperparameters, GPPosterior, log_marginal_likelihood
from learnopt.blackbox.losses import expected_improvement, observed_improvement_loss, sum_loss
from learnopt.meta.episodic import EpisodicBPTT
from learnopt.task import seeded_generator
from tasks.blackbox_benchmarks import BENCHMARKS
from tasks.blackbox_episodes import _bowl, GPProposerEpisodes, held_out_gp
from tasks.gp_functions import GPFunctionFamily
from conftest import partial_derivatives

ROOT = Path(__file__).resolve().parents[1]


def proposer(dim=2, q=1, seed=0, dtype=torch.float64, trend=False, refine=False):
    torch.manual_seed(seed)
    p = RNNProposer(dim=dim, hidden_size=16, num_layers=2, num_queries=q, trend=trend, refine=refine)
    if refine:  # follow the model's suggestion most of the way, so the tests see it
        with torch.no_grad():
            p.refine_gate.bias.fill_(2.0)
    return p.to(dtype)


def rff(dim=2, n=3, seed=0):
    return GPFunctionFamily(dim, (0.2, 0.4)).rff(n, seeded_generator("t", seed))


# -- losses ----------------------------------------------------------------------------------------
def test_expected_improvement_matches_monte_carlo_and_limits():
    mean = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    var = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    best = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = mean + var.sqrt() * torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    mc = (best - draws).clamp_min(0).mean(0)
    torch.testing.assert_close(expected_improvement(mean, var, best), mc, atol=4e-3, rtol=0)
    # zero variance: the plain improvement, and finite gradients
    m = torch.tensor([-0.5, 0.5], dtype=torch.float64, requires_grad=True)
    ei = expected_improvement(m, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(ei.detach(), torch.tensor([0.5, 0.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(ei.sum(), m)
    assert torch.isfinite(g).all()


def test_observed_improvement_is_the_paper_sum_plus_first_term():
    ys = torch.tensor([[0.5, 0.7, 0.1, 0.3, -0.2], [1.0, 2.0, 3.0, 0.9, 0.95]])
    paper = [sum(min(y[t] - min(y[:t]), 0.0) for t in range(1, 5)) for y in ys.tolist()]
    expected = torch.tensor([ys[0, 0] + paper[0], ys[1, 0] + paper[1]]).mean()
    torch.testing.assert_close(observed_improvement_loss(ys), expected)
    torch.testing.assert_close(observed_improvement_loss(ys), ys.min(1).values.mean())  # = best_T
    torch.testing.assert_close(sum_loss(ys), ys.mean())


def test_running_standardizer_matches_numpy():
    ys = np.random.default_rng(0).normal(3.0, 5.0, size=(2, 7))
    xs = np.random.default_rng(1).uniform(size=(2, 7, 3))
    stats = RunningStandardizer(2, torch.float64, torch.device("cpu"))
    for t in range(7):
        y_std, best_std = stats.update(torch.tensor(ys[:, t:t + 1]), torch.tensor(xs[:, t:t + 1]))
        best_at = ys[:, :t + 1].argmin(1)
        np.testing.assert_array_equal(stats.best_x.numpy(), xs[[0, 1], best_at])
        if t == 0:
            assert torch.equal(y_std, torch.zeros(2, 1, dtype=torch.float64))
            continue
        seen = ys[:, :t + 1]
        mean, std = seen.mean(1), seen.std(1)
        np.testing.assert_allclose(y_std[:, 0].numpy(), (ys[:, t] - mean) / std, rtol=1e-9)
        np.testing.assert_allclose(best_std.numpy(), (seen.min(1) - mean) / std, rtol=1e-9)


@pytest.mark.parametrize("q", [1, 3])
def test_session_standardizer_matches_the_batched_one(q):
    from learnopt.blackbox.session import _Standardizer

    rng = np.random.default_rng(q)
    ys = 1e6 + rng.normal(0.0, 2.0, size=(1, 6 * q))  # a large offset: the shifted sums matter
    ys[0, q:2 * q] = ys[0, 0]  # ties with the best: best_x must keep the first
    xs = rng.uniform(size=(1, 6 * q, 2))
    ref, fast = RunningStandardizer(1, torch.float64, torch.device("cpu")), _Standardizer()
    for t in range(0, 6 * q, q):
        y_ref, best_ref = ref.update(torch.tensor(ys[:, t:t + q]), torch.tensor(xs[:, t:t + q]))
        y_fast, best_fast = fast.update(ys[0, t:t + q], xs[0, t:t + q])
        np.testing.assert_allclose(y_fast, y_ref[0].numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(best_fast, float(best_ref[0]), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(fast.best_x, ref.best_x[0].numpy())
    constant = _Standardizer()
    for _ in range(3):  # constant observations standardise to 0, not 0/0
        y_std, best_std = constant.update(np.array([2.5]), np.zeros((1, 2)))
        assert y_std[0] == 0.0 and best_std == 0.0


@pytest.mark.parametrize("q,explore,dtype,local,trend,stretch", [
    (1, False, torch.float32, False, False, 0.0), (2, True, torch.float32, False, False, 0.0),
    (1, False, torch.float64, False, False, 0.0), (1, False, torch.float32, True, False, 0.0),
    (2, True, torch.float64, True, False, 0.0), (1, False, torch.float32, False, True, 0.0),
    (2, False, torch.float64, True, True, 0.0), (1, False, torch.float64, False, False, 0.3)])
def test_numpy_stepper_matches_the_torch_step(q, explore, dtype, local, trend, stretch):
    torch.manual_seed(0)
    p = RNNProposer(dim=3, hidden_size=16, num_layers=3, num_queries=q, explore=explore, local=local,
                    trend=trend, stretch=stretch).to(dtype)
    fast = p.numpy_stepper()
    rng = np.random.default_rng(0)
    state, fstate = p.initial_state(1), fast.initial_state()
    inp, finp = p.start_input(1), fast.start_input()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for _ in range(5):
        noise = torch.rand(1, q, 3, dtype=dtype) if explore else None
        with torch.no_grad():
            x, state = p.step(inp, state, noise)
        fx, fstate = fast.step(finp, fstate, None if noise is None else noise[0].numpy())
        assert fx.dtype == np.float64 and fx.shape == (q, 3)
        np.testing.assert_allclose(fx, x[0].double().numpy(), **tol)
        for (h, c), (fh, fc) in zip(state, fstate):
            np.testing.assert_allclose(fh, h[0].numpy(), **tol)
            np.testing.assert_allclose(fc, c[0].numpy(), **tol)
        xq, y, best = rng.uniform(size=(q, 3)), rng.normal(size=q), rng.normal()
        bx, tr = rng.uniform(size=3), (rng.uniform(-1, 1, size=4) if trend else None)
        inp = p.observation_input(torch.tensor(xq)[None], torch.tensor(y)[None],
                                  torch.tensor([best], dtype=torch.float64), torch.tensor(bx)[None],
                                  None if tr is None else torch.tensor(tr)[None])
        finp = fast.observation_input(xq, y, best, bx, tr)
        assert finp.shape == (p.input_size,)
        np.testing.assert_allclose(finp, inp[0].numpy(), **tol)
    if explore:
        with pytest.raises(ValueError, match="noise"):
            fast.step(finp, fstate)
    if trend:
        with pytest.raises(ValueError, match="trend features"):
            fast.observation_input(xq, y, best, bx)
        with pytest.raises(ValueError, match="trend features"):
            p.observation_input(torch.tensor(xq)[None], torch.tensor(y)[None], torch.zeros(1), torch.tensor(bx)[None])
    # a snapshot: later changes to the weights do not reach it
    zeros = np.zeros((q, 3))
    before = fast.step(finp, fstate, zeros)[0]
    with torch.no_grad():
        p.head.bias.add_(1.0)
    np.testing.assert_array_equal(fast.step(finp, fstate, zeros)[0], before)
    assert not np.allclose(p.numpy_stepper().step(finp, fstate, zeros)[0], before)


def test_quadratic_trend_fits_a_separable_quadratic_and_the_session_matches_it():
    from learnopt.blackbox.proposer import QuadraticTrend
    from learnopt.blackbox.trend import separable_quadratic_minimum
    from learnopt.blackbox.session import _Standardizer

    # minimiser of a z² + b z on [-1, 1]: the vertex (convex, inside), clamped (convex, outside),
    # the end the slope points to (concave or linear), against a dense grid
    a = torch.tensor([2.0, 0.5, -1.0, 0.0, -0.5], dtype=torch.float64)
    b = torch.tensor([1.0, -3.0, 0.5, -2.0, 0.0], dtype=torch.float64)
    z, value = separable_quadratic_minimum(a, b)
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)[:, None]
    torch.testing.assert_close(value, (a * grid ** 2 + b * grid).min(0).values, rtol=0, atol=1e-8)
    torch.testing.assert_close(z, torch.tensor([-0.25, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64))  # tie: +1
    # an exact separable quadratic is recovered (tiny ridge): its box minimiser and minimum
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(1, 40, 3))
    u = 2 * x - 1
    y = 5.0 + 2 * (u[..., 0] - 0.3) ** 2 - 0.5 * u[..., 1] ** 2 + 0.7 * u[..., 2]
    fit = QuadraticTrend(1, 3, torch.device("cpu"), ridge=1e-10)
    fit.update(torch.tensor(x), torch.tensor(y), torch.zeros(1, dtype=torch.float64))
    feats = fit.features(torch.tensor([4.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64))
    minimum = 5.0 - 0.5 - 0.7  # at z = (0.3, ±1, -1)
    torch.testing.assert_close(feats[0, [0, 2, 3]], torch.tensor([0.3, -1.0, (minimum - 4.0) / 2.0],
                                                                 dtype=torch.float64), rtol=0, atol=1e-6)
    assert abs(float(feats[0, 1])) == pytest.approx(1.0)
    # the session's numpy fit gives the batched one's features, step by step (q = 2 per step)
    ref, fast = RunningStandardizer(1, torch.float64, torch.device("cpu")), _Standardizer(3)
    ref_fit = QuadraticTrend(1, 3, torch.device("cpu"))
    ys = 1e3 + rng.normal(size=(1, 16))
    for t in range(0, 16, 2):
        ref.update(torch.tensor(ys[:, t:t + 2]), torch.tensor(x[:, t:t + 2]))
        ref_fit.update(torch.tensor(x[:, t:t + 2]), torch.tensor(ys[:, t:t + 2]), ref.shift)
        fast.update(ys[0, t:t + 2], x[0, t:t + 2])
        want = RNNProposer(dim=3, trend=True).trend_features(ref_fit, ref)
        np.testing.assert_allclose(fast.trend_features(), want[0].numpy(), rtol=1e-9, atol=1e-9)


# -- the proposer -----------------------------------------------------------------------------------
def test_a_trained_proposer_can_be_grown_to_read_the_trend(tmp_path):
    from learnopt.checkpoint import CheckpointError
    from learnopt.train.module import MetaTrainModule

    source, f = proposer(dim=3, dtype=torch.float32), rff(dim=3)
    path = learnopt.export_checkpoint(source, tmp_path / "plain.pt")
    fam = GPProposerEpisodes(dim=3, horizon=5, lengthscale_range=(0.3, 0.5))
    grown = proposer(dim=3, seed=1, dtype=torch.float32, trend=True)
    with pytest.warns(UserWarning, match="weights_from.*trend"):
        MetaTrainModule(grown, fam, init_from=str(path))
    with torch.no_grad():  # the trend's input columns start at zero: the same queries
        torch.testing.assert_close(grown.rollout(f, 3, 15)[0], source.rollout(f, 3, 15)[0], rtol=0, atol=1e-6)
    assert grown.cells[0].weight_ih[:, grown.trend_at:grown.trend_at + 4].abs().max() == 0
    # and it trains them: the meta-gradient reaches the new columns
    xs, ys = grown.rollout(f, 3, 15)
    ys.min(1).values.sum().backward()
    assert grown.cells[0].weight_ih.grad[:, grown.trend_at:grown.trend_at + 4].abs().max() > 0
    with_local = RNNProposer(dim=3, hidden_size=16, num_layers=2, local=True, trend=True)
    with pytest.warns(UserWarning, match="local"):  # new heads keep their init
        MetaTrainModule(with_local, fam, init_from=str(path))
    assert torch.equal(with_local.head.weight, source.head.weight)
    with_refine = RNNProposer(dim=3, hidden_size=16, num_layers=2, refine=True)
    with pytest.warns(UserWarning, match="refine"):
        MetaTrainModule(with_refine, fam, init_from=str(path))
    assert torch.equal(with_refine.head.weight, source.head.weight)
    assert float(with_refine.refine_gate.bias.detach()[0]) == -4.0  # nearly closed: starts as the source
    with pytest.raises(CheckpointError, match="only trend, local, refine and stretch may differ.*hidden_size"):
        MetaTrainModule(RNNProposer(dim=3, hidden_size=8, trend=True), fam, init_from=str(path))


def test_quadratic_model_step_is_the_trust_region_minimiser():
    from learnopt.blackbox.refine import numpy_suggestion, quadratic_model_step

    rng = np.random.default_rng(0)
    dim = 4
    a = rng.normal(size=(dim, dim))
    for hess in (a @ a.T + np.eye(dim), a + a.T):  # convex, then indefinite
        centre = rng.uniform(0.4, 0.6, dim)

        def f(x):
            return 0.5 * np.einsum("...i,ij,...j->...", x - centre, hess, x - centre) + 3.0

        xs = rng.uniform(0.3, 0.7, (40, dim))
        ys = f(xs)
        best = xs[np.argmin(ys)]
        if np.linalg.eigvalsh(hess).min() > 0:  # a large radius reaches the exact minimiser
            np.testing.assert_allclose(numpy_suggestion(xs, ys, 10.0), centre, atol=1e-6)
        # within a small radius: no better point of the (exactly fitted) model in the ball
        step = quadratic_model_step(xs - best, ys, np.float64(0.05), np)
        assert np.linalg.norm(step) <= 0.05 + 1e-12
        ball = rng.normal(size=(20000, dim))
        ball *= rng.uniform(size=(20000, 1)) ** (1 / dim) / np.linalg.norm(ball, axis=1, keepdims=True)
        ball = best + 0.05 * ball  # uniform in the ball of radius 0.05
        assert f(best + step) <= f(ball).min() + 1e-9
    # too few observations: no suggestion
    assert numpy_suggestion(xs[:5], ys[:5], 0.1) is None


def test_refine_radius_and_batched_model_match_the_session():
    from learnopt.blackbox.refine import LocalQuadraticModel, numpy_suggestion, numpy_update_radius

    assert numpy_update_radius(0.1, 1.0, True) == pytest.approx(0.15)
    assert numpy_update_radius(0.1, 1.0, False) == pytest.approx(0.05)
    assert numpy_update_radius(0.1, 0.0, False) == pytest.approx(0.1)  # not followed: unchanged
    assert numpy_update_radius(0.25, 1.0, True) == pytest.approx(0.3)   # capped
    rng = np.random.default_rng(1)
    xs = rng.uniform(size=(3, 60, 3))
    ys = np.sin(4 * xs).sum(-1)
    model = LocalQuadraticModel(3, 3, torch.device("cpu"))
    model.update(torch.tensor(xs[:, :50]), torch.tensor(ys[:, :50]), None)
    model.update(torch.tensor(xs[:, 50:]), torch.tensor(ys[:, 50:]), torch.tensor([1.0, 0.5, 0.0]))
    improved = ys[:, 50:].min(1) < ys[:, :50].min(1)
    want_rho = [numpy_update_radius(0.1, w, bool(i)) for w, i in zip([1.0, 0.5, 0.0], improved)]
    np.testing.assert_allclose(model.rho.numpy(), want_rho)
    got = model.suggestion().numpy()
    for i in range(3):
        np.testing.assert_allclose(got[i], numpy_suggestion(xs[i], ys[i], want_rho[i]), atol=1e-12)


def test_refining_proposer_converges_on_a_quadratic_and_learns_its_gate():
    torch.manual_seed(0)
    p = RNNProposer(dim=3, hidden_size=16, refine=True).double()
    centre = torch.tensor([0.3, 0.6, 0.45], dtype=torch.float64)

    def bowl(x):
        return ((x - centre) ** 2 * torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)).sum(-1)

    with torch.no_grad():
        p.refine_gate.bias.fill_(50.0)  # always follow the model once it has a suggestion
        p.refine_gate.weight.zero_()
        xs, ys = p.rollout(bowl, 2, 40)
    assert float(ys[:, :11].min(1).values.min()) > 1e-3  # the network alone, before the model
    assert float(ys.min(1).values.max()) < 1e-10  # the trust-region steps find the minimum
    q = RNNProposer(dim=3, hidden_size=16, refine=True).double()  # gate at its start, r ≈ 0.02
    xs, ys = q.rollout(bowl, 2, 20)
    ys[:, 11:].sum().backward()  # L_sum over the queries that had a suggestion
    assert q.refine_gate.bias.grad.abs().max() > 0  # meta-training reaches the gate


def test_refine_schedule_opens_the_gate_between_its_two_counts(tmp_path):
    torch.manual_seed(0)
    p = RNNProposer(dim=6, hidden_size=8, refine=True, refine_schedule=(70, 90)).double()
    state = [(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64))] * 2
    r = {t: p.refine_weight(state, t).detach() for t in (0, 70, 90, 100)}
    for t, logit in ((70, -4.0), (90, 3.0)):
        torch.testing.assert_close(r[t], torch.full((2, 1), 1 / (1 + math.exp(-logit)), dtype=torch.float64))
    assert float(r[0].max()) < 1e-10 and float(r[100].min()) > 0.95  # the state does not enter yet
    loaded = learnopt.load(learnopt.export_checkpoint(p, tmp_path / "s.pt"))
    assert loaded.config() == p.config() and loaded.config()["refine_schedule"] == [70, 90]
    torch.testing.assert_close(loaded.refine_gate.weight, p.refine_gate.weight.to(loaded.dtype))
    with pytest.raises(ValueError, match="refine_schedule needs refine=True"):
        RNNProposer(dim=2, refine_schedule=(5, 10))
    with pytest.raises(ValueError, match="closed < opened"):
        RNNProposer(dim=2, refine=True, refine_schedule=(10, 5))


def test_stretched_proposer_reaches_the_faces_and_grows_from_a_plain_one(tmp_path):
    from learnopt.train.module import MetaTrainModule

    torch.manual_seed(0)
    p = RNNProposer(dim=2, hidden_size=8, stretch=0.1).double()
    inp = p.start_input(1)
    with torch.no_grad():
        p.head.weight.zero_()
        p.head.bias.copy_(torch.tensor([-4.0, 0.5]))  # σ = 0.018 (clipped to the face), 0.622
        x, _ = p.step(inp, p.initial_state(1))
    assert float(x[0, 0, 0]) == 0.0
    assert float(x[0, 0, 1]) == pytest.approx(1.1 * float(torch.sigmoid(torch.tensor(0.5))) - 0.05)
    plain = RNNProposer(dim=2, hidden_size=8).double()
    x0 = plain.rollout(lambda u: (u - 0.3).pow(2).sum(-1), 2, 6)[0]
    assert float(((x0 == 0) | (x0 == 1)).float().sum()) == 0  # the paper's squash never reaches a face
    path = learnopt.export_checkpoint(plain, tmp_path / "plain.pt")
    fam = GPProposerEpisodes(dim=2, horizon=5, lengthscale_range=(0.3, 0.5))
    grown = RNNProposer(dim=2, hidden_size=8, stretch=0.05).double()
    MetaTrainModule(grown, fam, init_from=str(path))
    assert float(grown.stretch) == pytest.approx(0.05) and torch.equal(grown.head.weight, plain.head.weight)
    loaded = learnopt.load(learnopt.export_checkpoint(grown, tmp_path / "grown.pt"))
    assert loaded.config()["stretch"] == 0.05 and float(loaded.stretch) == pytest.approx(0.05)
    xs, ys = grown.rollout(lambda u: (u - 0.3).pow(2).sum(-1), 2, 6)
    ys.min(1).values.sum().backward()
    assert grown.stretch.grad is not None  # meta-training learns the stretch


def test_local_proposer_queries_around_the_incumbent():
    torch.manual_seed(0)
    p = RNNProposer(dim=2, hidden_size=8, local=True)
    best = torch.tensor([[0.2, 0.9]])
    inp = p.observation_input(torch.tensor([[[0.5, 0.5]]]), torch.zeros(1, 1), torch.zeros(1), best)
    with torch.no_grad():
        p.local_gate.bias.fill_(50.0)      # all weight on the incumbent-relative query
        p.local_gate.weight.zero_()
        p.local_head.weight.zero_()
        p.local_head.bias.zero_()
        x, _ = p.step(inp, p.initial_state(1))
        assert torch.allclose(x[0, 0], best[0], atol=1e-6)
        p.local_head.bias.copy_(torch.tensor([0.5, -0.5]))  # a step in logit space: stays in the box
        x, _ = p.step(inp, p.initial_state(1))
        assert torch.allclose(x[0, 0], torch.sigmoid(torch.logit(best[0]) + torch.tensor([0.5, -0.5])))
        p.local_gate.bias.fill_(-50.0)     # all weight on the absolute head
        x_abs, _ = p.step(inp, p.initial_state(1))
        assert torch.allclose(x_abs[0, 0], torch.sigmoid(p.head(p.step(inp, p.initial_state(1))[1][-1][0]))[0])
    xs, ys = p.rollout(lambda u: (u - 0.3).pow(2).sum(-1), 2, 6)
    assert xs.shape == (2, 6, 2) and bool(((xs > 0) & (xs < 1)).all())


@pytest.mark.parametrize("trend", [False, True])
def test_rollout_is_invariant_to_affine_rescaling_of_f(trend):
    p, f = proposer(trend=trend), rff()
    with torch.no_grad():
        xs1, ys1 = p.rollout(f, 3, 12)
        xs2, ys2 = p.rollout(lambda x: 250.0 * f(x) - 40.0, 3, 12)
    torch.testing.assert_close(xs1, xs2, rtol=0, atol=1e-9)  # float64
    torch.testing.assert_close(ys2, 250.0 * ys1 - 40.0)
    assert ((xs1 > 0) & (xs1 < 1)).all()


@pytest.mark.parametrize("q", [1, 3])
def test_parallel_proposer_budget_and_shapes(q):
    p, f = proposer(q=q), rff()
    calls = []

    def objective(x):
        calls.append(x.shape[1])
        return f(x)

    xs, ys = p.rollout(objective, 3, 10)
    assert xs.shape == (3, 10, 2) and ys.shape == (3, 10)
    assert sum(calls) == 10 and all(c <= q for c in calls) and len(calls) == math.ceil(10 / q)


def test_meta_gradient_matches_finite_differences():
    """Whole-episode BPTT through the lazy GP chain rule against central differences of the same
    episodes (common random numbers), for the L_sum and L_EI losses and one proposer weight."""
    p = proposer(dim=2)
    for loss in ("sum", "ei"):
        fam = GPProposerEpisodes(dim=2, horizon=6, loss=loss, lengthscale_range=(0.3, 0.5))
        est = EpisodicBPTT(fam, num_episodes=4, seed=1)
        grad = est.estimate(p).meta_grads["head.weight"]
        idx = (0, 3)
        (fd,) = partial_derivatives(lambda: fam.meta_loss(p, 4, est.init_unroll(p, 0).generator)[0],
                                    [p.head.weight], [(0, idx)], eps=1e-5).tolist()
        assert abs(fd - float(grad[idx])) < 1e-5 + 1e-4 * abs(fd), (loss, fd, float(grad[idx]))


# -- the user-facing API ----------------------------------------------------------------------------
def branin_fun(x):
    return float(BENCHMARKS["branin"](torch.as_tensor(x)[None]))


@pytest.mark.parametrize("trend,refine", [(False, False), (True, False), (False, True)])
def test_minimize_maps_the_box_and_equals_the_batched_rollout(trend, refine):
    # (float64 with refine: the model's least-squares fit magnifies float32's rounding to ~1e-5)
    p = proposer(dtype=torch.float64 if refine else torch.float32, trend=trend, refine=refine)
    branin = BENCHMARKS["branin"]
    res = minimize(branin_fun, [(-5, 10), (0, 15)], budget=15, proposer=p)
    with torch.no_grad():
        xs, ys = p.rollout(lambda u: branin(branin.from_unit(u.double())), 1, 15)
    np.testing.assert_allclose(res.xs, branin.from_unit(xs.double())[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(res.ys, ys[0].numpy(), rtol=1e-6)
    assert res.fun == res.ys.min() and np.allclose(res.x, res.xs[res.ys.argmin()])
    assert res.nfev == 15 and res.time_per_proposal > 0
    assert all((-5 <= x[0] <= 10) and (0 <= x[1] <= 15) for x in res.xs)
    # the same through the proposer's own method and scipy's Bounds(lower, upper)
    import scipy.optimize

    res2 = p.minimize(branin_fun, scipy.optimize.Bounds([-5.0, 0.0], [10.0, 15.0]), budget=15)
    np.testing.assert_allclose(res2.ys, res.ys)


@pytest.mark.parametrize("refine", [False, True])
def test_asks_in_flight_use_the_constant_liar_and_replay_true_values(refine):
    p = proposer(dtype=torch.float64 if refine else torch.float32, refine=refine)
    f = branin_fun
    bounds = [(-5, 10), (0, 15)]
    s = p.ask_tell(bounds)
    a = s.ask()
    s.tell(a, f(a))
    b, c = s.ask(), s.ask()  # two in flight
    ref = p.ask_tell(bounds)  # c is what comes after b observed at the liar value (best so far = f(a))
    ra = ref.ask()
    ref.tell(ra, f(ra))
    rb = ref.ask()
    ref.tell(rb, f(a))
    np.testing.assert_allclose(b, rb)
    np.testing.assert_allclose(c, ref.ask())
    s.tell(c, f(c))
    s.tell(b, f(b))  # out of order
    d = s.ask()
    seq = _replayed(p, bounds, [(a, f(a)), (b, f(b)), (c, f(c))])
    np.testing.assert_allclose(d, seq, rtol=1e-6)
    assert s.result().nfev == 3
    if refine:  # past min_points (7 in 2-d) the model's suggestion enters, with more in flight
        history = [(a, f(a)), (b, f(b)), (c, f(c))]
        s.tell(d, f(d))
        history.append((d, f(d)))
        for _ in range(4):
            e, g = s.ask(), s.ask()
            s.tell(g, f(g))
            s.tell(e, f(e))
            history += [(e, f(e)), (g, f(g))]
        np.testing.assert_allclose(s.ask(), _replayed(p, bounds, history), rtol=1e-9)


def _replayed(p, bounds, history):
    """Next query after ``history`` computed directly with the proposer's step function."""
    from learnopt.blackbox.refine import LocalQuadraticModel
    from learnopt.blackbox.session import as_bounds

    b = as_bounds(bounds)
    stats = RunningStandardizer(1, torch.float64, torch.device("cpu"))
    model = LocalQuadraticModel(1, p.dim, torch.device("cpu"))
    with torch.no_grad():
        suggestion = None
        x, state = p.step(p.start_input(1), p.initial_state(1))
        for xu, y in history:
            unit = (torch.as_tensor(xu) - b[0]) / (b[1] - b[0])
            y = torch.tensor([[y]], dtype=torch.float64)
            if p.refine:  # the gate of the step that emitted this query, if it had a suggestion
                weight = None if suggestion is None else p.refine_weight(state, model.count)[:, 0]
                model.update(unit[None, None], y, weight)
                suggestion = model.suggestion()
            y_std, best_std = stats.update(y, unit[None, None])
            dt = p.dtype
            inp = p.observation_input(unit.to(dt)[None, None], y_std.to(dt), best_std.to(dt), stats.best_x.to(dt))
            x, state = p.step(inp, state, None, suggestion, model.count)
    return (b[0] + x[0, 0].double() * (b[1] - b[0])).numpy()


def test_bad_input_is_refused_and_leaves_the_session_unchanged():
    p = proposer(dtype=torch.float32)
    with pytest.raises(ValueError, match="lower >= upper in dimension"):
        p.ask_tell([(0, 1), (2, 2)])
    with pytest.raises(ValueError, match="trained for 2"):
        p.ask_tell([(0, 1), (0, 1), (0, 1)])
    with pytest.raises(ValueError, match="finite"):
        p.ask_tell([(0, np.inf), (0, 1)])
    s, ref = p.ask_tell([(0, 1), (0, 1)]), p.ask_tell([(0, 1), (0, 1)])
    x, rx = s.ask(), ref.ask()
    for bad in (float("nan"), float("inf"), "abc"):
        with pytest.raises(ValueError, match="finite|real number"):
            s.tell(x, bad)
    with pytest.raises(ValueError, match="never asked"):
        s.tell(x + 0.5, 1.0)
    s.tell(x, 2.0)
    ref.tell(rx, 2.0)
    with pytest.raises(ValueError, match="already told"):
        s.tell(x, 2.0)
    np.testing.assert_array_equal(s.ask(), ref.ask())  # the refused calls changed nothing
    with pytest.raises(ValueError, match="no observation"):
        p.ask_tell([(0, 1), (0, 1)]).result()
    # documented alternative: a failed evaluation counts as the worst value seen
    w = p.ask_tell([(0, 1), (0, 1)], nonfinite="worst")
    x1 = w.ask()
    w.tell(x1, 3.0)
    x2 = w.ask()
    w.tell(x2, float("nan"))
    assert list(w.result().ys) == [3.0, 3.0]


# -- GP-EI baseline -------------------------------------------------------------------------------
def test_gp_posterior_and_likelihood_match_scikit_learn():
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    rng = np.random.default_rng(0)
    X, y, Xs = rng.uniform(size=(9, 2)), rng.normal(size=9), rng.uniform(size=(5, 2))
    ls, sv, noise = np.array([0.3, 0.7]), 1.7, 1e-3
    kernel = ConstantKernel(sv, "fixed") * RBF(ls, "fixed") + WhiteKernel(noise, "fixed")
    sk = GaussianProcessRegressor(kernel, alpha=1e-6 * sv, optimizer=None, normalize_y=False).fit(X, y)
    hp = GPHyperparameters(torch.tensor([ls]), torch.tensor([sv], dtype=torch.float64),
                           torch.tensor([noise], dtype=torch.float64))
    post = GPPosterior(torch.tensor(X[None]), torch.tensor(y[None]), hp)
    mean, var = post.predict(torch.tensor(Xs[None]))
    sk_mean, sk_std = sk.predict(Xs, return_std=True)
    np.testing.assert_allclose(mean[0].numpy(), sk_mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(var[0].numpy() + noise, sk_std**2, rtol=1e-5, atol=1e-9)  # sklearn adds the white noise
    lml = log_marginal_likelihood(torch.tensor(X[None]), torch.tensor(y[None]), hp)
    np.testing.assert_allclose(float(lml[0]), sk.log_marginal_likelihood_value_, rtol=1e-6)


def test_gp_ei_and_random_search_on_held_out_gp_functions():
    fam = GPFunctionFamily(2, (0.3, 0.5))
    ho = held_out_gp(fam, 4, "test-unit", 0)
    g = torch.Generator().manual_seed(0)
    hp = GPHyperparameters(ho.functions.lengthscales, torch.ones(4, dtype=torch.float64),
                           torch.full((4,), 1e-6, dtype=torch.float64))
    _, ys_ei, times = gp_ei(ho, 4, 2, 20, g, hyperparameters=hp, num_candidates=512, refine_steps=5)
    _, ys_fit, _ = gp_ei(ho, 4, 2, 20, g, num_candidates=512, refine_steps=5, fit_steps=10)
    _, ys_rs, _ = random_search(ho, 4, 2, 20, g)
    assert ys_ei.shape == (4, 20) and times.shape == (20,)
    r_ei = ho.normalized_regret(ys_ei.min(1).values)
    r_rs = ho.normalized_regret(ys_rs.min(1).values)
    r_fit = ho.normalized_regret(ys_fit.min(1).values)
    assert r_ei.median() < 0.02 and r_fit.median() < 0.05 and r_ei.median() < r_rs.median()


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp"])
def test_optuna_samplers_run_as_peers(sampler):
    xs, ys, times = optuna_minimize(lambda x: float(((x - 0.3) ** 2).sum()), 2, 8, sampler, seed=0)
    assert xs.shape == (8, 2) and ys.shape == (8,) and (times >= 0).all()
    assert np.allclose(ys, ((xs - 0.3) ** 2).sum(1))
    with pytest.raises(ValueError, match="sampler"):
        optuna_minimize(lambda x: 0.0, 2, 1, "smac")


# -- training, checkpoints ------------------------------------------------------------------------
def test_episode_family_validation_and_errors():
    fam = GPProposerEpisodes(dim=2, horizon=5, val_functions=8)
    p = proposer(dtype=torch.float32)
    score = fam.validation_score(p)
    assert 0.0 <= score < 2.0 and fam.validation_score(p) == score
    with pytest.raises(ValueError, match="dimension"):
        fam.meta_loss(proposer(dim=3), 2, torch.Generator())
    with pytest.raises(ValueError, match="loss"):
        GPProposerEpisodes(loss="regret")
    with pytest.raises(ValueError, match="lazy"):
        GPProposerEpisodes(loss="ei", sampler="rff")
    with pytest.raises(ValueError, match="bowl_fraction"):
        GPProposerEpisodes(bowl_fraction=1.5)
    with pytest.raises(ValueError, match="bowls"):
        GPProposerEpisodes(loss="ei", bowl_fraction=0.5)


def test_bowl_episodes_add_the_drawn_bowl_to_the_gp_sample():
    """With bowls, each training function is the same GP sample plus a ‖x − c‖² (a = 0 for the
    episodes without one), drawn from the generator after the GP sample. (RFF functions are
    fixed; the lazy sampler draws values at query time, so there the stream differs.)"""
    sampler = "rff"
    seen = {}

    class Recorder(torch.nn.Module):  # a stand-in proposer: fixed queries, records the observations
        dim = 2

        def rollout(self, objective, n, budget, generator=None):
            xs = torch.rand(n, budget, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            ys = torch.cat([objective(xs[:, t: t + 1]) for t in range(budget)], 1)
            seen.setdefault("runs", []).append((xs, ys))
            return xs, ys

    plain = GPProposerEpisodes(dim=2, horizon=4, sampler=sampler, lengthscale_range=(0.3, 0.5))
    bowled = GPProposerEpisodes(dim=2, horizon=4, sampler=sampler, lengthscale_range=(0.3, 0.5),
                                bowl_fraction=0.5, bowl_curvature=(3.0, 6.0))
    plain.meta_loss(Recorder(), 64, torch.Generator().manual_seed(1))
    bowled.meta_loss(Recorder(), 64, torch.Generator().manual_seed(1))
    (xs, y_plain), (_, y_bowl) = seen["runs"]
    generator = torch.Generator().manual_seed(1)  # replay: the GP sample's draws, then the bowls'
    bowled.gp.rff(64, generator)
    a, c, m = bowled.bowls(64, generator, torch.float64)
    assert m is None  # round bowls
    assert ((a == 0) | ((a >= 3.0) & (a <= 6.0))).all() and 10 < int((a > 0).sum()) < 54
    assert ((c >= 0.15) & (c <= 0.85)).all()
    expected = y_plain + a[:, None] * (xs - c[:, None, :]).pow(2).sum(-1)
    torch.testing.assert_close(y_bowl, expected)
    # elongated bowls: a (x − c)ᵀ M (x − c) with M symmetric, eigenvalues in [0.02, 1], the largest 1
    long = GPProposerEpisodes(dim=3, horizon=4, bowl_fraction=1.0, bowl_shape="elongated")
    a, c, m = long.bowls(16, torch.Generator().manual_seed(2), torch.float64)
    eig = torch.linalg.eigvalsh(m)
    torch.testing.assert_close(m, m.transpose(1, 2))
    assert (eig > 0.0199).all() and torch.allclose(eig[:, -1], torch.ones(16, dtype=torch.float64))
    z = torch.rand(16, 5, 3, dtype=torch.float64)
    direct = torch.stack([torch.stack([a[n] * (z[n, q] - c[n]) @ m[n] @ (z[n, q] - c[n]) for q in range(5)])
                          for n in range(16)])
    torch.testing.assert_close(_bowl(z, a, c, m), direct)
    torch.testing.assert_close(_bowl(z[:, 0], a, c, m), direct[:, 0])
    with pytest.raises(ValueError, match="bowl_shape"):
        GPProposerEpisodes(bowl_shape="square")
    lazy = GPProposerEpisodes(dim=2, horizon=4, sampler="lazy", lengthscale_range=(0.3, 0.5), bowl_fraction=1.0)
    loss, _ = lazy.meta_loss(Recorder(), 64, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and seen["runs"][-1][1].mean() > y_plain.mean() + 0.5  # every episode has a bowl


def test_warped_episodes_observe_a_monotone_warp_and_score_the_function():
    """With warps the proposer observes (exp(k f) − 1) / k of the same function (k = 0: f itself),
    drawn after the GP sample and the bowls, and the meta-loss scores f, not what was observed."""
    seen = []

    class Recorder(torch.nn.Module):
        dim = 2

        def rollout(self, objective, n, budget, generator=None):
            xs = torch.rand(n, budget, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            ys = torch.cat([objective(xs[:, t: t + 1]) for t in range(budget)], 1)
            seen.append(ys)
            return xs, ys

    kw = dict(dim=2, horizon=6, sampler="rff", lengthscale_range=(0.3, 0.5), bowl_fraction=0.5)
    plain, warped = GPProposerEpisodes(**kw), GPProposerEpisodes(**kw, warp_fraction=0.5, warp_strength=2.0)
    loss_plain, _ = plain.meta_loss(Recorder(), 64, torch.Generator().manual_seed(1))
    loss_warped, _ = warped.meta_loss(Recorder(), 64, torch.Generator().manual_seed(1))
    f, observed = seen
    generator = torch.Generator().manual_seed(1)  # replay: GP sample, bowls, then the warps
    warped.gp.rff(64, generator)
    warped.bowls(64, generator, torch.float64)
    k = warped.warps(64, generator, torch.float64)
    assert ((k == 0) | (k.abs() <= 2.0)).all() and 10 < int((k != 0).sum()) < 54
    kk = k[:, None].expand_as(f)
    expected = torch.where(kk == 0, f, torch.expm1(kk * f) / torch.where(kk == 0, 1.0, kk))
    torch.testing.assert_close(observed, expected)
    assert not torch.allclose(observed, f)
    # increasing in f: the order of the observations (so the minimiser) is unchanged
    assert torch.equal(observed.argsort(1), f.argsort(1))
    torch.testing.assert_close(loss_warped, loss_plain)  # L_OI of f itself
    for bad in (dict(warp_fraction=1.5), dict(warp_strength=0.0)):
        with pytest.raises(ValueError, match="warp"):
            GPProposerEpisodes(**bad)


def test_normalised_and_log_losses_score_the_benchmarks_regret():
    """``loss_scale="normalized"`` makes L_OI the mean of the benchmark's normalised regret,
    (best − min) / (median − min) of each training function (bowl included, warp not), checked
    against a dense grid of the replayed functions; ``"log"`` is the mean of log(regret + eps);
    both reach the queries through the best observation, and "raw" is unchanged."""
    class Fixed(torch.nn.Module):
        dim = 2

        def __init__(self):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def rollout(self, objective, n, budget, generator=None):
            xs = torch.rand(n, budget, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            xs = (xs + self.shift).clamp(0, 1)
            return xs, torch.cat([objective(xs[:, t: t + 1]) for t in range(budget)], 1)

    kw = dict(dim=2, horizon=8, sampler="rff", lengthscale_range=(0.3, 0.5), bowl_fraction=0.5,
              warp_fraction=0.5, warp_strength=2.0)
    losses, best_final = {}, {}
    for scale in ("raw", "normalized", "log"):
        model = Fixed()
        losses[scale], metrics = GPProposerEpisodes(**kw, loss_scale=scale, log_eps=1e-3).meta_loss(
            model, 32, torch.Generator().manual_seed(3))
        best_final[scale] = metrics["best_final"]  # logged in the functions' own units whatever the loss
        losses[scale].backward()
        assert model.shift.grad is not None and model.shift.grad != 0
    fam = GPProposerEpisodes(**kw)
    generator = torch.Generator().manual_seed(3)  # replay the functions and the bowls
    functions = fam.gp.rff(32, generator)
    a, c, _ = fam.bowls(32, generator, torch.float64)
    g = torch.linspace(0, 1, 151, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(1, -1, 2).expand(32, -1, -1)
    values = functions(grid) + a[:, None] * (grid - c[:, None]).pow(2).sum(-1)
    minimum, median = values.min(1).values, values.median(1).values
    xs = torch.rand(32, 8, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    best = (functions(xs) + a[:, None] * (xs - c[:, None]).pow(2).sum(-1)).min(1).values
    torch.testing.assert_close(losses["raw"], best.mean())
    assert best_final["raw"] == best_final["normalized"] == best_final["log"] == pytest.approx(float(best.mean()))
    regret = (best - minimum) / (median - minimum)
    assert 0.02 < float(regret.mean()) < 0.6
    # the training-time estimates (1,024 uniform points, then Adam) against the 151² grid
    torch.testing.assert_close(losses["normalized"], regret.mean(), atol=0.005, rtol=0.01)
    torch.testing.assert_close(losses["log"], torch.log(regret.clamp_min(0) + 1e-3).mean(), atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="loss_scale"):
        GPProposerEpisodes(loss_scale="relative")
    with pytest.raises(ValueError, match="sampler='rff'"):
        GPProposerEpisodes(loss_scale="normalized", sampler="lazy")
    with pytest.raises(ValueError, match="log"):
        GPProposerEpisodes(loss_scale="log", loss="sum", sampler="rff")


def test_meta_train_config_exports_a_loadable_proposer(in_tmp):
    from learnopt.train.cli import meta_train

    out = Path("runs/p.pt")
    meta_train([
        "--config", str(ROOT / "configs/rnn_proposer_d2.yaml"), "--trainer.max_steps=4",
        "--trainer.val_check_interval=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.default_root_dir=runs", "--model.estimator.num_episodes=4",
        "--model.task_family.init_args.horizon=5",
        "--model.task_family.init_args.val_functions=8",
        '--trainer.callbacks=[{"class_path": "learnopt.train.callbacks.ExportLearnedOptimizer", '
        f'"init_args": {{"path": "{out}"}}}}]',
    ])
    p = learnopt.load(out)
    assert isinstance(p, RNNProposer) and p.dim == 2
    meta = p.checkpoint_metadata
    assert "val/median_regret" in meta["validation"]
    assert meta["estimator"]["class_path"] == "learnopt.meta.episodic.EpisodicBPTT"
    assert meta["task_family"]["class_path"] == "tasks.blackbox_episodes.GPProposerEpisodes"
    res = p.minimize(branin_fun, [(-5, 10), (0, 15)], budget=5)
    assert res.nfev == 5
    # a budget below the training horizon (5) is run, with a warning that names both
    with pytest.warns(UserWarning, match="meta-trained for 5 evaluations and is given 3"):
        short = p.minimize(branin_fun, [(-5, 10), (0, 15)], budget=3)
    np.testing.assert_allclose(short.ys, res.ys[:3])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at or beyond the horizon, and for a proposer not loaded: no warning
        p.minimize(branin_fun, [(-5, 10), (0, 15)], budget=7)
        proposer(dtype=torch.float32).minimize(branin_fun, [(-5, 10), (0, 15)], budget=2)


def test_parallel_proposer_session_hands_out_a_step_per_q_asks():
    p = proposer(q=2, dtype=torch.float32)
    s = p.ask_tell([(0, 1), (0, 1)])
    a, b = s.ask(), s.ask()
    with torch.no_grad():
        first, _ = p.step(p.start_input(1), p.initial_state(1))
    np.testing.assert_allclose(np.stack([a, b]), first[0].double().numpy(), rtol=1e-6)
    assert len(s._groups) == 1
    s.tell(b, 1.0)
    s.tell(a, 0.5)
    c = s.ask()
    assert len(s._groups) == 2 and c.shape == (2,)


def test_exploring_proposer_is_reproducible_and_contains_random_search():
    torch.manual_seed(0)
    p = RNNProposer(dim=2, hidden_size=16, explore=True)
    branin = BENCHMARKS["branin"]
    res = p.minimize(branin_fun, [(-5, 10), (0, 15)], budget=8, seed=3)
    # the seed also draws the session's symmetry of the box: the rollout sees f through it
    s = p.ask_tell([(-5, 10), (0, 15)], seed=3)

    def through_symmetry(u):
        return branin(torch.as_tensor(s.to_box(u.double().numpy())[1]))

    with torch.no_grad():
        xs, _ = p.rollout(through_symmetry, 1, 8, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(res.xs, s.to_box(xs[0].double().numpy())[1], rtol=1e-6, atol=1e-5)  # (float32)
    other = p.minimize(branin_fun, [(-5, 10), (0, 15)], budget=8, seed=4)
    assert not np.allclose(other.xs, res.xs)
    # gate fully open: the queries are exactly the uniform draws, i.e. random search
    with torch.no_grad():
        p.gate.bias.fill_(1e4)
        xs, _ = p.rollout(lambda u: u.sum(-1), 5, 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    expected = torch.cat([torch.rand((5, 1, 2), generator=g) for _ in range(4)], 1)
    torch.testing.assert_close(xs, expected)
    with pytest.raises(ValueError, match="noise"):
        p.step(p.start_input(1), p.initial_state(1))


@pytest.mark.parametrize("dim, name, config_name", [
    (2, "rnn_proposer_d2", "rnn_proposer_d2"),
    (3, "rnn_proposer_d3", "rnn_proposer_d3_finetune"),  # stage 2, from stage 1 below
    (3, "rnn_proposer_d3_stage1", "rnn_proposer_d3"),
    (6, "rnn_proposer_d6", "rnn_proposer_d6_finetune"),  # stage 2, from stage 1 below
    (6, "rnn_proposer_d6_stage1", "rnn_proposer_d6"),
])
def test_committed_proposers_load_and_beat_random_search(dim, name, config_name):
    path = ROOT / f"checkpoints/{name}.pt"
    p = learnopt.load(path)
    assert isinstance(p, RNNProposer) and p.dim == dim
    meta = p.checkpoint_metadata
    family = meta["config"]["model"]["task_family"]["init_args"]
    # the checkpoint was trained by its committed config
    import yaml

    config = yaml.safe_load((ROOT / f"configs/{config_name}.yaml").read_text())
    init_args = config["model"]["task_family"]["init_args"]
    assert init_args == {k: family[k] for k in init_args}
    assert config["model"]["learned_optimizer"]["init_args"] == p.config()
    for key in ("meta_lr", "seed"):
        assert config["model"][key] == meta["meta_training"][key]
    # checkpoints exported before estimators were objects hold num_tasks flat in meta_training
    trained = meta["meta_training"].get("num_tasks") or meta["estimator"]["init_args"]["num_episodes"]
    assert config["model"]["estimator"]["init_args"]["num_episodes"] == trained
    if "init_from" in config["model"]:  # a later stage: it starts from a committed checkpoint
        start = learnopt.load(ROOT / config["model"]["init_from"])
        assert meta["meta_training"]["init_from"] is not None
        if start.config() != p.config():  # a grown proposer (trend or local turned on)
            assert set(p.weights_from(start)) == set(p.state_dict())
    horizon = family["horizon"]
    ho = held_out_gp(GPFunctionFamily(dim, tuple(family["lengthscale_range"])), 64, "test-unit", 1)
    with torch.no_grad():
        _, ys = p.rollout(ho, 64, horizon)
    _, ys_rs, _ = random_search(ho, 64, dim, horizon, torch.Generator().manual_seed(0))
    assert ho.normalized_regret(ys.min(1).values).median() < ho.normalized_regret(ys_rs.min(1).values).median()


def test_benchmark_median_interval_is_the_order_statistic_interval_and_covers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_blackbox", ROOT / "scripts" / "benchmark_blackbox.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = np.arange(64.0)[::-1]  # order statistics 24 and 41 of 64 (1-based): coverage 0.966
    assert bench.median_interval(x) == (23.0, 40.0)
    assert bench.median_interval(np.full(9, 2.5)) == (2.5, 2.5)
    assert bench.median_interval(np.arange(4.0)) == (0.0, 3.0)  # too few for 95%: the whole range
    rng = np.random.default_rng(0)
    intervals = [bench.median_interval(rng.exponential(size=64)) for _ in range(2000)]
    hits = [lo <= math.log(2) <= hi for lo, hi in intervals]
    assert 0.95 <= np.mean(hits) <= 0.98  # exact coverage 0.966 (median of Exp(1) is ln 2)
