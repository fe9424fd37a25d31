"""Sign-based and secant preconditioners: Rprop, Quickprop, generalized SignSGD (signum) and
Lion, each a ``GradientTransformation`` as in ``learnopt.optim.transforms`` (and importable from
there), computing what its ``torch.optim`` namesake or the authors' code computes (the
trajectories are tested)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, zeros_like
from learnopt.optim.numerics import count_like, div_or_zero, float_count, nonzero, safe_sqrt


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
