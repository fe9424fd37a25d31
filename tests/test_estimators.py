"""Tests of the meta-gradient estimators of ``learnopt.meta``: FullBPTT, ES, PES, truncation
schedules, resuming, and their integration in the Lightning shell.

Float64, tiny learned optimizers (a 1-layer coordinate-wise LSTM with 2 units, a learned
SGD/Adam learning rate) on 3-d quadratics with horizons of 6–8 steps. References: the exact
gradient of full BPTT with second derivatives (what ES and PES estimate: they see the true
loss), checked against statistical bounds computed from the spread of independent estimates;
antithetic differences written out by hand with perturbed copies of the module; scipy's
geometric distribution.
"""

from __future__ import annotations

import copy
import math

import pytest
import scipy.stats
import torch

from learnopt.learned import CoordinatewiseLSTM, LearnedHyperparameters
from learnopt.meta import (
    ES,
    PES,
    ConstantSchedule,
    FullBPTT,
    GeometricSchedule,
    GradientEstimate,
    GradientEstimator,
    TruncatedBPTT,
    UniformSchedule,
    run_truncation,
    truncation_length,
)
from learnopt.meta.truncated_bptt import checkpointed_inner_step
from learnopt.meta.unroll import inner_step
from learnopt.task import seeded_generator
from tasks.quadratic import QuadraticFamily

DT = torch.float64
SIGMA = 1e-3  # small: the Gaussian smoothing changes the gradient by O(σ²) on these smooth problems


def _family():
    # init_scale 1: θ₀ far from the optimum, so the meta-gradient is large and informative
    return QuadraticFamily(3, dtype=DT, init_scale=1.0)


def _lstm(seed=0, output_scale=0.1):
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(hidden_size=2, num_layers=1, output_scale=output_scale).double()


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def _weights(lopt):
    return {n: p.detach().clone() for n, p in lopt.named_parameters()}


def _full_gradient(lopt, horizon, seed=1, num_tasks=4):
    """The exact gradient of the whole-horizon meta-loss (1/T) Σ_t f(θ_t), second order."""
    est = FullBPTT(_family(), num_tasks=num_tasks, horizon=horizon, second_order=True, seed=seed)
    return est.estimate(lopt, est.init_unroll(lopt))


def _episode_mean(est, lopt, truncations):
    """Mean of the estimates over the truncations of one episode (fixed meta-parameters)."""
    state, total = est.init_unroll(lopt), 0
    for _ in range(truncations):
        res = est.estimate(lopt, state)
        assert res.finite
        state, total = res.unroll_state, total + _flat(res.meta_grads)
    assert state.step == est.horizon
    return total / truncations


def _agrees_within_noise(samples: torch.Tensor, truth: torch.Tensor, max_z: float, norm_ratio: float):
    """``samples``: [R, d] independent unbiased estimates. Per coordinate, |mean − truth| within
    ``max_z`` standard errors (a t statistic with R − 1 degrees of freedom; the bound allows for
    the d coordinates tested); overall, ||mean − truth||² within ``norm_ratio``² times its
    expectation Σ SE² (a chi-square over d degrees of freedom divided by d stays near 1)."""
    r = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(r)
    z = ((mean - truth) / se).abs()
    assert z.max() < max_z, (z.max().item(), mean, truth)
    assert (mean - truth).norm() < norm_ratio * se.norm(), ((mean - truth).norm(), se.norm())
    return mean, se


# --------------------------------------------------------------------------- the interface


@pytest.mark.parametrize("make", [
    lambda: TruncatedBPTT(_family(), num_tasks=2, unroll_length=3, horizon=6),
    lambda: FullBPTT(_family(), num_tasks=2, horizon=6),
    lambda: ES(_family(), num_tasks=2, unroll_length=3, horizon=6, num_pairs=2),
    lambda: PES(_family(), num_tasks=2, unroll_length=3, horizon=6, num_pairs=2),
], ids=["truncated_bptt", "full_bptt", "es", "pes"])
def test_every_estimator_returns_the_same_record(make):
    est = make()
    assert isinstance(est, GradientEstimator)
    lopt = _lstm()
    before = _weights(lopt)
    res = est.estimate(lopt, est.init_unroll(lopt))
    assert isinstance(res, GradientEstimate) and res.finite
    assert res.meta_loss.ndim == 0 and not res.meta_loss.requires_grad
    assert set(res.meta_grads) == set(before)
    for n, g in res.meta_grads.items():
        assert g.shape == before[n].shape and g.dtype == DT and not g.requires_grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
    assert res.metrics["nonfinite"] == 0.0 and "inner_loss_last" in res.metrics
    assert res.unroll_state.step == (6 if isinstance(est, FullBPTT) else 3)
    # the module is untouched (ES/PES use functional_call, nothing sets .grad)
    for n, p in lopt.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


