"""The proposer's running standardisation of observations (``RunningStandardizer``): every
observation is fed to ``RNNProposer`` as ``(y_t − mean_t) / std_t`` over all observations so far,
which makes the proposer invariant to ``f ↦ a·f + b`` (``learnopt.blackbox.proposer``). Sums are
kept in units of a power of two near the largest magnitude seen, so no scale of ``f`` overflows
them. A leaf module (torch only), imported by the proposer."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
