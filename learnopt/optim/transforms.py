"""Building blocks that the named optimizers are chained from.

Each is a ``GradientTransformation``; hyperparameters may be floats or tensors (a tensor
that requires grad makes the hyperparameter meta-learnable). Everything is out of place.
The sign-based and secant preconditioners (Rprop, Quickprop, generalized SignSGD, Lion) live in
``learnopt.optim.sign_secant`` and are importable from here too; the Adam family beyond Adam
is in ``learnopt.optim.adam_family``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import EmptyState, GradientTransformation, Hyper, Params, zeros_like
from learnopt.optim.numerics import (  # noqa: F401 (safe_sqrt, adam_moments: public here too)
    adam_direction, adam_moments, count_like, div_or_zero, float_count, instance_sum, safe_sqrt, widest_float)
from learnopt.optim.sign_secant import (  # noqa: F401 (public here too)
    ScaleByLionState, ScaleByQuickpropState, ScaleByRpropState, ScaleBySignState, scale_by_generalized_sign,
    scale_by_lion, scale_by_quickprop, scale_by_rprop)


def scale(factor: Hyper) -> GradientTransformation:
    """``u <- factor * u``.

    Args:
        factor: the multiplier (float or tensor).
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        return {k: factor * u for k, u in updates.items()}, state

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: Hyper) -> GradientTransformation:
    """``u <- -lr * u``: the descent step, with the sign convention that updates are added.

    Args:
        lr: the learning rate.
    Returns:
        A ``GradientTransformation``.
    """
    return scale(-lr)


def add_decayed_weights(weight_decay: Hyper) -> GradientTransformation:
    """``u <- u + weight_decay * p``. Before a preconditioner this is torch.optim's L2 penalty;
    after it (just before the learning rate) it is decoupled weight decay (AdamW).

    Args:
        weight_decay: the coefficient of ``p``.
    Returns:
        A ``GradientTransformation``.
    """

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

    Args:
        momentum: momentum factor.
        dampening: dampening of the gradient term.
        nesterov: return the Nesterov look-ahead ``g + momentum * b``.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return TraceState(count_like(params), zeros_like(params))

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

    Args:
        alpha: decay rate of the averages.
        eps: added to the denominator.
        centered: subtract the squared mean gradient ``a_t^2``.
    Returns:
        A ``GradientTransformation``.
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


def scale_by_adam(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8,
                  bias_correction: bool = True) -> GradientTransformation:
    """Adam's preconditioner (Kingma & Ba 2014, arXiv 1412.6980), as computed by ``torch.optim.Adam``::

        m_t = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) g^2
        u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

    ``bias_correction=False`` drops both ``1 - b^t`` factors: ``u_t = m_t / (sqrt(v_t) + eps)``.

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
        bias_correction: divide the moments by ``1 - b^t``.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByAdamState(count_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        count, mu, nu = adam_moments(updates, state, b1, b2)
        if bias_correction:
            out = {k: adam_direction(mu[k], nu[k], count, b1, b2, eps) for k in updates}
        else:
            out = {k: mu[k] / (safe_sqrt(nu[k]) + eps) for k in updates}
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


# -- accumulating preconditioners ----------------------------------------------------------------
class ScaleByAdagradState(NamedTuple):
    sum: Params


def scale_by_adagrad(initial_accumulator_value: Hyper = 0.0, eps: Hyper = 1e-10) -> GradientTransformation:
    """Adagrad's preconditioner (Duchi et al. 2011, JMLR), as ``torch.optim.Adagrad``::

        s_t = s_{t-1} + g_t^2   (s_0 = initial_accumulator_value);   u_t = g_t / (sqrt(s_t) + eps)

    Args:
        initial_accumulator_value: ``s_0``.
        eps: added to the denominator.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByAdagradState({k: torch.zeros_like(p) + initial_accumulator_value for k, p in params.items()})

    def update(updates, state, params=None, **extra):
        acc = {k: state.sum[k] + g * g for k, g in updates.items()}
        return {k: g / (safe_sqrt(acc[k]) + eps) for k, g in updates.items()}, ScaleByAdagradState(acc)

    return GradientTransformation(init, update)


class ScaleByLrDecayState(NamedTuple):
    count: Tensor