# --------------------------------------------------------------------------- (a) full BPTT


@pytest.mark.parametrize("second_order,transform", [(False, "identity"), (True, "log")])
def test_truncated_bptt_over_the_whole_horizon_equals_full_bptt(second_order, transform):
    lopt = _lstm(seed=3)
    full = FullBPTT(_family(), num_tasks=3, horizon=7, second_order=second_order, loss_transform=transform, seed=4)
    trunc = TruncatedBPTT(_family(), num_tasks=3, unroll_length=7, horizon=7, second_order=second_order,
                          loss_transform=transform, seed=4)
    s_full, s_trunc = full.init_unroll(lopt), trunc.init_unroll(lopt)
    for _ in range(2):  # each call is one whole episode; the second starts episode 1
        a, b = full.estimate(lopt, s_full), trunc.estimate(lopt, s_trunc)
        assert torch.equal(a.meta_loss, b.meta_loss)
        for n in a.meta_grads:
            assert torch.equal(a.meta_grads[n], b.meta_grads[n]), n
        assert torch.equal(a.unroll_state.params["theta"], b.unroll_state.params["theta"])
        s_full, s_trunc = a.unroll_state, b.unroll_state
    assert s_full.episode == 1 and s_full.step == 7
    # ...and differs from truncating the same horizon (the carried state is cut at step 3)
    short = TruncatedBPTT(_family(), num_tasks=3, unroll_length=3, horizon=7, second_order=second_order,
                          loss_transform=transform, seed=4)
    c = short.estimate(lopt, short.init_unroll(lopt))
    assert not torch.allclose(_flat(c.meta_grads), _flat(a.meta_grads), rtol=0.1)


# --------------------------------------------------------------------------- ES: exact pieces


def _noise_stream(est, episode=0):
    """The perturbation directions z the estimator draws, in its documented order (pair by pair,
    parameters in ``named_parameters`` order), from its seed stream."""
    g = seeded_generator(est.split, est.seed, "noise", est.noise_seed, episode)

    def draw(lopt):
        return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in lopt.named_parameters()}

    return draw


def _shifted_copy(lopt, shift: dict[str, torch.Tensor]):
    """An independent module with weights φ + shift (set in place on a deep copy)."""
    other = copy.deepcopy(lopt)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.add_(shift[n])
    return other


def test_es_estimate_is_the_antithetic_formula_written_out():
    """ĝ = (1/N) Σ_i z_i (L(φ + σz_i) − L(φ − σz_i)) / (2σ), with L evaluated by truncated BPTT's
    own forward pass on perturbed copies of the module; the carried state is the unperturbed run."""
    sigma, pairs = 0.05, 3
    lopt = _lstm(seed=5)
    es = ES(_family(), num_tasks=3, unroll_length=3, horizon=6, seed=6, sigma=sigma, num_pairs=pairs)
    ref = TruncatedBPTT(_family(), num_tasks=3, unroll_length=3, horizon=6, seed=6)
    state = es.init_unroll(lopt)
    res = es.estimate(lopt, state)

    draw, expected = _noise_stream(es), 0
    for _ in range(pairs):
        z = draw(lopt)
        plus = ref.unroll(_shifted_copy(lopt, {n: sigma * v for n, v in z.items()}), state)[0].item()
        minus = ref.unroll(_shifted_copy(lopt, {n: -sigma * v for n, v in z.items()}), state)[0].item()
        expected = expected + _flat(z) * (plus - minus) / (2 * sigma) / pairs
    torch.testing.assert_close(_flat(res.meta_grads), expected, rtol=1e-10, atol=1e-13)

    # meta-loss and carried state: those of truncated BPTT with the unperturbed weights
    tb = ref.estimate(lopt, ref.init_unroll(lopt))
    assert res.meta_loss.item() == pytest.approx(tb.meta_loss.item(), rel=1e-12)
    torch.testing.assert_close(res.unroll_state.params["theta"], tb.unroll_state.params["theta"], rtol=1e-12, atol=0)
    torch.testing.assert_close(res.unroll_state.opt_state.h, tb.unroll_state.opt_state.h, rtol=1e-12, atol=0)
    assert res.unroll_state.step == 3 and res.unroll_state.episode == 0
    # the estimate is a function of the state: the same state gives the same estimate
    again = es.estimate(lopt, state)
    assert torch.equal(_flat(again.meta_grads), _flat(res.meta_grads))


