"""Numerics shared by the transforms: per-instance reductions, a safe square root, the step
counter, and Adam's moments and bias correction (a leaf module: it imports nothing of learnopt
but the core types)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from learnopt.optim.base import Hyper, Params


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of inf, so no NaN appears when
    differentiating through a zero second moment (double backward at zero gradients).

    Args:
        x: a non-negative tensor (negative entries give 0).
    Returns:
        ``sqrt(x)``, elementwise.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def nonzero(x: Hyper) -> bool:
    """Whether a hyperparameter can be nonzero: anything but a literal Python 0, so a factory may
    drop a stage for ``weight_decay=0.0`` but keeps it for a tensor (which may be meta-learned).

    Args:
        x: a hyperparameter.
    Returns:
        False only for a literal 0.
    """
    return not (isinstance(x, (int, float)) and x == 0)


def count_like(params: Params) -> Tensor:
    """A zero int64 step count on the parameters' device.

    Args:
        params: the parameters.
    Returns:
        ``tensor(0)``, int64.
    """
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)


def instance_sum(x: Tensor, batch_dims: int = 0) -> Tensor:
    """Sum over all but the first ``batch_dims`` dimensions, keeping them for broadcasting.

    Args:
        x: the tensor.
        batch_dims: leading task-instance dimensions.
    Returns:
        The sums, shape ``[*x.shape[:batch_dims], 1, ...]`` (``x`` itself if it has no other dimension).
    """
    if x.dim() <= batch_dims:
        return x
    return x.sum(dim=tuple(range(batch_dims, x.dim())), keepdim=True)


def instance_norm(tree: Params, batch_dims: int = 0) -> Tensor:
    """Euclidean norm of all tensors in ``tree`` together, per instance.

    Args:
        tree: ``{name: tensor}``.
        batch_dims: leading task-instance dimensions, shared by all tensors.
    Returns:
        The norms, shape ``x.shape[:batch_dims]``.
    """
    total = None
    for x in tree.values():
        s = instance_sum(x * x, batch_dims).reshape(x.shape[:batch_dims])
        total = s if total is None else total + s
    return torch.sqrt(total)


def float_count(count: Tensor, like: Tensor) -> Tensor:
    """The step count in the parameters' precision (at least float32), see ``scale_by_adam``.

    Args:
        count: the int64 step count.
        like: a tensor of the parameters' dtype.
    Returns:
        ``count`` as a float tensor.
    """
    return count.to(torch.promote_types(like.dtype, torch.float32))


def div_or_zero(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0, with finite derivatives everywhere (the divisor
    of the unused branch is replaced, so backward never forms 0 * inf).

    Args:
        num: the numerator.
        den: the denominator.
    Returns:
        The quotient, 0 where ``den == 0``.
    """
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def widest_float(params: Params) -> torch.dtype:
    """The widest floating dtype of ``params``, at least float32.

    Args:
        params: the parameters.
    Returns:
        The dtype.
    """
    dtype = torch.float32
    for p in params.values():
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def adam_moments(updates: Params, state: Any, b1: Hyper, b2: Hyper) -> tuple[Tensor, Params, Params]:
    """Adam's step count and moments after ``updates`` (``state`` has ``count``, ``mu``, ``nu``)::

        t <- t + 1;   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2

    Args:
        updates: the gradients ``g``.
        state: the previous state.
        b1, b2: the decay rates.
    Returns:
        ``(t, m, v)``.
    """
    mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in updates.items()}
    nu = {k: b2 * state.nu[k] + (1 - b2) * g * g for k, g in updates.items()}
    return state.count + 1, mu, nu


def adam_direction(m: Tensor, v: Tensor, count: Tensor, b1: Hyper, b2: Hyper, eps: Hyper) -> Tensor:
    """Adam's bias-corrected step direction, as ``torch.optim.Adam`` computes it::

        (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    The bias corrections are in the parameters' precision (at least float32, ``float_count``):
    ``b ** count`` of the int64 count alone is float32 even for float64 parameters, which
    ``torch.optim.Adam`` is not.

    Args:
        m: the first moment.
        v: the second moment (or its running maximum, AMSGrad).
        count: the int64 step count ``t`` (after this step's increment).
        b1, b2: the decay rates.
        eps: added to the denominator.
    Returns:
        The direction, shaped like ``m``.
    """
    t = float_count(count, m)
    return (m / (1 - b1**t)) / (safe_sqrt(v) / torch.sqrt(1 - b2**t) + eps)
