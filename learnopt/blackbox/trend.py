"""The separable quadratic trend (``RNNProposer(trend=True)``): the batched ``QuadraticTrend``
(torch, training) and its algebra, shared with the ask/tell session (numpy, one instance): a
leaf module, so that the session does not import the proposer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def separable_quadratic_minimum(a: Any, b: Any) -> tuple[Any, Any]:
    """Per coordinate, the minimiser ``z`` in ``[-1, 1]`` of ``a z² + b z`` and its value (any
    leading shape; torch tensors or numpy arrays). Convex coordinates (``a > 0``) have it at the
    clamped vertex; the others at the end the slope points to.

    Args:
        a: quadratic coefficients ``[..., D]``.
        b: linear coefficients ``[..., D]``.
    Returns:
        ``(z, value)``, each shaped like ``a`` (per coordinate).
    """
    xp = torch if isinstance(a, Tensor) else np
    convex = a > 1e-12
    vertex = xp.clip(-b / (2 * xp.where(convex, a, xp.ones_like(a))), -1.0, 1.0)
    end = xp.where(b > 0, -xp.ones_like(b), xp.ones_like(b))
    z = xp.where(convex, vertex, end)
    return z, a * z * z + b * z


def quadratic_basis(x: Any) -> Any:
    """``QuadraticTrend``'s features ``[1, z, z²]`` (``z = 2x − 1``, float64) of unit-box points
    ``x`` ``[..., D]`` → ``[..., 2D + 1]``; torch tensors or numpy arrays.

    Args:
        x: ``[..., D]`` unit-box points.
    Returns:
        ``[..., 2D + 1]`` float64.
    """
    if isinstance(x, Tensor):
        z = 2 * x.to(torch.float64) - 1
        return torch.cat([torch.ones_like(z[..., :1]), z, z * z], dim=-1)
    z = 2 * np.asarray(x, dtype=np.float64) - 1
    return np.concatenate([np.ones_like(z[..., :1]), z, z * z], axis=-1)


def ridge_penalty(dim: int, ridge: float) -> np.ndarray:
    """The diagonal of ``QuadraticTrend``'s ridge: ``ridge`` on every coefficient but the
    intercept's.

    Args:
        dim: ``D``.
        ridge: the ridge weight.
    Returns:
        ``[2D + 1]``.
    """
    penalty = np.full(1 + 2 * dim, float(ridge))
    penalty[0] = 0.0
    return penalty


def quadratic_fit_minimum(gram: Any, moment: Any, penalty: Any, dim: int) -> tuple[Any, Any]:
    """Solve the ridge normal equations of ``QuadraticTrend`` (``gram`` ``[..., k, k]``,
    ``moment`` ``[..., k]``, the diagonal ``penalty`` ``[k]``; ``k = 2·dim + 1``) and return the
    fit's minimiser in ``[-1, 1]^dim`` and its value there (in the units of the fitted values).
    Torch (batched, for training) and numpy (one instance, for the session) alike.

    Args:
        gram: ``[..., k, k]``.
        moment: ``[..., k]``.
        penalty: ``[k]``.
        dim: ``D``.
    Returns:
        ``(z [..., D], value [...])``.
    """
    xp = torch if isinstance(gram, Tensor) else np
    w = xp.linalg.solve(gram + xp.diag(penalty), moment)
    z, value = separable_quadratic_minimum(w[..., 1 + dim:], w[..., 1:1 + dim])
    return z, w[..., 0] + value.sum(-1)


class QuadraticTrend:
    """A separable quadratic fitted to all observations so far by ridge regression, per
    instance: ``y ≈ w₀ + Σ_d b_d z_d + a_d z_d²`` with ``z = 2x − 1`` (the unit box as
    ``[-1, 1]^D``) and a ridge ``ridge·‖(a, b)‖²`` (the intercept is free). The proposer reads
    its minimiser in the box and its value there, standardised (``RNNProposer(trend=True)``, our
    extension): the large-scale shape of the function, which a recurrent state summarises
    poorly from single observations. Sums are kept of ``(y − shift) / scale`` (the first observation,
    and ``RunningStandardizer``'s power-of-two unit), in float64; the fit is linear in ``y``, so the
    features are invariant to ``f ↦ a·f + b``.

    Args:
        num_instances: Number of instances ``n`` fitted side by side.
        dim: Dimension ``D`` of the queries.
        device: Device of the sums.
        ridge: Weight of the ridge on the linear and quadratic coefficients.
    """

    def __init__(self, num_instances: int, dim: int, device: torch.device, ridge: float = 0.1) -> None:
        n, k = num_instances, 1 + 2 * dim
        self.dim, self.ridge = dim, ridge
        self.gram = torch.zeros(n, k, k, dtype=torch.float64, device=device)
        self.moment = torch.zeros(n, k, dtype=torch.float64, device=device)
        self.penalty = torch.as_tensor(ridge_penalty(dim, ridge), device=device)
        self.scale: Tensor | None = None  # the unit of the sums, when given one (``update``)

    def update(self, x: Tensor, y: Tensor, shift: Tensor, scale: Tensor | None = None) -> None:
        """Add a step's observations to the fit.

        Args:
            x: ``[n, q, D]`` unit-box queries.
            y: ``[n, q]`` their observations.
            shift: ``[n]`` offset subtracted from ``y`` (``RunningStandardizer.shift``).
            scale: ``[n]`` power-of-two unit of the sums (``RunningStandardizer.scale``; None: 1);
                when it changes, the sums kept so far are converted to it exactly.
        """
        phi = quadratic_basis(x)  # [n, q, k]
        if scale is None:
            d = (y - shift[:, None]).to(torch.float64)
        else:
            if self.scale is not None:
                self.moment = self.moment * (self.scale / scale.to(torch.float64))[:, None]
            self.scale = scale.to(torch.float64)
            d = (y / scale[:, None] - shift[:, None] / scale[:, None]).to(torch.float64)
        self.gram = self.gram + phi.transpose(1, 2) @ phi
        self.moment = self.moment + (phi * d[..., None]).sum(1)

    def features(self, mean: Tensor, std: Tensor, shift: Tensor, scale: Tensor | None = None) -> Tensor:
        """The fit's minimiser and its value there, standardised.

        Args:
            mean: ``[n]`` mean of the observations (``RunningStandardizer.mean``, in units of ``scale``).
            std: ``[n]`` their standard deviation (in units of ``scale``).
            shift: ``[n]`` offset the fit's sums were taken from.
            scale: ``[n]`` unit of ``mean``, ``std`` and the sums (None: 1).

        Returns:
            ``[n, D + 1]``: the minimiser in ``[-1, 1]^D`` and ``(min − mean) / std`` clamped to ±10.
        """
        z, fit_min = quadratic_fit_minimum(self.gram, self.moment, self.penalty, self.dim)
        if scale is None:
            fit_min = fit_min + shift.to(torch.float64)
        else:
            fit_min = fit_min + shift.to(torch.float64) / scale.to(torch.float64)
        return torch.cat([z, ((fit_min - mean) / std).clamp(-10.0, 10.0)[:, None]], dim=1)