@pytest.mark.parametrize("transform", ["identity", "log"])
def test_truncated_bptt_and_es_run_the_same_truncation(transform):
    """One core (``run_truncation``): truncated BPTT's meta-loss, losses and carried state equal,
    bit for bit, those of ES's reference run on the same state, over schedule-drawn truncations
    and an episode boundary; keeping the graph or checkpointing the steps changes no value."""
    lopt = _lstm(seed=3)
    kwargs = dict(num_tasks=3, unroll_length=3, horizon=7, seed=11, loss_transform=transform,
                  schedule=UniformSchedule(1, 4))
    tb, es = TruncatedBPTT(_family(), **kwargs), ES(_family(), num_pairs=1, **kwargs)
    s_tb, s_es = tb.init_unroll(lopt), es.init_unroll(lopt)
    for _ in range(4):
        a, b = tb.estimate(lopt, s_tb), es.estimate(lopt, s_es)
        assert torch.equal(a.meta_loss, b.meta_loss)
        for key in ("inner_step", "inner_loss_first", "inner_loss_last"):
            assert a.metrics[key] == b.metrics[key]
        s_tb, s_es = a.unroll_state, b.unroll_state
        assert torch.equal(s_tb.params["theta"], s_es.params["theta"])
        assert torch.equal(s_tb.opt_state.h, s_es.opt_state.h) and s_tb.episode == s_es.episode
    state = tb.init_unroll(lopt)
    runs = [run_truncation(step, lopt, state.task, state.params, state.opt_state, copy.deepcopy(state.generator), 3,
                           tb._transform, keep_graph=keep)
            for step, keep in ((inner_step, False), (inner_step, True), (checkpointed_inner_step, True))]
    for run in runs[1:]:
        assert torch.equal(run.meta_loss, runs[0].meta_loss) and torch.equal(run.last_loss, runs[0].last_loss)
        assert torch.equal(run.params["theta"], runs[0].params["theta"])
    assert not runs[0].meta_loss.requires_grad and runs[1].meta_loss.requires_grad


def test_estimators_are_objects_bound_to_their_task_family():
    """Built from settings alone and bound later (what MetaTrainModule does) is the same estimator
    as one given the family; the run's seed applies unless the estimator has its own."""
    lopt = _lstm(seed=2)
    unbound = PES(num_tasks=2, unroll_length=2, horizon=4, num_pairs=2, sigma=0.05)
    with pytest.raises(ValueError, match="bind"):
        unbound.init_unroll(lopt)
    fam = _family()
    bound = unbound.bind(fam, seed=3)
    direct = PES(fam, num_tasks=2, unroll_length=2, horizon=4, num_pairs=2, sigma=0.05, seed=3)
    a, b = bound.estimate(lopt), direct.estimate(lopt)
    assert torch.equal(a.meta_loss, b.meta_loss) and torch.equal(_flat(a.meta_grads), _flat(b.meta_grads))
    assert TruncatedBPTT(seed=5).bind(fam, seed=3).seed == 5
    with pytest.raises(ValueError, match="another task family"):
        direct.bind(_family())
    spec = direct.spec()
    assert spec["class_path"] == "learnopt.meta.pes.PES" and "task_family" not in spec["init_args"]
    assert spec["init_args"]["schedule"] == {"class_path": "learnopt.meta.schedules.ConstantSchedule",
                                             "init_args": {"length": 2}}
    assert spec["init_args"]["num_pairs"] == 2 and spec["init_args"]["seed"] == 3


