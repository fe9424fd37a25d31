"""Meta-losses of the RNN proposer (Chen et al. 2017, arXiv 1611.03824), for minimisation.

For a run of observations ``y_1 … y_T`` (``ys`` ``[n, T]``):

``L_sum = (1/T) Σ_t y_t``
    every query should be good (exploitation throughout).
``L_OI = Σ_t min(y_t − min_{i<t} y_i, 0)``  (observed improvement)
    only improvements count. For ``t ≥ 2`` the terms telescope to ``best_T − y_1``, which on its
    own *rewards a bad first query*; we add the ``t = 1`` term ``y_1`` (the improvement over
    nothing), so ``L_OI = best_T``, the best observation of the run. Its gradient flows into the
    query that found the best value and, through the GP conditional, into every earlier one.
``L_EI = −(1/T) Σ_t EI(x_t | y_{<t})``  (expected improvement under the GP posterior)
    needs the posterior of the training function (``tasks.blackbox_episodes`` supplies it from the
    GP sampler); the incumbent at ``t = 1`` is the prior mean 0.

Each returns the mean over instances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sum_loss(ys: Tensor) -> Tensor:
    """``L_sum`` (module docstring).

    Args:
        ys: ``[n, T]`` observations of a run, in order.
    Returns:
        The mean over instances, a scalar.
    """
    return ys.mean()


def observed_improvement_loss(ys: Tensor) -> Tensor:
    """``L_OI = best_T`` (module docstring).

    Args:
        ys: ``[n, T]`` observations of a run, in order.
    Returns:
        The mean over instances, a scalar.
    """
    prev_best = torch.cummin(ys, dim=1).values[:, :-1]
    gains = torch.clamp(ys[:, 1:] - prev_best, max=0.0)
    return (ys[:, 0] + gains.sum(1)).mean()


def expected_improvement(mean: Tensor, var: Tensor, best: Tensor) -> Tensor:
    """Closed-form EI for minimisation, ``E max(best − f, 0)`` with ``f ~ N(mean, var)``:
    ``(best − μ) Φ(z) + σ φ(z)``, ``z = (best − μ)/σ``; elementwise, differentiable, finite at
    ``var = 0`` (where it is ``max(best − μ, 0)``).

    Args:
        mean: posterior mean ``μ``.
        var: posterior variance ``σ²``.
        best: the incumbent, broadcast against ``mean``.
    Returns:
        EI, elementwise.
    """
    sigma = torch.sqrt(var.clamp_min(1e-18))
    z = (best - mean) / sigma
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (best - mean) * cdf + sigma * pdf


def expected_improvement_loss(eis: Tensor) -> Tensor:
    """``L_EI`` from the EI of each query when it was made.

    Args:
        eis: ``[n, T]``.
    Returns:
        ``L_EI``, a scalar.
    """
    return -eis.mean()


META_LOSSES = ("sum", "oi", "ei")
