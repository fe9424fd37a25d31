"""Building blocks that the named optimizers are chained from.

Each is a ``GradientTransformation``; hyperparameters may be floats or tensors (a tensor
that requires grad makes the hyperparameter meta-learnable). Everything is out of place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import EmptyState, GradientTransformation, Hyper, Params, zeros_like


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of inf, so no NaN appears when
    differentiating through a zero second moment (double backward at zero gradients)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _count_like(params: Params) -> Tensor:
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)


def scale(factor: Hyper) -> GradientTransformation:
    """``u <- factor * u``."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        return {k: factor * u for k, u in updates.items()}, state

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: Hyper) -> GradientTransformation:
    """``u <- -lr * u``: the descent step, with the sign convention that updates are added."""
    return scale(-lr)


def add_decayed_weights(weight_decay: Hyper) -> GradientTransformation:
    """``u <- u + weight_decay * p``. Before a preconditioner this is torch.optim's L2 penalty;
    after it (just before the learning rate) it is decoupled weight decay (AdamW)."""

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        return {k: u + weight_decay * params[k] for k, u in updates.items()}, state

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    count: Tensor
    trace: Params


def trace(momentum: Hyper, dampening: Hyper = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum as in ``torch.optim.SGD``::

        b_1 = g_1;  b_t = momentum * b_{t-1} + (1 - dampening) * g_t
        u_t = g_t + momentum * b_t  if nesterov else  b_t
    """

    def init(params):
        return TraceState(_count_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        first = state.count == 0
        new_trace = {
            k: torch.where(first, g, momentum * state.trace[k] + (1 - dampening) * g) for k, g in updates.items()
        }
        out = {k: g + momentum * new_trace[k] for k, g in updates.items()} if nesterov else new_trace
        return out, TraceState(state.count + 1, new_trace)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    square_avg: Params
    grad_avg: Params


def scale_by_rms(alpha: Hyper = 0.99, eps: Hyper = 1e-8, centered: bool = False) -> GradientTransformation:
    """RMSprop's preconditioner as in ``torch.optim.RMSprop`` (eps outside the square root)::

        s_t = alpha * s_{t-1} + (1 - alpha) * g_t^2
        a_t = alpha * a_{t-1} + (1 - alpha) * g_t            (centered only)
        u_t = g_t / (sqrt(s_t - a_t^2) + eps)
    """

    def init(params):
        return ScaleByRmsState(zeros_like(params), zeros_like(params) if centered else {})

    def update(updates, state, params=None, **extra):
        sq = {k: alpha * state.square_avg[k] + (1 - alpha) * g * g for k, g in updates.items()}
        ga = {k: alpha * state.grad_avg[k] + (1 - alpha) * g for k, g in updates.items()} if centered else {}
        out = {}
        for k, g in updates.items():
            var = sq[k] - ga[k] * ga[k] if centered else sq[k]
            out[k] = g / (safe_sqrt(var) + eps)
        return out, ScaleByRmsState(sq, ga)

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    count: Tensor
    mu: Params
    nu: Params


def scale_by_adam(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8) -> GradientTransformation:
    """Adam's preconditioner (Kingma & Ba 2014, arXiv 1412.6980), as computed by ``torch.optim.Adam``::

        m_t = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) g^2
        u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
    """

    def init(params):
        return ScaleByAdamState(_count_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in updates.items()}
        nu = {k: b2 * state.nu[k] + (1 - b2) * g * g for k, g in updates.items()}
        out = {}
        for k in updates:
            # Bias corrections in the parameters' precision (at least float32): ``b ** count`` with
            # the int64 count alone would be computed in the default dtype (float32) even for
            # float64 parameters, making float64 trajectories drift from torch.optim.Adam by ~1e-6.
            t = count.to(torch.promote_types(mu[k].dtype, torch.float32))
            bc1 = 1 - b1**t
            bc2 = 1 - b2**t
            out[k] = (mu[k] / bc1) / (safe_sqrt(nu[k]) / torch.sqrt(bc2) + eps)
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)