def test_pes_accumulates_perturbations_and_keeps_each_particle_on_its_own_run():
    """Two truncations written out: particle i^± runs with φ ± ε_{1,i}, then continues from its
    own state with φ ± ε_{2,i}; the second estimate weights (L^+ − L^−) by ξ = ε_1 + ε_2."""
    sigma, pairs = 0.05, 2
    lopt = _lstm(seed=7)
    pes = PES(_family(), num_tasks=3, unroll_length=2, horizon=4, seed=8, sigma=sigma, num_pairs=pairs)
    es = ES(_family(), num_tasks=3, unroll_length=2, horizon=4, seed=8, sigma=sigma, num_pairs=pairs)
    ref = TruncatedBPTT(_family(), num_tasks=3, unroll_length=2, horizon=4, seed=8)
    s0 = pes.init_unroll(lopt)
    r1 = pes.estimate(lopt, s0)
    # first truncation of an episode: ξ = ε, so PES is ES
    assert torch.equal(_flat(r1.meta_grads), _flat(es.estimate(lopt, es.init_unroll(lopt)).meta_grads))
    r2 = pes.estimate(lopt, r1.unroll_state)

    draw = _noise_stream(pes)
    eps1 = [{n: sigma * v for n, v in draw(lopt).items()} for _ in range(pairs)]
    eps2 = [{n: sigma * v for n, v in draw(lopt).items()} for _ in range(pairs)]
    expected = 0
    for i in range(pairs):
        diff = []
        for sign in (1.0, -1.0):
            state = ref.init_unroll(lopt)
            _, state, _ = ref.unroll(_shifted_copy(lopt, {n: sign * v for n, v in eps1[i].items()}), state)
            loss, state, _ = ref.unroll(_shifted_copy(lopt, {n: sign * v for n, v in eps2[i].items()}), state)
            diff.append(loss.item())
            particle = r2.unroll_state.particles[2 * i + (0 if sign > 0 else 1)]
            torch.testing.assert_close(particle[0]["theta"], state.params["theta"], rtol=1e-12, atol=0)
        xi = {n: eps1[i][n] + eps2[i][n] for n in eps1[i]}
        torch.testing.assert_close(_flat(r2.unroll_state.accum[i]), _flat(xi), rtol=1e-14, atol=0)
        expected = expected + _flat(xi) * (diff[0] - diff[1]) / (2 * sigma**2 * pairs)
    torch.testing.assert_close(_flat(r2.meta_grads), expected, rtol=1e-9, atol=1e-12)
    # the reference run is truncated BPTT's carried state
    tb = ref.init_unroll(lopt)
    for _ in range(2):
        tb = ref.estimate(lopt, tb).unroll_state
    torch.testing.assert_close(r2.unroll_state.params["theta"], tb.params["theta"], rtol=1e-12, atol=0)

    # at the horizon every particle restarts and ξ is reset
    r3 = pes.estimate(lopt, r2.unroll_state)
    s3 = r3.unroll_state
    assert s3.episode == 1 and s3.step == 2
    r_fresh = pes.estimate(lopt, pes.init_unroll(lopt, 1))
    assert torch.equal(_flat(r3.meta_grads), _flat(r_fresh.meta_grads))
    for a, b in zip(s3.accum, r_fresh.unroll_state.accum):
        assert torch.equal(_flat(a), _flat(b))


# --------------------------------------------------------------------------- (b) ES is unbiased


@pytest.mark.parametrize("make_lopt,repeats,pairs", [
    (lambda: _lstm(seed=0), 16, 64),
    (lambda: LearnedHyperparameters("adam", {"lr": 0.05, "betas": (0.8, 0.95)}, learn=["lr", "betas"]).double(),
     16, 32),
], ids=["lstm", "adam_lr_betas"])
def test_es_agrees_with_full_bptt_in_expectation(make_lopt, repeats, pairs):
    """One truncation over the whole horizon (T = 6): independent ES estimates (noise seeds
    0 … R − 1) average to the exact second-order full-BPTT gradient within their standard
    error. The problem is smooth and σ small, so the smoothing bias O(σ²) is negligible."""
    lopt, horizon = make_lopt(), 6
    truth = _flat(_full_gradient(lopt, horizon).meta_grads)
    samples = torch.stack([
        _flat(ES(_family(), num_tasks=4, unroll_length=horizon, horizon=horizon, seed=1, sigma=SIGMA,
                 num_pairs=pairs, noise_seed=r).estimate(lopt).meta_grads)
        for r in range(repeats)
    ])
    # up to 43 coordinates: P(|t_15| > 5.5) ≈ 6e-5 each
    mean, se = _agrees_within_noise(samples, truth, max_z=5.5, norm_ratio=1.6)
    assert torch.nn.functional.cosine_similarity(mean, truth, 0) > 0.95
    assert se.norm() < 0.3 * truth.norm()  # the test has power: the noise is well below the signal


