"""Named hand-designed optimizers, chained from ``transforms``.

Hyperparameters are named as in ``torch.optim`` and have its defaults, and each factory
computes the same trajectory as its ``torch.optim`` namesake (tested). Methods torch lacks
follow ``pytorch_optimizer`` (AdaBelief, Lion, LAMB, Lookahead) or the authors' code / paper
(Quickprop, generalized SignSGD, AdaGrad-Norm, EAdam), with those names and defaults.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learnopt.optim.adam_family import scale_by_amsgrad, scale_by_belief, scale_by_eadam, scale_by_nadam, scale_by_radam
from learnopt.optim.base import GradientTransformation, Hyper, Params, State, chain, rebuildable
from learnopt.optim.numerics import count_like, nonzero
from learnopt.optim.transforms import (
    add_decayed_weights,
    scale,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adagrad_norm,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lr_decay,
    scale_by_rms,
    scale_by_trust_ratio,
    trace,
)
from learnopt.optim.sign_secant import scale_by_generalized_sign, scale_by_lion, scale_by_quickprop, scale_by_rprop


def _decay(weight_decay: Hyper) -> list[GradientTransformation]:
    """``u <- u + weight_decay * p`` unless the decay is a literal 0. Before a preconditioner it is
    torch.optim's L2 penalty (added to the gradient before anything else). After it, just
    before the learning rate, it is decoupled weight decay (Loshchilov & Hutter 2017): the step
    is ``-lr * (u + weight_decay * p)``, torch's ``p *= 1 - lr * weight_decay`` followed by the
    preconditioned step."""
    return [add_decayed_weights(weight_decay)] if nonzero(weight_decay) else []


def _weight_decay(weight_decay: Hyper, decoupled: bool) -> tuple[list, list]:
    """(before, after) the preconditioner: L2 into the gradient, or decoupled."""
    return ([], _decay(weight_decay)) if decoupled else (_decay(weight_decay), [])


@rebuildable
def sgd(lr: Hyper = 1e-3, momentum: Hyper = 0.0, dampening: Hyper = 0.0, weight_decay: Hyper = 0.0,
        nesterov: bool = False) -> GradientTransformation:
    """Stochastic gradient descent (Robbins & Monro 1951), ``torch.optim.SGD``::

        g <- g + weight_decay * p;  b <- momentum * b + (1 - dampening) * g  (if momentum)
        p <- p - lr * (g + momentum * b  if nesterov else  b)

    Args:
        lr: learning rate.
        momentum: momentum factor (0: no momentum buffer).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
        nesterov: use Nesterov momentum.
    Returns:
        A ``GradientTransformation``.
    """
    parts = _decay(weight_decay)
    if nonzero(momentum) or nesterov:
        parts.append(trace(momentum, dampening, nesterov))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


@rebuildable
def momentum(lr: Hyper = 1e-3, momentum: Hyper = 0.9, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """SGD with heavy-ball momentum (Polyak 1964): ``torch.optim.SGD(momentum=0.9)``.

    Args:
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return sgd(lr=lr, momentum=momentum, weight_decay=weight_decay)


