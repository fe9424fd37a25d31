"""The proposer's running standardisation of observations (``RunningStandardizer``): every
observation is fed to ``RNNProposer`` as ``(y_t − mean_t) / std_t`` over all observations so far,
which makes the proposer invariant to ``f ↦ a·f + b`` (``learnopt.blackbox.proposer``). Sums are
kept in units of a power of two near the largest magnitude seen, so no scale of ``f`` overflows
them. ``_Standardizer`` is its single-instance numpy twin, the ask/tell session's fast path
(``learnopt.blackbox.session``), which also keeps the sums of the quadratic trend and the local
model's history. A leaf module: the proposer and the session import it, it imports neither."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from learnopt.blackbox.refine import RHO_START, numpy_suggestion, numpy_update_radius
from learnopt.blackbox.trend import quadratic_basis, quadratic_fit_minimum, ridge_penalty


def _safe_exponent(dtype: torch.dtype) -> int:
    """``e`` such that sums of up to 2**40 squares of values in ``[2**-e, 2**e]`` neither overflow nor
    underflow in ``dtype`` (480 for float64, the session's ``_SAFE``; 32 for float32)."""
    max_exponent = math.frexp(torch.finfo(dtype).max)[1]
    return max((max_exponent - 64) // 2, max_exponent // 4)


class RunningStandardizer:
    """Running mean and standard deviation of the observations so far, per instance (module
    docstring). Sums are of ``(y − shift) / scale``: ``shift`` the first observation (no
    cancellation for large offsets), ``scale`` a power of two keeping the largest magnitude seen in
    ``[2**-e, 2**e]`` (480 in float64, 32 in float32), so squares and sums never overflow or
    underflow, whatever the scale of ``f``. Division by a power of two is exact: the standardised
    values are those of ``f``; for ordinary magnitudes ``scale`` stays 1. ``mean``, ``std``
    (None until two observations) are in units of ``scale``. The session's numpy twin keeps the same sums.

    Args:
        num_instances: ``n``, runs standardised side by side.
        dtype: dtype of the observations and sums.
        device: device of the sums.
    """

    def __init__(self, num_instances: int, dtype: torch.dtype, device: torch.device) -> None:
        self.count = 0
        self.total = torch.zeros(num_instances, dtype=dtype, device=device)
        self.total_sq = torch.zeros(num_instances, dtype=dtype, device=device)
        self.best: Tensor | None = None
        self.best_x: Tensor | None = None  # [n, D], the query of the best observation (when given)
        self.shift = torch.zeros(num_instances, dtype=dtype, device=device)
        self.scale = torch.ones(num_instances, dtype=dtype, device=device)  # sums are of (y − shift) / scale
        self.magnitude = torch.zeros(num_instances, dtype=dtype, device=device)  # largest |y|, |shift| seen
        self.mean: Tensor | None = None  # of the observations so far, in units of scale (set once there are two)
        self.std: Tensor | None = None

    def clone(self) -> RunningStandardizer:
        """A copy whose later updates leave this one unchanged.

        Returns:
            A new ``RunningStandardizer`` sharing the current (never mutated in place) tensors.
        """
        new = RunningStandardizer.__new__(RunningStandardizer)
        new.__dict__.update(self.__dict__)
        return new

    def _rescale(self, y: Tensor) -> None:
        """Adopt a new ``scale`` where the magnitudes seen leave ``[2**-e, 2**e]·scale``; without a
        host sync (a factor of 1 leaves the sums exactly as they are)."""
        e = _safe_exponent(self.total.dtype)
        mag = torch.maximum(torch.maximum(self.magnitude, y.detach().abs().amax(1)), self.shift.abs())
        self.magnitude = mag
        ratio = mag / self.scale
        out = ((ratio > 2.0 ** e) | ((ratio < 2.0 ** -e) & (mag > 0))) & torch.isfinite(mag)
        # 2**(k−1) with mag / 2**k in [0.5, 1): representable even for the largest finite mag
        new = torch.where(out, torch.ldexp(torch.ones_like(mag), torch.frexp(mag).exponent - 1), self.scale)
        factor = self.scale / new  # a power of two: the rescaled sums are exact
        self.total = self.total * factor
        self.total_sq = self.total_sq * factor * factor  # (two products: factor² may underflow alone)
        self.scale = new

    def update(self, y: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Add a step's observations and standardise them.

        Args:
            y: ``[n, q]`` observations.
            x: ``[n, q, D]`` queries that made them, to track ``best_x`` (optional).

        Returns:
            ``y`` standardised ``[n, q]`` and the best value so far standardised ``[n]``, by the
            mean and standard deviation of all observations so far, these included (zeros after
            the first observation).
        """
        if self.count == 0:
            self.shift = y[:, 0].detach()
        self._rescale(y)
        s = self.scale[:, None]
        self.count += y.shape[1]
        d = y / s - self.shift[:, None] / s
        self.total = self.total + d.sum(1)
        self.total_sq = self.total_sq + (d * d).sum(1)
        best, arg = y.min(1)
        if x is not None:
            x_of_best = x[torch.arange(x.shape[0], device=x.device), arg]
            if self.best_x is None:
                self.best_x = x_of_best
            else:
                self.best_x = torch.where((best < self.best)[:, None], x_of_best, self.best_x)
        self.best = best if self.best is None else torch.minimum(self.best, best)
        mean = self.total / self.count  # of (y − shift) / scale
        if self.count < 2:
            zeros = torch.zeros_like(y)
            return zeros, zeros[:, 0]
        var = (self.total_sq / self.count - mean * mean).clamp_min(0.0)
        # Constant observations have var exactly 0 (sums of y − shift): the floor makes them 0,
        # not 0/0, without changing any other standardised value (exact scale invariance).
        std = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
        mean = mean + self.shift / self.scale
        self.mean, self.std = mean, std
        return (y / s - mean[:, None]) / std[:, None], (self.best / self.scale - mean) / std


# Observations are summed in units of ``scale``, a power of two that keeps the largest magnitude
# seen (observations and the shift) within [_TINY, _SAFE]: squares and sums of up to 2**40 of
# them then neither overflow nor underflow, whatever the scale of f (1e300·f, 1e-300·f). Dividing
# by a power of two is exact, so the standardised values are those of f itself; for ordinary
# magnitudes the scale stays 1 and the arithmetic is exactly RunningStandardizer's.
_SAFE, _TINY = 2.0 ** _safe_exponent(torch.float64), 2.0 ** -_safe_exponent(torch.float64)  # 2**±480


def _power_of_two_below(m: float) -> float:
    """The power of two ``2**e`` with ``m / 2**e`` in ``[1, 2)`` (``m > 0``, finite; representable
    even for the largest float, where the power of two above it is not)."""
    return math.ldexp(1.0, math.frexp(m)[1] - 1)


class _Standardizer:
    """``RunningStandardizer`` for a single instance, in Python floats and numpy (the session's
    fast path; the same formulas, tested against it), kept free of overflow for observations of
    any finite size (``scale`` above). With ``trend_dim`` it also keeps ``QuadraticTrend``'s sums
    and gives its features (``trend_features``); with ``refine`` it keeps the history and trust
    radius of ``LocalQuadraticModel`` and gives its suggestion (``suggestion``). Arrays are
    replaced, never changed in place, so ``copy.copy`` is a snapshot."""

    def __init__(self, trend_dim: int | None = None, ridge: float = 0.1, refine: bool = False) -> None:
        self.count, self.shift, self.total, self.total_sq = 0, 0.0, 0.0, 0.0
        self.scale, self.magnitude = 1.0, 0.0  # sums are of (y - shift) / scale
        self.best = math.inf
        self.best_x: np.ndarray | None = None
        self.mean = self.std = math.nan  # of the observations so far, in units of ``scale``
        self.trend_dim = trend_dim
        if trend_dim is not None:
            k = 1 + 2 * trend_dim
            self.gram, self.moment = np.zeros((k, k)), np.zeros(k)
            self.penalty = ridge_penalty(trend_dim, ridge)
        self.refine, self.rho = refine, RHO_START
        self.hist_x: np.ndarray | None = None
        self.hist_y: np.ndarray | None = None

    def _rescale(self, y: np.ndarray) -> None:
        """Adopt a new ``scale`` when the magnitudes seen leave ``[_TINY, _SAFE]·scale``."""
        self.magnitude = max(self.magnitude, float(np.abs(y).max()), abs(self.shift))
        ratio = self.magnitude / self.scale
        if ratio <= _SAFE and (ratio >= _TINY or self.magnitude == 0.0):
            return
        new = _power_of_two_below(self.magnitude)
        factor = self.scale / new  # a power of two: the rescaled sums are exact
        self.total *= factor
        self.total_sq = self.total_sq * factor * factor  # (two products: factor² may underflow alone)
        if self.trend_dim is not None:
            self.moment = self.moment * factor
        self.scale = new

    def update(self, y: np.ndarray, x: np.ndarray, weight: float | None = None) -> tuple[np.ndarray, float]:
        """Add observations ``y`` ``[q]`` made at ``x`` ``[q, D]`` (``weight``: how much they
        followed the local model's suggestion, None if there was none); return them and the
        best value so far, standardised."""
        if self.refine:
            if weight is not None and self.count > 0:
                self.rho = numpy_update_radius(self.rho, weight, float(y.min()) < self.best)
            first = self.hist_x is None
            self.hist_x = x.copy() if first else np.concatenate([self.hist_x, x])
            self.hist_y = y.astype(np.float64) if first else np.concatenate([self.hist_y, y])
        if self.count == 0:
            self.shift = float(y[0])
        self._rescale(y)
        s = self.scale
        self.count += len(y)
        d = y - self.shift if s == 1.0 else y / s - self.shift / s
        self.total += float(d.sum())
        self.total_sq += float((d * d).sum())
        if self.trend_dim is not None:
            phi = quadratic_basis(x)
            self.gram = self.gram + phi.T @ phi
            self.moment = self.moment + phi.T @ d
        arg = int(np.argmin(y))
        if y[arg] < self.best or self.best_x is None:
            self.best, self.best_x = float(y[arg]), x[arg]
        if self.count < 2:
            return np.zeros_like(y), 0.0
        mean = self.total / self.count
        std = math.sqrt(max(self.total_sq / self.count - mean * mean, np.finfo(np.float64).tiny))
        mean += self.shift / s
        self.mean, self.std = mean, std
        return (y / s - mean) / std, (self.best / s - mean) / std

    def suggestion(self) -> np.ndarray | None:
        """``LocalQuadraticModel.suggestion`` for this instance (None without ``refine`` or
        before enough observations)."""
        if not self.refine or self.hist_x is None:
            return None
        return numpy_suggestion(self.hist_x, self.hist_y, self.rho)

    def trend_features(self) -> np.ndarray | None:
        """``QuadraticTrend.features`` for this instance (None without ``trend_dim``; zeros until
        there are two observations)."""
        dim = self.trend_dim
        if dim is None:
            return None
        if self.count < 2:
            return np.zeros(dim + 1)
        z, fit_min = quadratic_fit_minimum(self.gram, self.moment, self.penalty, dim)
        fit_min = float(fit_min) + self.shift / self.scale
        return np.concatenate([z, [min(max((fit_min - self.mean) / self.std, -10.0), 10.0)]])
