"""The separable quadratic trend's algebra, shared by the proposer's batched ``QuadraticTrend``
(torch, training) and the ask/tell session (numpy, one instance): a leaf module, so that the
session does not import the proposer."""

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