@rebuildable
def nesterov(lr: Hyper = 1e-3, momentum: Hyper = 0.9, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Nesterov accelerated gradient in Sutskever et al.'s (2013) form: ``torch.optim.SGD(nesterov=True)``.

    Args:
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return sgd(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


@rebuildable
def rmsprop(lr: Hyper = 1e-2, alpha: Hyper = 0.99, eps: Hyper = 1e-8, weight_decay: Hyper = 0.0, momentum: Hyper = 0.0,
            centered: bool = False) -> GradientTransformation:
    """RMSprop (Hinton, Coursera lecture 6e), ``torch.optim.RMSprop``::

        s <- alpha s + (1 - alpha) g^2;   u = g / (sqrt(s) + eps)
        b <- momentum b + u  (if momentum);   p <- p - lr * (b or u)

    Args:
        lr: learning rate.
        alpha: decay rate of the squared-gradient average.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
        momentum: momentum factor (0: none).
        centered: divide by the estimated variance ``s - mean(g)^2`` instead of ``s``.
    Returns:
        A ``GradientTransformation``.
    """
    parts = _decay(weight_decay) + [scale_by_rms(alpha, eps, centered)]
    if nonzero(momentum):
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


@rebuildable
def adam(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
         weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Adam (Kingma & Ba 2014, arXiv 1412.6980), ``torch.optim.Adam``::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(*_decay(weight_decay), scale_by_adam(betas[0], betas[1], eps), scale_by_learning_rate(lr))


# -- sign-based and secant methods ---------------------------------------------------------------
@rebuildable
def rprop(lr: Hyper = 1e-2, etas: tuple[Hyper, Hyper] = (0.5, 1.2),
          step_sizes: tuple[Hyper, Hyper] = (1e-6, 50.0)) -> GradientTransformation:
    """Rprop (Riedmiller & Braun 1992, ICNN), ``torch.optim.Rprop`` (Rprop without backtracking)::

        eta = etaplus if g_t g'_{t-1} > 0, etaminus if < 0, else 1
        d_t = clip(d_{t-1} * eta, *step_sizes)  (d_0 = lr);   g'_t = 0 if g_t g'_{t-1} < 0 else g_t
        p <- p - sign(g'_t) * d_t

    Args:
        lr: initial step size ``d_0`` of every coordinate.
        etas: ``(etaminus, etaplus)``, the step-size factors on a sign change and on no change.
        step_sizes: ``(min, max)``, the clip range of the step sizes.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(scale_by_rprop(lr, etas, step_sizes), scale(-1.0))


@rebuildable
def quickprop(lr: Hyper = 1e-2, mu: Hyper = 1.75, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Quickprop (Fahlman 1988, CMU-CS-88-162): per coordinate, a secant (parabola) step from the
    last two slopes, growing by at most ``mu`` per step, plus a gradient term ``-lr * g`` while the
    slope still points the way of the last step; gradient descent ``-lr * g`` where the last
    step was zero (the first step). Weight decay is Fahlman's decay term, added to the
    gradient. The exact rule is in ``scale_by_quickprop``.

    Args:
        lr: gradient-term step size (and the plain-gradient step where the last step was 0).
        mu: maximum growth factor of a step over the last one.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(*_decay(weight_decay), scale_by_quickprop(lr, mu), scale(-1.0))


@rebuildable
def sign_sgd(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8, weight_decay: Hyper = 0.0,
             use_bias_correction: bool = False) -> GradientTransformation:
    """Generalized SignSGD (Crawshaw et al. 2022, NeurIPS, arXiv 2208.11195), defaults and L2
    weight decay as in the authors' ``GeneralizedSignSGD``::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) m^2;   p <- p - lr * m / (sqrt(v) + eps)

    ``betas=(beta, 0), eps=0`` is signum (SignSGD with momentum: ``p <- p - lr * sign(m)``);
    ``betas=(0, 0), eps=0`` is SignSGD (Bernstein et al. 2018).

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the momentum ``m`` and of ``v``.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
        use_bias_correction: divide ``m`` and ``v`` by ``1 - b^t``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(
        *_decay(weight_decay), scale_by_generalized_sign(betas[0], betas[1], eps, use_bias_correction),
        scale_by_learning_rate(lr),
    )


@rebuildable
def lion(lr: Hyper = 1e-4, betas: tuple[Hyper, Hyper] = (0.9, 0.99), weight_decay: Hyper = 0.0,
         weight_decouple: bool = True) -> GradientTransformation:
    """Lion (Chen et al. 2023, arXiv 2302.06675), as ``pytorch_optimizer.Lion``::

        u = sign(b1 m + (1 - b1) g);   m <- b2 m + (1 - b2) g
        p <- p - lr * (u + weight_decay * p)          (weight_decouple; else g += weight_decay * p)

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, the interpolation rate of the step and the momentum decay.
        weight_decay: weight decay coefficient.
        weight_decouple: decoupled decay (else L2 into the gradient).
    Returns:
        A ``GradientTransformation``.
    """
    before, after = _weight_decay(weight_decay, weight_decouple)
    return chain(*before, scale_by_lion(betas[0], betas[1]), *after, scale_by_learning_rate(lr))


# -- accumulating preconditioners ----------------------------------------------------------------
@rebuildable
def adagrad(lr: Hyper = 1e-2, lr_decay: Hyper = 0.0, weight_decay: Hyper = 0.0, initial_accumulator_value: Hyper = 0.0,
            eps: Hyper = 1e-10) -> GradientTransformation:
    """Adagrad (Duchi, Hazan & Singer 2011, JMLR), ``torch.optim.Adagrad``::

        g <- g + weight_decay * p;   s <- s + g^2   (s_0 = initial_accumulator_value)
        p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)

    Args:
        lr: learning rate.
        lr_decay: the learning-rate decay in ``lr / (1 + (t - 1) lr_decay)``.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
        initial_accumulator_value: ``s_0``.
        eps: added to the denominator for numerical stability.
    Returns:
        A ``GradientTransformation``.
    """
    parts = _decay(weight_decay) + [scale_by_adagrad(initial_accumulator_value, eps)]
    if nonzero(lr_decay):
        parts.append(scale_by_lr_decay(lr_decay))
    return chain(*parts, scale_by_learning_rate(lr))


@rebuildable
def adagrad_norm(lr: Hyper = 1.0, b0: Hyper = 1e-2, batch_dims: int = 0) -> GradientTransformation:
    """AdaGrad-Norm (Ward, Wu & Bottou 2018, arXiv 1806.01811): one scalar step size per task
    instance from the accumulated squared norm of the whole gradient::

        b_t^2 = b_{t-1}^2 + ||g_t||^2;   p <- p - lr / b_t * g_t

    The defaults are ours: with eta = 1 the first step has length about 1 when ``b0`` is small.

    Args:
        lr: the paper's eta.
        b0: the paper's ``b_0 > 0``.
        batch_dims: leading dimensions that index task instances, each with its own ``b``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(scale_by_adagrad_norm(b0, batch_dims), scale_by_learning_rate(lr))


@rebuildable
def adadelta(lr: Hyper = 1.0, rho: Hyper = 0.9, eps: Hyper = 1e-6, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Adadelta (Zeiler 2012, arXiv 1212.5701), ``torch.optim.Adadelta``::

        v <- rho v + (1 - rho) g^2;   d = sqrt(a + eps) / sqrt(v + eps) * g;   a <- rho a + (1 - rho) d^2
        p <- p - lr * d

    Args:
        lr: multiplier of the step ``d``.
        rho: decay rate of both running averages.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(*_decay(weight_decay), scale_by_adadelta(rho, eps), scale_by_learning_rate(lr))


# -- Adam family ---------------------------------------------------------------------------------
@rebuildable
def adamw(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
          weight_decay: Hyper = 1e-2) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2017, arXiv 1711.05101), ``torch.optim.AdamW``::

        u = Adam's preconditioned step;   p <- p - lr * (u + weight_decay * p)

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay coefficient.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(scale_by_adam(betas[0], betas[1], eps), *_decay(weight_decay), scale_by_learning_rate(lr))


@rebuildable
def amsgrad(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
            weight_decay: Hyper = 0.0) -> GradientTransformation:
    """AMSGrad (Reddi, Kale & Kumar 2018, ICLR), ``torch.optim.Adam(amsgrad=True)``::

        vmax <- max(vmax, v);   p <- p - lr * (m / (1 - b1^t)) / (sqrt(vmax / (1 - b2^t)) + eps)

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(*_decay(weight_decay), scale_by_amsgrad(betas[0], betas[1], eps), scale_by_learning_rate(lr))


@rebuildable
def nadam(lr: Hyper = 2e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8, weight_decay: Hyper = 0.0,
          momentum_decay: Hyper = 4e-3, decoupled_weight_decay: bool = False) -> GradientTransformation:
    """Nadam (Dozat 2016, ICLR workshop), ``torch.optim.NAdam``: Adam with a Nesterov look-ahead
    on the momentum and the momentum schedule ``mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))``
    (pseudo-code in ``scale_by_nadam``); L2 or decoupled weight decay as torch.

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to the denominator for numerical stability.
        weight_decay: weight decay coefficient (L2 unless ``decoupled_weight_decay``).
        momentum_decay: the ``momentum_decay`` of the momentum schedule.
        decoupled_weight_decay: decoupled decay (AdamW's) instead of L2.
    Returns:
        A ``GradientTransformation``.
    """
    before, after = _weight_decay(weight_decay, decoupled_weight_decay)
    return chain(
        *before, scale_by_nadam(betas[0], betas[1], eps, momentum_decay), *after, scale_by_learning_rate(lr)
    )


@rebuildable
def radam(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8, weight_decay: Hyper = 0.0,
          decoupled_weight_decay: bool = False) -> GradientTransformation:
    """RAdam (Liu et al. 2020, ICLR, arXiv 1908.03265), ``torch.optim.RAdam``: Adam whose
    adaptive step is switched on once the variance of its estimate is tractable (rho_t > 5)
    and then rectified; SGD with momentum before (pseudo-code in ``scale_by_radam``).

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to the denominator for numerical stability.
        weight_decay: weight decay coefficient (L2 unless ``decoupled_weight_decay``).
        decoupled_weight_decay: decoupled decay (AdamW's) instead of L2.
    Returns:
        A ``GradientTransformation``.
    """
    before, after = _weight_decay(weight_decay, decoupled_weight_decay)
    return chain(*before, scale_by_radam(betas[0], betas[1], eps), *after, scale_by_learning_rate(lr))


@rebuildable
def eadam(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-8,
          weight_decay: Hyper = 0.0) -> GradientTransformation:
    """EAdam (Yuan & Gao 2020, arXiv 2011.02150), the authors' ``EAdam.py`` (L2 weight decay)::

        v <- b2 v + (1 - b2) g^2 + eps;   p <- p - lr * (m / (1 - b1^t)) / sqrt(v / (1 - b2^t))

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to ``v`` at every step.
        weight_decay: L2 penalty, added to the gradient as ``weight_decay * p``.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(*_decay(weight_decay), scale_by_eadam(betas[0], betas[1], eps), scale_by_learning_rate(lr))


@rebuildable
def adabelief(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-16,
              weight_decay: Hyper = 0.0, weight_decouple: bool = True,
              fixed_decay: bool = False) -> GradientTransformation:
    """AdaBelief (Zhuang et al. 2020, NeurIPS, arXiv 2010.07468), ``pytorch_optimizer.AdaBelief``
    with ``rectify=False, ams_bound=False`` (its defaults)::

        s <- b2 s + (1 - b2) (g - m)^2 + eps;   u = (m / (1 - b1^t)) / (sqrt(s / (1 - b2^t)) + eps)
        p <- p - lr * (u + weight_decay * p)   (weight_decouple; fixed_decay: p - lr u - weight_decay p;
                                                 else L2: g <- g + weight_decay * p)

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to ``s`` at every step and to the denominator.
        weight_decay: weight decay coefficient.
        weight_decouple: decoupled decay (else L2 into the gradient).
        fixed_decay: with ``weight_decouple``, a decay not scaled by ``lr``.
    Returns:
        A ``GradientTransformation``.
    """
    parts = [] if weight_decouple else _decay(weight_decay)
    parts.append(scale_by_belief(betas[0], betas[1], eps))
    if weight_decouple and not fixed_decay:
        parts += _decay(weight_decay)
    parts.append(scale_by_learning_rate(lr))
    if weight_decouple and fixed_decay and nonzero(weight_decay):
        parts.append(add_decayed_weights(-weight_decay))  # after the learning rate: not scaled by it
    return chain(*parts)


@rebuildable
def lamb(lr: Hyper = 1e-3, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-6, weight_decay: Hyper = 0.0,
         clamp_value: Hyper | None = 10.0, bias_correction: bool = True, batch_dims: int = 0) -> GradientTransformation:
    """LAMB (You et al. 2020, ICLR, arXiv 1904.00962, Algorithm 2), trust ratio per parameter
    tensor and per task instance::

        r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p      (m_hat, v_hat bias-corrected)
        p <- p - lr * min(||p||, clamp_value) / (||r|| + eps) * r     (ratio 1 if a norm is 0)

    ``bias_correction=False`` uses ``m, v`` as they are; that is
    ``pytorch_optimizer.Lamb(weight_decouple=False, adam_debias=True)`` (its clamp is 10 too).

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of the first and second moments.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay, added to ``r``.
        clamp_value: upper bound on ``||p||`` in the trust ratio (None: no bound).
        bias_correction: bias-correct ``m`` and ``v``.
        batch_dims: leading task-instance dimensions, each with its own trust ratio.
    Returns:
        A ``GradientTransformation``.
    """
    return chain(
        scale_by_adam(betas[0], betas[1], eps, bias_correction=bias_correction),
        *_decay(weight_decay),
        scale_by_trust_ratio(eps, clamp_value, batch_dims),
        scale_by_learning_rate(lr),
    )


# -- wrappers ------------------------------------------------------------------------------------
class LookaheadState(NamedTuple):
    """``lookahead``'s state: step count, slow weights, the inner optimizer's state."""

    count: Tensor
    slow: Params
    inner: State


@rebuildable
def lookahead(optimizer: GradientTransformation, k: int = 5, alpha: Hyper = 0.5) -> GradientTransformation:
    """Lookahead (Zhang, Lucas, Hinton & Ba 2019, arXiv 1907.08610) around any transform, as
    ``pytorch_optimizer.Lookahead`` (``pullback_momentum='none'``)::

        fast <- fast + optimizer's update                  (every step)
        every k-th step:  slow <- slow + alpha (fast - slow);  fast <- slow

    The reset of the fast weights is returned as an update (``slow - p``), so ``apply_updates``
    works unchanged; the slow weights (initialised to the parameters) live in the state, the
    inner optimizer's state is kept across synchronisations.

    Args:
        optimizer: the inner (fast) ``GradientTransformation``.
        k: synchronisation period, in steps.
        alpha: slow-weights step size.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return LookaheadState(count_like(params), {n: p.clone() for n, p in params.items()}, optimizer.init(params))

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("lookahead needs params")
        inner_updates, inner = optimizer.update(updates, state.inner, params, **extra)
        count = state.count + 1
        sync = count % k == 0
        out, slow = {}, {}
        for n, u in inner_updates.items():
            fast = params[n] + u.to(params[n].dtype)
            new_slow = state.slow[n] + alpha * (fast - state.slow[n])
            slow[n] = torch.where(sync, new_slow, state.slow[n])
            out[n] = torch.where(sync, new_slow - params[n], u)
        return out, LookaheadState(count, slow, inner)

    return GradientTransformation(init, update)