def scale_by_lr_decay(lr_decay: Hyper) -> GradientTransformation:
    """``u <- u / (1 + (t - 1) * lr_decay)`` at step ``t``: ``torch.optim.Adagrad``'s ``lr_decay``.

    Args:
        lr_decay: the decay rate.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByLrDecayState(count_like(params))

    def update(updates, state, params=None, **extra):
        out = {k: u / (1 + float_count(state.count, u) * lr_decay) for k, u in updates.items()}
        return out, ScaleByLrDecayState(state.count + 1)

    return GradientTransformation(init, update)


class ScaleByAdagradNormState(NamedTuple):
    b_sq: Tensor


def scale_by_adagrad_norm(b0: Hyper = 1e-2, batch_dims: int = 0) -> GradientTransformation:
    """AdaGrad-Norm's scalar step size (Ward, Wu & Bottou 2018, arXiv 1806.01811, Algorithm 1)::

        b_t^2 = b_{t-1}^2 + ||g_t||^2   (norm over all parameters together);   u_t = g_t / b_t

    ``b_t = 0`` (``b0 = 0`` and no gradient yet) gives ``u = 0``.

    Args:
        b0: ``b_0``.
        batch_dims: leading task-instance dimensions, shared by all parameters, each with its own ``b``.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        first = next(iter(params.values()))
        return ScaleByAdagradNormState(
            torch.zeros(first.shape[:batch_dims], dtype=widest_float(params), device=first.device) + b0 * b0
        )

    def update(updates, state, params=None, **extra):
        b_sq = state.b_sq
        for g in updates.values():
            b_sq = b_sq + instance_sum(g * g, batch_dims).reshape(g.shape[:batch_dims])
        b = safe_sqrt(b_sq)
        out = {}
        for k, g in updates.items():
            out[k] = div_or_zero(g, b.reshape(b.shape + (1,) * (g.dim() - batch_dims)).to(g.dtype))
        return out, ScaleByAdagradNormState(b_sq)

    return GradientTransformation(init, update)


class ScaleByAdadeltaState(NamedTuple):
    square_avg: Params
    acc_delta: Params


def scale_by_adadelta(rho: Hyper = 0.9, eps: Hyper = 1e-6) -> GradientTransformation:
    """Adadelta (Zeiler 2012, arXiv 1212.5701), as ``torch.optim.Adadelta``::

        v_t = rho v + (1 - rho) g^2
        u_t = sqrt(a_{t-1} + eps) / sqrt(v_t + eps) * g
        a_t = rho a + (1 - rho) u_t^2

    Args:
        rho: decay rate of both averages.
        eps: added inside both square roots.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByAdadeltaState(zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        sq, acc, out = {}, {}, {}
        for k, g in updates.items():
            sq[k] = rho * state.square_avg[k] + (1 - rho) * g * g
            out[k] = div_or_zero(safe_sqrt(state.acc_delta[k] + eps), safe_sqrt(sq[k] + eps)) * g
            acc[k] = rho * state.acc_delta[k] + (1 - rho) * out[k] * out[k]
        return out, ScaleByAdadeltaState(sq, acc)

    return GradientTransformation(init, update)


# -- layer-wise ----------------------------------------------------------------------------------
def scale_by_trust_ratio(eps: Hyper = 0.0, clamp_value: Hyper | None = None,
                         batch_dims: int = 0) -> GradientTransformation:
    """LAMB's layer-wise trust ratio (You et al. 2020, arXiv 1904.00962), per parameter tensor
    and per task instance (norms over all but the first ``batch_dims`` dimensions)::

        w = min(||p||, clamp_value);  n = ||u||
        u <- u * (w / (n + eps)  if w > 0 and n > 0  else 1)

    Args:
        eps: added to ``n``.
        clamp_value: upper bound on ``||p||`` (None: none).
        batch_dims: leading task-instance dimensions.
    Returns:
        A ``GradientTransformation``.
    """

    def norm(x: Tensor) -> Tensor:
        # safe_sqrt: the norm of an all-zero tensor has derivative 0, not NaN.
        return safe_sqrt(instance_sum(x * x, batch_dims))

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs params")
        out = {}
        for k, u in updates.items():
            w = norm(params[k].to(u.dtype))
            if clamp_value is not None:
                w = torch.clamp(w, max=clamp_value)
            n = norm(u)
            ok = (w > 0) & (n > 0)
            ratio = torch.where(ok, w / torch.where(ok, n + eps, torch.ones_like(n)), torch.ones_like(n))
            out[k] = u * ratio
        return out, state

    return GradientTransformation(init, update)
