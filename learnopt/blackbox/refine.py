"""Trust-region steps on a local quadratic model: the suggestion that ``RNNProposer(refine=True)``
may mix into its queries.

Learned optimizers usually read features that hand-designed optimizers compute (Adam's moments,
for instance); this is the black-box counterpart. After each observation a full quadratic
(``(D + 1)(D + 2) / 2`` coefficients) is fitted by least squares to the ``2·(D + 1)(D + 2) / 2``
observations nearest the best point so far, and the suggestion is the minimiser of that model
within a trust region of radius ``ρ`` around the best point (the Moré–Sorensen step, with
Newton's method on the secular equation), clipped to the unit box. The radius adapts as in
derivative-free trust-region methods (Conn, Scheinberg & Vicente 2009), weighted by how much the
query followed the suggestion: ``ρ ← ρ · 1.5^r`` when the observation improved on the best so
far and ``ρ ← ρ · 0.5^r`` when it did not, with ``r`` the proposer's gate, within
``[1e-6, 0.3]`` and starting at 0.1.

The model is a feature, not a learned part: it is computed without gradient (the queries it
depends on are detached), and the proposer learns, through its gate, when to follow it.

``quadratic_model_step`` and ``update_radius`` take the array namespace (``numpy`` or ``torch``)
as ``xp``, so the batched meta-training rollout (``LocalQuadraticModel``, torch) and the
ask/tell session (one instance, numpy) compute the same suggestion with the same code.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

RHO_START, RHO_MIN, RHO_MAX = 0.1, 1e-6, 0.3
CLOCK_SCALES = (10.0, 30.0, 100.0, 300.0)  # the refine gate's clock: tanh(t / τ)
GROW, SHRINK = 1.5, 0.5
NEWTON_STEPS = 8


def clock(count: int) -> np.ndarray:
    """The clock the refine gate reads after ``count`` observations: ``tanh(count / τ)``.

    Args:
        count: observations so far.
    Returns:
        ``[len(CLOCK_SCALES)]``.
    """
    return np.tanh(count / np.asarray(CLOCK_SCALES))


def basis_size(dim: int) -> int:
    """Coefficients of a full quadratic in ``dim`` variables.

    Args:
        dim: ``D``.
    Returns:
        ``(D + 1)(D + 2) / 2``.
    """
    return (dim + 1) * (dim + 2) // 2


def min_points(dim: int) -> int:
    """Observations needed before there is a suggestion (one more than the coefficients).

    Args:
        dim: ``D``.
    Returns:
        ``basis_size(D) + 1``.
    """
    return basis_size(dim) + 1


def fit_points(dim: int) -> int:
    """How many observations nearest the best point the model is fitted to.

    Args:
        dim: ``D``.
    Returns:
        ``2 · basis_size(D)``.
    """
    return 2 * basis_size(dim)


@lru_cache(maxsize=None)
def _pairs(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column of each quadratic term, and the diagonal of the ``P × P`` Gram matrix."""
    rows, cols = np.triu_indices(dim)
    return rows, cols, np.arange(basis_size(dim))


def _zeros(xp: Any, like: Any, shape: tuple[int, ...]) -> Any:
    if xp is torch:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return np.zeros(shape, dtype=like.dtype)


def quadratic_model_step(d: Any, y: Any, rho: Any, xp: Any) -> Any:
    """The trust-region step ``[..., D]`` from the best point, for observations ``y`` ``[..., M]``
    at offsets ``d`` ``[..., M, D]`` from it (the best point itself included, at 0) and radius
    ``rho`` ``[...]``. Float64 arrays of ``xp`` (numpy or torch); batched over leading axes.

    Args:
        d: ``[..., M, D]`` offsets from the best point.
        y: ``[..., M]`` observations.
        rho: ``[...]`` trust radius.
        xp: ``numpy`` or ``torch``.
    Returns:
        ``[..., D]``.
    """
    dim = d.shape[-1]
    rows, cols, diag = _pairs(dim)
    # Offsets scaled to unit size, so the linear and quadratic columns are of similar size.
    scale = xp.sqrt(xp.amax((d * d).sum(-1), -1))
    scale = xp.where(scale > 1e-12, scale, 1.0)
    u = d / scale[..., None, None]
    basis = xp.concatenate([xp.ones_like(u[..., :1]), u, u[..., rows] * u[..., cols]], -1)  # [..., M, P]
    # The fit is invariant to the scale of y; dividing by a power of two near its largest
    # magnitude (exact) keeps the mean and the squares below from overflowing or underflowing
    # for observations of any finite size.
    _, exponent = xp.frexp(xp.amax(xp.abs(y), -1))
    y = xp.ldexp(y, -exponent[..., None])
    centred = y - y.mean(-1)[..., None]
    spread = xp.sqrt((centred * centred).mean(-1))[..., None]
    target = centred / xp.where(spread > 0, spread, 1.0)
    bt = basis.swapaxes(-1, -2)
    gram = bt @ basis
    gram[..., diag, diag] += 1e-8
    coef = xp.linalg.solve(gram, (bt @ target[..., None]))[..., 0]
    grad = coef[..., 1:dim + 1]
    hess = _zeros(xp, u, u.shape[:-2] + (dim, dim))
    hess[..., rows, cols] = coef[..., dim + 1:]
    hess = hess + hess.swapaxes(-1, -2)  # x_i x_j (i < j) has H_ij = c; x_i² has H_ii = 2c
    w, vec = xp.linalg.eigh(hess)  # ascending eigenvalues
    gv = (vec.swapaxes(-1, -2) @ grad[..., None])[..., 0]
    radius = rho / scale
    lam = xp.where(w[..., 0] < 0, -w[..., 0], 0.0) + 1e-9 * (1.0 + xp.abs(w).sum(-1))
    for _ in range(NEWTON_STEPS):  # Newton on 1/radius − 1/‖s(λ)‖, from below: monotone
        den = w + lam[..., None]
        s = gv / den
        norm2 = (s * s).sum(-1)
        over = norm2 > radius * radius * (1.0 + 1e-6)  # (the final rescaling makes ‖s‖ = radius)
        if not bool(over.any()):
            break
        curv = (s * s / den).sum(-1)
        step = (xp.sqrt(norm2) / radius - 1.0) * norm2 / xp.where(curv > 0, curv, 1.0)
        lam = xp.where(over, lam + step, lam)
    s = -(vec @ (gv / (w + lam[..., None]))[..., None])[..., 0]
    norm = xp.sqrt((s * s).sum(-1))
    s = s * xp.where(norm > radius, radius / xp.where(norm > 0, norm, 1.0), 1.0)[..., None]
    return s * scale[..., None]


