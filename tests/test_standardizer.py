"""``RunningStandardizer`` (the proposer's running standardisation of observations) stays finite
for observations of any finite magnitude, in float32 and float64, against an exact reference
(Python's ``decimal``), and the session's numpy twin agrees with it there too."""

from __future__ import annotations

from decimal import Context, Decimal

import numpy as np
import pytest
import torch

from learnopt.blackbox import RunningStandardizer

_EXACT = Context(prec=60, Emax=10**6, Emin=-10**6)


def _reference(seen: list[float], new: list[float], best: float) -> tuple[list[float], float]:
    """``(y - mean) / std`` of the ``new`` observations and of ``best``, with the population mean
    and standard deviation of ``seen``, computed exactly (no overflow) and rounded to float."""
    d = [Decimal(v) for v in seen]
    n = Decimal(len(d))
    mean = _EXACT.divide(sum(d, Decimal(0)), n)
    var = _EXACT.divide(sum((_EXACT.multiply(v - mean, v - mean) for v in d), Decimal(0)), n)
    std = _EXACT.sqrt(var)
    return [float(_EXACT.divide(Decimal(v) - mean, std)) for v in new], float(_EXACT.divide(Decimal(best) - mean, std))


def _run(ys: np.ndarray, dtype: torch.dtype, q: int):
    """Feed ``ys`` ``[n, T]`` in steps of ``q``; yield (step's observations so far, y_std, best_std, stats)."""
    stats = RunningStandardizer(ys.shape[0], dtype, torch.device("cpu"))
    for t in range(0, ys.shape[1], q):
        y = torch.tensor(ys[:, t:t + q], dtype=dtype)
        y_std, best_std = stats.update(y)
        yield t + q, y_std, best_std, stats


# per instance: huge values mixed with small ones, all huge, tiny, and ordinary ones
_F64 = np.array([
    [1e300, 2.0, -3e299, 5e300, 1e200, 7.0, -1.0, 1e300],
    [1e308, -1e308, 1.5e308, -1.7e308, 0.5, 1e308, -1e308, 3.0],
    [1e-300, 3e-300, -2e-300, 5e-301, 1e-310, 2e-300, 4e-300, 0.0],
    [3.0, -1.0, 2.5, 0.25, 4.0, -2.0, 1.0, 0.5],
])
_F32 = np.array([
    [1e30, 2.0, -3e29, 3e38, 1e20, 7.0, -1.0, -3.3e38],
    [1e-30, 3e-30, -2e-30, 5e-31, 1e-38, 2e-30, 4e-30, 0.0],
    [3.0, -1.0, 2.5, 0.25, 4.0, -2.0, 1.0, 0.5],
])


@pytest.mark.parametrize("dtype,ys", [(torch.float64, _F64), (torch.float32, _F32)], ids=["float64", "float32"])
@pytest.mark.parametrize("q", [1, 2])
def test_huge_and_tiny_observations_standardise_exactly_without_overflow(dtype, ys, q):
    ys = ys.astype(np.float64 if dtype == torch.float64 else np.float32).astype(np.float64)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for seen, y_std, best_std, stats in _run(ys, dtype, q):
        for s in (stats.total, stats.total_sq, y_std, best_std):
            assert torch.isfinite(s).all(), f"after {seen} observations: {s}"
        if seen < 2:
            continue
        assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.std).all() and (stats.std > 0).all()
        for i in range(ys.shape[0]):
            want_y, want_best = _reference(list(ys[i, :seen]), list(ys[i, seen - q:seen]), float(ys[i, :seen].min()))
            np.testing.assert_allclose(y_std[i].double().numpy(), want_y, **tol)
            np.testing.assert_allclose(float(best_std[i]), want_best, **tol)


@pytest.mark.parametrize("dtype,exponent", [(torch.float64, 900), (torch.float64, -900), (torch.float32, 100),
                                            (torch.float32, -100)])
def test_a_power_of_two_times_f_standardises_to_exactly_the_same_values(dtype, exponent):
    rng = np.random.default_rng(0)
    ys = 1e3 + rng.normal(0.0, 5.0, size=(2, 9))
    ys = torch.tensor(ys, dtype=dtype).double().numpy()  # representable in dtype, and so is 2**k times it
    for (_, a, best_a, _), (_, b, best_b, _) in zip(_run(ys, dtype, 3), _run(np.ldexp(ys, exponent), dtype, 3)):
        assert torch.equal(a, b) and torch.equal(best_a, best_b)


def test_gradients_through_huge_observations_are_finite():
    y = torch.tensor([[1e300, 2.0, -3e299, 5e300]], dtype=torch.float64, requires_grad=True)
    stats = RunningStandardizer(1, torch.float64, torch.device("cpu"))
    y_std, best_std = stats.update(y)
    (y_std.square().sum() + best_std.sum()).backward()
    assert torch.isfinite(y.grad).all()


def test_the_session_standardizer_agrees_at_huge_magnitudes():
    from learnopt.blackbox.session import _Standardizer

    ys = _F64[:3]
    for i in range(ys.shape[0]):
        fast = _Standardizer()
        for t, (_, ref, best_ref, _) in enumerate(_run(ys[i:i + 1], torch.float64, 1)):
            y_fast, best_fast = fast.update(ys[i, t:t + 1], np.zeros((1, 2)))
            np.testing.assert_allclose(y_fast, ref[0].numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(best_fast, float(best_ref[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 2.0 ** 900), (torch.float64, 1e-300),
                                         (torch.float64, 1.5e308), (torch.float32, 3e38)])
def test_a_rollout_with_the_trend_queries_the_same_points_at_any_scale_of_f(dtype, scale):
    from learnopt.blackbox import RNNProposer

    torch.manual_seed(0)
    p = RNNProposer(dim=2, hidden_size=8, num_layers=1, trend=True).to(dtype)

    def bowl(x):
        return ((x - 0.3) ** 2).sum(-1)

    with torch.no_grad():
        xs, _ = p.rollout(bowl, 2, 8)
        xs_scaled, ys_scaled = p.rollout(lambda x: scale * bowl(x), 2, 8)
    assert torch.isfinite(ys_scaled).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # (float32: scale·f rounds differently from f)
    torch.testing.assert_close(xs_scaled, xs, rtol=0, atol=tol)
