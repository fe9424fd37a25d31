"""The Adam family's preconditioners beyond Adam itself (``transforms.scale_by_adam``): AMSGrad,
NAdam, RAdam, EAdam and AdaBelief, each computing what its ``torch.optim`` or
``pytorch_optimizer`` namesake computes (the trajectories are tested)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, zeros_like
from learnopt.optim.numerics import (
    adam_direction, adam_moments, count_like, div_or_zero, float_count, safe_sqrt, widest_float)
from learnopt.optim.transforms import ScaleByAdamState


class ScaleByAmsgradState(NamedTuple):
    count: Tensor
    mu: Params
    nu: Params
    nu_max: Params


def scale_by_amsgrad(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8) -> GradientTransformation:
    """AMSGrad (Reddi et al. 2018, ICLR, "On the convergence of Adam and beyond"), as
    ``torch.optim.Adam(amsgrad=True)`` (the maximum is of the raw second moment)::

        m_t, v_t as in Adam;  vmax_t = max(vmax_{t-1}, v_t)
        u_t = (m_t / (1 - b1^t)) / (sqrt(vmax_t / (1 - b2^t)) + eps)

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByAmsgradState(count_like(params), zeros_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        count, mu, nu = adam_moments(updates, state, b1, b2)
        nu_max = {k: torch.maximum(state.nu_max[k], nu[k]) for k in updates}
        out = {k: adam_direction(mu[k], nu_max[k], count, b1, b2, eps) for k in updates}
        return out, ScaleByAmsgradState(count, mu, nu, nu_max)

    return GradientTransformation(init, update)


class ScaleByNadamState(NamedTuple):
    count: Tensor
    mu_product: Tensor
    mu: Params
    nu: Params


def scale_by_nadam(
    b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8, momentum_decay: Hyper = 4e-3
) -> GradientTransformation:
    """Nadam (Dozat 2016, "Incorporating Nesterov momentum into Adam", ICLR workshop), with the
    momentum schedule of ``torch.optim.NAdam``::

        mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay));   P_t = mu_1 ... mu_t
        m_t = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) g^2;   d = sqrt(v_t / (1 - b2^t)) + eps
        u_t = (1 - mu_t) / (1 - P_t) * g / d + mu_{t+1} / (1 - P_t mu_{t+1}) * m_t / d

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
        momentum_decay: the schedule's ``momentum_decay``.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        first = next(iter(params.values()))
        return ScaleByNadamState(
            count_like(params), torch.ones((), dtype=widest_float(params), device=first.device),
            zeros_like(params), zeros_like(params),
        )

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        t = float_count(count, state.mu_product)
        mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        mu_product = state.mu_product * mu_t
        bc2 = 1 - b2**t
        mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in updates.items()}
        nu = {k: b2 * state.nu[k] + (1 - b2) * g * g for k, g in updates.items()}
        coef_g = (1 - mu_t) / (1 - mu_product)
        coef_m = mu_next / (1 - mu_product * mu_next)
        out = {}
        for k, g in updates.items():
            denom = safe_sqrt(nu[k] / bc2.to(g.dtype)) + eps
            out[k] = coef_g.to(g.dtype) * g / denom + coef_m.to(g.dtype) * mu[k] / denom
        return out, ScaleByNadamState(count, mu_product, mu, nu)

    return GradientTransformation(init, update)


def scale_by_radam(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8) -> GradientTransformation:
    """RAdam (Liu et al. 2020, arXiv 1908.03265), as ``torch.optim.RAdam``::

        m_t, v_t as in Adam;  rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
        r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        u_t = m_t / (1 - b1^t) * (r_t * sqrt(1 - b2^t) / (sqrt(v_t) + eps)  if rho_t > 5  else  1)

    (eps is added to the uncorrected ``sqrt(v_t)``, as torch does). The state is Adam's.

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByAdamState(count_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        count, mu, nu = adam_moments(updates, state, b1, b2)
        out = {}
        for k in updates:
            t = float_count(count, mu[k])
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            rho_inf = 2 / (1 - b2) - 1
            rho_t = rho_inf - 2 * t * b2**t / bc2
            rectify = rho_t > 5
            # The rectifier's argument is negative for rho_t < 4; keep it out of the graph there.
            arg = torch.where(
                rectify, (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t),
                torch.ones_like(rho_t),
            )
            adaptive = safe_sqrt(arg) * torch.sqrt(bc2) / (safe_sqrt(nu[k]) + eps)
            out[k] = mu[k] / bc1 * torch.where(rectify, adaptive, torch.ones_like(adaptive))
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def scale_by_eadam(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8) -> GradientTransformation:
    """EAdam (Yuan & Gao 2020, arXiv 2011.02150; the authors' ``EAdam.py``): Adam with eps added
    to the second moment at every step, inside the accumulation, and none outside::

        m_t = b1 m + (1 - b1) g;   v_t = b2 v + (1 - b2) g^2 + eps
        u_t = (m_t / (1 - b1^t)) / sqrt(v_t / (1 - b2^t))

    The state is Adam's.

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to ``v`` at every step.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByAdamState(count_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in updates.items()}
        nu = {k: b2 * state.nu[k] + (1 - b2) * g * g + eps for k, g in updates.items()}
        out = {}
        for k in updates:
            t = float_count(count, mu[k])
            out[k] = div_or_zero(mu[k] / (1 - b1**t), safe_sqrt(nu[k]) / torch.sqrt(1 - b2**t))
        return out, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


class ScaleByBeliefState(NamedTuple):
    count: Tensor
    mu: Params
    nu: Params


def scale_by_belief(b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-16) -> GradientTransformation:
    """AdaBelief (Zhuang et al. 2020, arXiv 2010.07468): the second moment is of the gradient's
    deviation from its running mean, with eps inside and outside (as ``pytorch_optimizer``)::

        m_t = b1 m + (1 - b1) g;   s_t = b2 s + (1 - b2) (g - m_t)^2 + eps
        u_t = (m_t / (1 - b1^t)) / (sqrt(s_t / (1 - b2^t)) + eps)

    Args:
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to ``s`` at every step and to the denominator.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByBeliefState(count_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in updates.items()}
        nu = {k: b2 * state.nu[k] + (1 - b2) * (g - mu[k]) ** 2 + eps for k, g in updates.items()}
        out = {k: adam_direction(mu[k], nu[k], count, b1, b2, eps) for k in updates}
        return out, ScaleByBeliefState(count, mu, nu)

    return GradientTransformation(init, update)
