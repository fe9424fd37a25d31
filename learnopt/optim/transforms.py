"""Building blocks that the named optimizers are chained from.

Each is a ``GradientTransformation``; hyperparameters may be floats or tensors (a tensor
that requires grad makes the hyperparameter meta-learnable). Everything is out of place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import EmptyState, GradientTransformation, Hyper, Params, zeros_like
from learnopt.optim.numerics import (  # noqa: F401 (safe_sqrt, adam_moments: public here too)
    adam_direction, adam_moments, count_like, div_or_zero, float_count, instance_sum, nonzero, safe_sqrt,
    widest_float)


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


# -- sign-based and secant methods ---------------------------------------------------------------
class ScaleByRpropState(NamedTuple):
    prev: Params
    step_size: Params


def scale_by_rprop(lr: Hyper = 1e-2, etas: tuple[Hyper, Hyper] = (0.5, 1.2),
                   step_sizes: tuple[Hyper, Hyper] = (1e-6, 50.0)) -> GradientTransformation:
    """Rprop's per-coordinate step sizes (Riedmiller & Braun 1992), as ``torch.optim.Rprop``
    computes them (the variant without weight backtracking, often called Rprop-)::

        s = sign(g_t * g'_{t-1});  eta = etaplus if s > 0, etaminus if s < 0, else 1
        d_t = clip(d_{t-1} * eta, step_min, step_max)          (d_0 = lr)
        g'_t = 0 if s < 0 else g_t   (after a sign change the next step adapts nothing)
        u_t = sign(g'_t) * d_t

    ``sign`` has zero derivative, so hypergradients flow
    through ``d_t`` (the product of the etas times ``lr``) and not through the gradients.

    Args:
        lr: the initial step size ``d_0`` (only that).
        etas: ``(etaminus, etaplus)``.
        step_sizes: ``(step_min, step_max)``.
    Returns:
        A ``GradientTransformation``.
    """
    etaminus, etaplus = etas
    step_min, step_max = step_sizes

    def init(params):
        return ScaleByRpropState(zeros_like(params), {k: torch.ones_like(p) * lr for k, p in params.items()})

    def update(updates, state, params=None, **extra):
        prev, steps, out = {}, {}, {}
        for k, g in updates.items():
            prod = g * state.prev[k]
            one = torch.ones_like(g)
            eta = torch.where(prod > 0, one * etaplus, torch.where(prod < 0, one * etaminus, one))
            steps[k] = torch.clamp(state.step_size[k] * eta, step_min, step_max)
            prev[k] = torch.where(prod < 0, torch.zeros_like(g), g)
            out[k] = torch.sign(prev[k]) * steps[k]
        return out, ScaleByRpropState(prev, steps)

    return GradientTransformation(init, update)


class ScaleByQuickpropState(NamedTuple):
    prev_step: Params
    prev_slope: Params


def scale_by_quickprop(lr: Hyper = 1e-2, mu: Hyper = 1.75) -> GradientTransformation:
    """Quickprop (Fahlman 1988, "An empirical study of learning speed in back-propagation
    networks", CMU-CS-88-162), the hybrid rule of the paper and of Fahlman's reference code.

    Per coordinate, with the slope ``s_t = -g_t`` (the descent direction) and the previous
    step ``D_{t-1}`` (what was added to the parameter)::

        if D_{t-1} == 0:  D_t = lr * s_t                        (first step; restarts)
        else:
            D_t = lr * s_t  if s_t * D_{t-1} > 0  else 0          (gradient term, same direction)
            if s_t * sign(D_{t-1}) > mu / (1 + mu) * s_{t-1} * sign(D_{t-1}):
                D_t += mu * D_{t-1}                               (secant step would grow > mu)
            elif s_{t-1} != s_t:
                D_t += s_t / (s_{t-1} - s_t) * D_{t-1}            (secant: jump to the parabola's min)
            else:
                D_t += lr * s_t                                   (secant undefined: gradient step)
        u_t = -D_t

    The last case (equal consecutive slopes opposing the previous step: the paper's formula
    divides by zero) is our choice. A descent step is ``-u``, as for the other ``scale_by_*``.

    Args:
        lr: the gradient-term step size.
        mu: the maximum growth factor of a step.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByQuickpropState(zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        shrink = mu / (1 + mu)
        steps, slopes, out = {}, {}, {}
        for k, g in updates.items():
            s, d_prev, s_prev = -g, state.prev_step[k], state.prev_slope[k]
            moving = d_prev != 0
            direction = torch.where(d_prev > 0, torch.ones_like(s), -torch.ones_like(s))
            gradient_step = lr * s
            gradient_term = torch.where(s * d_prev > 0, gradient_step, torch.zeros_like(s))
            capped = s * direction > shrink * s_prev * direction
            secant_ok = moving & ~capped & (s_prev != s)
            secant = div_or_zero(s, torch.where(secant_ok, s_prev - s, torch.zeros_like(s))) * d_prev
            quadratic = torch.where(capped, mu * d_prev, torch.where(secant_ok, secant, gradient_step))
            steps[k] = torch.where(moving, gradient_term + quadratic, gradient_step)
            slopes[k] = s
            out[k] = -steps[k]
        return out, ScaleByQuickpropState(steps, slopes)

    return GradientTransformation(init, update)


class ScaleBySignState(NamedTuple):
    count: Tensor
    mu: Params
    nu: Params


def scale_by_generalized_sign(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8,
                              use_bias_correction: bool = False) -> GradientTransformation:
    """Generalized SignSGD (Crawshaw et al. 2022, arXiv 2208.11195, Algorithm 1; as in the
    authors' ``GeneralizedSignSGD``): Adam with the second moment taken of the *momentum*::

        m_t = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) m_t^2
        u_t = m_t / (sqrt(v_t) + eps)          (bias-corrected m, v if use_bias_correction)

    ``b2 = 0, eps = 0`` is SignSGD with momentum (signum, ``sign(m_t)``); ``b1 = b2 = 0`` too is
    SignSGD; ``b2 -> 1`` is close to Adam. Where ``sqrt(v) + eps == 0`` (no gradient yet) the
    update is 0, like ``sign(0)``. With a literal ``b2 = 0`` and ``eps = 0`` the update is
    ``sign(m_t)`` itself and no ``v`` is kept (``nu`` is empty), as signum keeps only the momentum.

    Args:
        b1: decay rate of the momentum.
        b2: decay rate of ``v``.
        eps: added to the denominator.
        use_bias_correction: bias-correct ``m`` and ``v``.
    Returns:
        A ``GradientTransformation``.
    """
    signum = not nonzero(b2) and not nonzero(eps)

    def init(params):
        return ScaleBySignState(count_like(params), zeros_like(params), {} if signum else zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in updates.items()}
        if signum:  # m / sqrt(m^2) with v = m^2 (b2 = 0): sign(m), over 1 - b1^t with bias correction
            out = {k: torch.sign(m) for k, m in mu.items()}
            if use_bias_correction:
                out = {k: u / (1 - b1 ** float_count(count, u)) for k, u in out.items()}
            return out, ScaleBySignState(count, mu, {})
        nu = {k: b2 * state.nu[k] + (1 - b2) * mu[k] * mu[k] for k in updates}
        out = {}
        for k in updates:
            m, v = mu[k], nu[k]
            if use_bias_correction:
                t = float_count(count, m)
                m, v = m / (1 - b1**t), v / (1 - b2**t)
            out[k] = div_or_zero(m, safe_sqrt(v) + eps)
        return out, ScaleBySignState(count, mu, nu)

    return GradientTransformation(init, update)


class ScaleByLionState(NamedTuple):
    mu: Params


def scale_by_lion(b1: Hyper = 0.9, b2: Hyper = 0.99) -> GradientTransformation:
    """Lion's update direction (Chen et al. 2023, arXiv 2302.06675, "Symbolic discovery of
    optimization algorithms")::

        u_t = sign(b1 m + (1 - b1) g);   m_t = b2 m + (1 - b2) g

    Args:
        b1: interpolation rate of the update direction.
        b2: decay rate of the momentum.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByLionState(zeros_like(params))

    def update(updates, state, params=None, **extra):
        out = {k: torch.sign(b1 * state.mu[k] + (1 - b1) * g) for k, g in updates.items()}
        mu = {k: b2 * state.mu[k] + (1 - b2) * g for k, g in updates.items()}
        return out, ScaleByLionState(mu)

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