# --------------------------------------------------------------------------- (c) PES is unbiased over truncations


def test_pes_is_unbiased_for_the_whole_horizon_where_truncated_bptt_is_not():
    """A learned SGD rate (log lr) on quadratics, T = 8 in 4 truncations of 2 steps, lr = 0.085
    just above the best rate for the whole horizon: the whole-horizon gradient says *lower* the
    rate, while truncated BPTT, blind to what each step does to the later truncations, says
    *raise* it (short horizons prefer greedy, too-large steps). The mean PES estimate over an
    episode matches the whole-horizon gradient, the gradient of (1/4) Σ_j L_j =
    (1/T) Σ_t f(θ_t); truncated BPTT is off by many standard errors, with the wrong sign."""
    lopt = LearnedHyperparameters("sgd", {"lr": 0.085}).double()
    horizon, k = 8, 2
    truth = _flat(_full_gradient(lopt, horizon).meta_grads)
    tbptt = _episode_mean(TruncatedBPTT(_family(), num_tasks=4, unroll_length=k, horizon=horizon,
                                        second_order=True, seed=1), lopt, horizon // k)
    samples = torch.stack([
        _episode_mean(PES(_family(), num_tasks=4, unroll_length=k, horizon=horizon, seed=1, sigma=SIGMA,
                          num_pairs=25, noise_seed=r), lopt, horizon // k)
        for r in range(20)
    ])
    mean, se = _agrees_within_noise(samples, truth, max_z=4.5, norm_ratio=4.5)
    assert truth.item() > 0 and mean.item() > 0 and tbptt.item() < 0
    assert (tbptt - truth).abs().item() > 10 * se.item()


def test_pes_on_an_lstm_matches_full_bptt_and_truncated_bptt_does_not():
    """The same with a coordinate-wise LSTM (43 weights), T = 6 in 3 truncations."""
    lopt, horizon, k, repeats = _lstm(seed=0), 6, 2, 16
    truth = _flat(_full_gradient(lopt, horizon).meta_grads)
    tbptt = _episode_mean(TruncatedBPTT(_family(), num_tasks=4, unroll_length=k, horizon=horizon,
                                        second_order=True, seed=1), lopt, horizon // k)
    samples = torch.stack([
        _episode_mean(PES(_family(), num_tasks=4, unroll_length=k, horizon=horizon, seed=1, sigma=SIGMA,
                          num_pairs=64, noise_seed=r), lopt, horizon // k)
        for r in range(repeats)
    ])
    mean, se = _agrees_within_noise(samples, truth, max_z=5.5, norm_ratio=1.6)
    assert torch.nn.functional.cosine_similarity(mean, truth, 0) > 0.95
    # truncated BPTT's error is systematic and far outside PES's noise
    assert ((tbptt - truth) / se).abs().max() > 8 and (tbptt - truth).norm() > 2.5 * se.norm()
    assert (tbptt - truth).norm() > 0.3 * truth.norm()


# --------------------------------------------------------------------------- (d) schedules


def _draws(schedule, n=4000):
    return torch.tensor([schedule.sample(seeded_generator("t", 0, i)) for i in range(n)])


def test_uniform_schedule_covers_its_bounds_uniformly():
    x = _draws(UniformSchedule(2, 5))
    assert x.min() == 2 and x.max() == 5
    counts = torch.bincount(x, minlength=6)[2:].double()
    chi2 = ((counts - len(x) / 4) ** 2 / (len(x) / 4)).sum().item()
    assert scipy.stats.chi2.sf(chi2, 3) > 1e-3


@pytest.mark.parametrize("mean,low", [(4.0, 1), (6.0, 3), (2.0, 2)])
def test_geometric_schedule_has_the_geometric_distribution(mean, low):
    x = _draws(GeometricSchedule(mean, low))
    assert x.min() >= low
    p = 1 / (mean - low + 1)
    ref = scipy.stats.geom(p, loc=low - 1)  # support low, low + 1, ...; mean low − 1 + 1/p = mean
    assert ref.mean() == pytest.approx(mean)
    if p == 1:
        assert (x == low).all()
        return
    assert abs(x.double().mean().item() - mean) < 4 * ref.std() / math.sqrt(len(x))
    # chi-square goodness of fit over the values with enough expected counts, plus a tail bin
    top = int(ref.ppf(0.97))
    observed = [int((x == v).sum()) for v in range(low, top + 1)] + [int((x > top).sum())]
    expected = [len(x) * ref.pmf(v) for v in range(low, top + 1)] + [len(x) * ref.sf(top)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert scipy.stats.chi2.sf(chi2, len(observed) - 1) > 1e-3


def test_geometric_schedule_upper_bound_and_invalid_schedules():
    assert _draws(GeometricSchedule(5.0, 1, high=6)).max() == 6
    for bad in (lambda: ConstantSchedule(0), lambda: UniformSchedule(3, 2), lambda: UniformSchedule(0, 2),
                lambda: GeometricSchedule(1.0, 2), lambda: GeometricSchedule(3.0, 2, 1)):
        with pytest.raises(ValueError):
            bad()


def test_truncation_length_is_clipped_to_the_horizon_and_reproducible():
    sched = UniformSchedule(3, 9)
    for step in range(10):
        k = truncation_length(sched, step, 10, "train", 0, 0)
        assert 1 <= k <= 10 - step and (k >= 3 or k == 10 - step)
        assert k == truncation_length(sched, step, 10, "train", 0, 0)
    with pytest.raises(ValueError):
        truncation_length(sched, 10, 10, "train", 0, 0)


@pytest.mark.parametrize("make", [
    lambda s: TruncatedBPTT(_family(), num_tasks=2, unroll_length=3, horizon=11, schedule=s),
    lambda s: ES(_family(), num_tasks=2, unroll_length=3, horizon=11, num_pairs=1, schedule=s),
    lambda s: PES(_family(), num_tasks=2, unroll_length=3, horizon=11, num_pairs=1, schedule=s),
], ids=["truncated_bptt", "es", "pes"])
@pytest.mark.parametrize("schedule", [UniformSchedule(2, 5), GeometricSchedule(3.0, 2, 6)],
                         ids=["uniform", "geometric"])
def test_estimators_follow_the_schedule_and_never_cross_the_horizon(make, schedule):
    est = make(schedule)
    lopt = LearnedHyperparameters("sgd", {"lr": 0.01}).double()
    state, lengths, episodes = est.init_unroll(lopt), [], []
    for _ in range(14):
        prev_step = state.step if state.step < est.horizon else 0
        state = est.estimate(lopt, state).unroll_state
        lengths.append(state.step - prev_step)
        episodes.append(state.episode)
        assert 1 <= state.step <= est.horizon
    # per episode, the lengths add up to the horizon exactly; all but the clipped last are in bounds
    for e in set(episodes[:-1]):
        ks = [k for k, ep in zip(lengths, episodes) if ep == e]
        assert sum(ks) == est.horizon, ks
        assert all(2 <= k <= schedule.high for k in ks[:-1]) and 1 <= ks[-1] <= schedule.high, ks
    assert len(set(lengths)) > 1  # sampled, not constant


# --------------------------------------------------------------------------- (e) non-finite guard


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_and_pes_drop_a_divergent_truncation_and_restart(cls):
    lopt = _lstm(seed=20, output_scale=1e200)  # steps of ~1e199: f ~ 1e398 = inf in float64
    est = cls(_family(), num_tasks=2, unroll_length=3, horizon=9, seed=21, num_pairs=2)
    res = est.estimate(lopt, est.init_unroll(lopt))
    assert res.finite is False and res.metrics["nonfinite"] == 1.0
    assert not math.isfinite(res.meta_loss.item())
    assert set(res.meta_grads) == {n for n, _ in lopt.named_parameters()}
    assert all(torch.equal(g, torch.zeros_like(g)) for g in res.meta_grads.values())
    s, fresh = res.unroll_state, est.init_unroll(lopt, 1)
    assert s.episode == 1 and s.step == 0
    assert torch.equal(s.task.W, fresh.task.W) and torch.equal(s.params["theta"], fresh.params["theta"])
    if cls is PES:
        assert all(torch.equal(p["theta"], fresh.params["theta"]) for p, _ in s.particles)
        assert all(torch.equal(x, torch.zeros_like(x)) for xi in s.accum for x in xi.values())


@pytest.mark.parametrize("cls", [ES, PES])
def test_a_divergent_perturbed_member_alone_drops_the_estimate(cls):
    """σ = 100 in log lr: some members run with learning rates ~e^100, whose losses grow by
    ~e^200 a step and overflow, while the unperturbed run (lr 0.01) stays finite; the guard
    still drops the estimate."""
    lopt = LearnedHyperparameters("sgd", {"lr": 0.01}).double()
    est = cls(_family(), num_tasks=2, unroll_length=4, horizon=8, seed=22, sigma=100.0, num_pairs=4)
    res = est.estimate(lopt, est.init_unroll(lopt))
    assert math.isfinite(res.meta_loss.item())  # the reference run is fine
    assert not math.isfinite(res.metrics["perturbed_meta_loss"])
    assert res.finite is False and all(torch.equal(g, torch.zeros_like(g)) for g in res.meta_grads.values())
    assert res.unroll_state.episode == 1 and res.unroll_state.step == 0
    tame = cls(_family(), num_tasks=2, unroll_length=4, horizon=8, seed=22, sigma=0.1, num_pairs=4)
    assert tame.estimate(lopt).finite


def test_invalid_es_arguments():
    for kwargs in ({"sigma": 0.0}, {"num_pairs": 0}, {"unroll_length": 0}, {"loss_transform": "sqrt"}):
        for cls in (ES, PES):
            with pytest.raises(ValueError):
                cls(_family(), **kwargs)


# --------------------------------------------------------------------------- saving and restoring


@pytest.mark.parametrize("make", [
    lambda: TruncatedBPTT(_family(), num_tasks=2, unroll_length=3, horizon=8, schedule=UniformSchedule(1, 4)),
    lambda: ES(_family(), num_tasks=2, unroll_length=3, horizon=8, num_pairs=2),
    lambda: PES(_family(), num_tasks=2, unroll_length=3, horizon=8, num_pairs=2),
], ids=["truncated_bptt", "es", "pes"])
def test_save_and_restore_unroll_continues_exactly(make, tmp_path):
    est, lopt = make(), _lstm(seed=9)
    state = est.init_unroll(lopt)
    for _ in range(2):
        state = est.estimate(lopt, state).unroll_state
    torch.save(est.save_unroll(state), tmp_path / "u.pt")
    restored = est.restore_unroll(lopt, torch.load(tmp_path / "u.pt", weights_only=True))
    for _ in range(6):  # across the episode boundary
        a, b = est.estimate(lopt, state), est.estimate(lopt, restored)
        assert torch.equal(a.meta_loss, b.meta_loss) and torch.equal(_flat(a.meta_grads), _flat(b.meta_grads))
        state, restored = a.unroll_state, b.unroll_state
    assert state.episode >= 1


# --------------------------------------------------------------------------- the Lightning shell

TINY = [
    "--model.val_tasks", "4",
    "--model.learned_optimizer.init_args.hidden_size", "2", "--model.learned_optimizer.init_args.num_layers", "1",
    "--model.task_family.init_args.dim", "3",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.logger", "false", "--trainer.val_check_interval", "4",
]


def _estimator(name: str, **init_args) -> list[str]:
    """``--model.estimator`` as a config gives it: a class path (under ``learnopt.meta``) and init args."""
    import json

    init_args = {"num_tasks": 4, "horizon": 10, "unroll_length": 4, **init_args}
    return ["--model.estimator", json.dumps({"class_path": f"learnopt.meta.{name}", "init_args": init_args})]


def _callbacks(export: str) -> list[str]:
    import json

    callbacks = [
        {"class_path": "learnopt.train.callbacks.ExportLearnedOptimizer", "init_args": {"path": export}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "every_n_train_steps": 4, "save_last": True}},
    ]
    return ["--trainer.callbacks", json.dumps(callbacks)]


def test_pes_meta_training_resumes_exactly(in_tmp):
    """8 meta-steps at once vs 4, a checkpoint, and 4 more: the checkpoint falls mid-episode
    (truncations 4, 4, 2 in a horizon of 10), so every particle's run must be restored."""
    import shutil

    from learnopt.train.cli import meta_train

    schedule = {"class_path": "learnopt.meta.UniformSchedule", "init_args": {"low": 3, "high": 5}}
    common = TINY + _estimator("PES", num_pairs=2, schedule=schedule)
    full = meta_train(common + ["--trainer.max_steps", "8"] + _callbacks("full.pt"))
    assert type(full.model.estimator).__name__ == "PES"
    w_full = {k: v.clone() for k, v in full.model.learned_optimizer.state_dict().items()}
    shutil.rmtree("ckpts")
    part = meta_train(common + ["--trainer.max_steps", "4"] + _callbacks("part.pt"))
    assert 0 < part.model._unroll.step < 10  # mid-episode
    saved = torch.load("ckpts/last.ckpt", weights_only=False)["learnopt_unroll"]
    assert len(saved["particles"]) == 4 and len(saved["accum"]) == 2
    resumed = meta_train(common + ["--trainer.max_steps", "8", "--ckpt_path", "ckpts/last.ckpt"]
                         + _callbacks("part.pt"))
    assert resumed.trainer.global_step == 8
    assert (resumed.model._unroll.episode, resumed.model._unroll.step) == (full.model._unroll.episode,
                                                                           full.model._unroll.step)
    for k, v in resumed.model.learned_optimizer.state_dict().items():
        torch.testing.assert_close(v, w_full[k], rtol=0, atol=0, msg=f"weight {k} differs after resuming")
    for a, b in zip(resumed.model._unroll.particles, full.model._unroll.particles):
        assert torch.equal(a[0]["theta"], b[0]["theta"])


@pytest.mark.parametrize("cls,init_args", [("FullBPTT", {"unroll_length": None}), ("ES", {"num_pairs": 2}),
                                            ("TruncatedBPTT", {})])
def test_meta_train_runs_with_each_estimator(in_tmp, cls, init_args):
    import learnopt
    from learnopt.train.cli import meta_train

    init_args = {k: v for k, v in {"num_tasks": 4, "horizon": 10, "unroll_length": 4, **init_args}.items() if v}
    args = ["--model.estimator", f"learnopt.meta.{cls}"] + [f"--model.estimator.{k}={v}" for k, v in init_args.items()]
    cli = meta_train(TINY + args + ["--trainer.max_steps", "3"] + _callbacks("lopt.pt"))
    assert type(cli.model.estimator).__name__ == cls and cli.trainer.global_step == 3
    meta = learnopt.load("lopt.pt").checkpoint_metadata
    assert meta["estimator"]["class_path"].rsplit(".", 1)[1] == cls
    assert {k: meta["estimator"]["init_args"][k] for k in init_args} == init_args
    assert cli.model.estimator.spec() == meta["estimator"]


def test_unknown_estimator_is_an_error_naming_it(in_tmp, capsys):
    from learnopt.train.cli import meta_train

    with pytest.raises(ValueError, match="reinforce"):
        meta_train(TINY + ["--model.estimator", "learnopt.meta.reinforce"])


# --------------------------------------------------------------------------- GPU path


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [ES, PES])
def test_es_and_pes_on_gpu_match_cpu(cls):
    """Perturbations are drawn on the CPU, so the same seeds give the same estimate on a GPU."""
    results = {}
    for device in ("cpu", "cuda"):
        lopt = _lstm(seed=1).to(device)
        est = cls(_family(), num_tasks=4, unroll_length=3, horizon=6, seed=2, sigma=0.01, num_pairs=3)
        state = est.init_unroll(lopt)
        for _ in range(2):
            res = est.estimate(lopt, state)
            state = res.unroll_state
        assert state.params["theta"].device.type == device
        results[device] = res
    cpu, gpu = results["cpu"], results["cuda"]
    torch.testing.assert_close(gpu.meta_loss.cpu(), cpu.meta_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_flat(gpu.meta_grads).cpu(), _flat(cpu.meta_grads), rtol=1e-6, atol=1e-9)


def test_pes_example_config_parses_and_runs(in_tmp):
    from pathlib import Path

    from learnopt.train.cli import meta_train

    config = Path(__file__).resolve().parents[1] / "configs/lstm_quadratic_pes.yaml"
    cli = meta_train(["--config", str(config), "--trainer.max_steps", "2", "--trainer.logger", "false",
                      "--trainer.enable_progress_bar", "false", "--model.estimator.num_tasks", "2",
                      "--model.estimator.horizon", "12", "--model.val_tasks", "2", "--model.estimator.num_pairs", "1",
                      "--model.learned_optimizer.init_args.hidden_size", "2"])
    assert type(cli.model.estimator).__name__ == "PES" and cli.trainer.global_step == 2
    assert cli.model.estimator.schedule == UniformSchedule(10, 30)