def update_radius(rho: Any, weight: Any, improved: Any, xp: Any) -> Any:
    """``rho`` after an observation made with gate ``weight`` (how much the query followed the
    suggestion, in [0, 1]) that did (``improved``) or did not improve on the best so far.

    Args:
        rho: the radius.
        weight: the gate, in [0, 1].
        improved: whether the observation improved on the best.
        xp: ``numpy`` or ``torch``.
    Returns:
        The new radius.
    """
    factor = xp.where(improved, GROW ** weight, SHRINK ** weight)
    return xp.clip(rho * factor, RHO_MIN, RHO_MAX)


class LocalQuadraticModel:
    """The batched history and trust radius behind ``RNNProposer(refine=True)``'s suggestion in
    a meta-training rollout (torch, no gradient).

    Args:
        num_instances: ``n``.
        dim: ``D``.
        device: device of the radius.
    """

    def __init__(self, num_instances: int, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.xs: list[Tensor] = []
        self.ys: list[Tensor] = []
        self.rho = torch.full((num_instances,), RHO_START, dtype=torch.float64, device=device)
        self.best: Tensor | None = None

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(y.shape[1] for y in self.ys)

    def update(self, x: Tensor, y: Tensor, weight: Tensor | None) -> None:
        """Add a step's queries and observations.

        Args:
            x: ``[n, q, D]`` queries.
            y: ``[n, q]`` observations.
            weight: ``[n]`` how much they followed the suggestion (None: not at all).
        """
        x, y = x.detach().double(), y.detach().double()
        low = y.min(1).values
        if self.best is not None and weight is not None:
            self.rho = update_radius(self.rho, weight.detach().double(), low < self.best, torch)
        self.best = low if self.best is None else torch.minimum(self.best, low)
        self.xs.append(x)
        self.ys.append(y)

    @torch.no_grad()
    def suggestion(self) -> Tensor | None:
        """The model's next query ``[n, D]`` in the unit box (None until ``min_points``).

        Returns:
            ``[n, D]``, or None.
        """
        if self.count < min_points(self.dim):
            return None
        xs, ys = torch.cat(self.xs, 1), torch.cat(self.ys, 1)
        n = xs.shape[0]
        best = xs[torch.arange(n, device=xs.device), ys.argmin(1)]
        d = xs - best[:, None]
        k = min(fit_points(self.dim), ys.shape[1])
        idx = (d * d).sum(-1).topk(k, dim=1, largest=False).indices
        step = quadratic_model_step(d.gather(1, idx[..., None].expand(-1, -1, self.dim)), ys.gather(1, idx),
                                    self.rho, torch)
        return (best + step).clamp(0.0, 1.0)


def numpy_suggestion(xs: np.ndarray, ys: np.ndarray, rho: float) -> np.ndarray | None:
    """``LocalQuadraticModel.suggestion`` for one instance in numpy.

    Args:
        xs: ``[t, D]`` queries.
        ys: ``[t]`` observations.
        rho: the trust radius.
    Returns:
        ``[D]``, or None before ``min_points``.
    """
    t, dim = xs.shape
    if t < min_points(dim):
        return None
    best = xs[int(np.argmin(ys))]
    d = xs - best
    k = min(fit_points(dim), t)
    dist = np.einsum("ij,ij->i", d, d)
    idx = np.argpartition(dist, k - 1)[:k] if k < t else np.arange(t)
    step = quadratic_model_step(d[idx], ys[idx], np.float64(rho), np)
    return np.clip(best + step, 0.0, 1.0)


def numpy_update_radius(rho: float, weight: float, improved: bool) -> float:
    """``update_radius`` for one instance, on Python numbers."""
    return float(update_radius(np.float64(rho), np.float64(weight), np.bool_(improved), np))


__all__ = ["CLOCK_SCALES", "LocalQuadraticModel", "basis_size", "clock", "fit_points", "min_points", "numpy_suggestion",
           "quadratic_model_step", "update_radius"]
