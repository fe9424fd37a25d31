"""Optimizers that precondition by an estimate of the Hessian diagonal.

``adahessian`` and ``sophia`` estimate ``diag(H)`` with Hutchinson's estimator
``D = mean_i z_i * (H z_i)`` from Hessian-vector products (``hvp_fn``, or derived from ``loss_fn``;
see ``learnopt.optim.extra``; a ``loss_fn`` returning per-instance losses is summed). ``apollo``
needs no Hessian-vector products: it fits a diagonal quasi-Newton matrix to gradient differences.

Reproducible probes: the probe vectors ``z`` come from a ``torch.Generator`` seeded with ``seed``
at construction; its state (a uint8 tensor) lives in the optimizer state, so a run is a pure
function of the seed, and saving and loading the state continues the same probe sequence. Probes
are drawn on the CPU in the parameters' dtype (the same numbers on every device) and moved to the
parameters' device. A generator seeded with ``s`` draws exactly what ``torch.manual_seed(s)``
followed by ``torch.randint_like`` / ``torch.randn_like`` draws on the CPU, which is how the tests
reproduce pytorch_optimizer's probes. The extra argument ``probes`` (a ``Params``, or a list of
``num_samples`` of them) replaces the drawn probes for one step and leaves the generator as it is
(deterministic tests, batched-equals-per-instance checks, common random numbers).

Differentiating through the Hessian estimate (meta-training): products derived from ``loss_fn``
stay in the graph whenever the parameters are part of one (``learnopt.optim.extra.hvp_fn_from``);
an explicit ``hvp_fn`` is used as given.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, zeros_like, rebuildable
from learnopt.optim.extra import hvp_fn_from
from learnopt.optim.numerics import count_like, instance_sum, nonzero, safe_sqrt

DISTRIBUTIONS = ("rademacher", "gaussian")


# -- Hutchinson's estimator -------------------------------------------------------------------
def _initial_rng_state(seed: int) -> Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def _draw_probes(rng_state: Tensor, params: Params, num_samples: int, distribution: str
                 ) -> tuple[list[Params], Tensor]:
    gen = torch.Generator()
    gen.set_state(rng_state.detach().cpu())
    probes = []
    for _ in range(num_samples):
        z = {}
        for k, p in params.items():
            if distribution == "rademacher":
                r = torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2.0 - 1.0
            else:
                r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            z[k] = r.to(p.device)
        probes.append(z)
    return probes, gen.get_state()


def hutchinson_diagonal(hvp_fn: Callable[[Params], Params], probes: list[Params]) -> Params:
    """``mean_i z_i * (H z_i)``: an unbiased estimate of ``diag(H)`` when ``E[z z^T] = I``
    (Hutchinson 1990; Bekas, Kokiopoulou & Saad 2007).

    Args:
        hvp_fn: ``hvp_fn(v) -> H v``.
        probes: the probe vectors ``z_i``.
    Returns:
        The estimate of ``diag(H)``, keyed as the probes.
    """
    total: Params = {}
    for z in probes:
        hz = hvp_fn(z)
        for k in z:
            term = hz[k] * z[k] * (1.0 / len(probes))
            total[k] = term if k not in total else total[k] + term
    return total


def _hessian_diagonal(extra: dict[str, Any], params: Params, rng: Tensor, num_samples: int,
                      distribution: str, who: str) -> tuple[Params, Tensor]:
    if params is None:
        raise ValueError(f"{who} needs params (Hessian-vector products are taken at them)")
    probes = extra.get("probes")
    if probes is not None:
        probes = [probes] if isinstance(probes, dict) else list(probes)
    else:
        probes, rng = _draw_probes(rng, params, num_samples, distribution)
    return hutchinson_diagonal(hvp_fn_from(_summed_loss(extra), params, who), probes), rng


def _summed_loss(extra: dict[str, Any]) -> dict[str, Any]:
    """Per-instance losses (shape ``batch_shape``, what ``lbfgs`` with ``batch_dims`` takes) are summed:
    the Hessian of the sum is block-diagonal, each instance's own Hessian."""
    loss_fn = extra.get("loss_fn")
    if loss_fn is None or extra.get("hvp_fn") is not None:
        return extra
    return {**extra, "loss_fn": lambda p: loss_fn(p).sum()}


def _check(distribution: str, update_period: int, num_samples: int) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"hessian_distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if update_period < 1 or num_samples < 1:
        raise ValueError("update_period and num_samples must be positive")


def _safe_pow(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for ``x >= 0`` whose derivatives at 0 are 0, not inf (no NaN in double backward)."""
    if exponent == 0.5:
        return safe_sqrt(x)
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)) ** exponent, torch.zeros_like(x))


def _decoupled_decay(params: Params, k: str, lr: Hyper, weight_decay: Hyper, fixed_decay: bool) -> Tensor:
    # pytorch_optimizer's weight_decouple: p <- p * (1 - weight_decay * (1 if fixed_decay else lr))
    return -(weight_decay if fixed_decay else lr * weight_decay) * params[k]


# -- AdaHessian -------------------------------------------------------------------------------
class AdaHessianState(NamedTuple):
    count: Tensor
    rng: Tensor
    exp_avg: Params
    exp_hessian_diag_sq: Params


@rebuildable
def adahessian(lr: Hyper = 0.1, betas: tuple[Hyper, Hyper] = (0.9, 0.999), eps: Hyper = 1e-16,
               weight_decay: Hyper = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
               hessian_power: float = 1.0, update_period: int = 1, num_samples: int = 1,
               hessian_distribution: str = "rademacher", seed: int = 0) -> GradientTransformation:
    """AdaHessian (Yao et al. 2020, arXiv 2006.00719), as ``pytorch_optimizer.AdaHessian``::

        every update_period steps (from the first):  D = mean_i z_i * (H z_i),  z_i Rademacher
            v <- b2 v + (1 - b2) D^2
        m <- b1 m + (1 - b1) g
        p <- p - lr * (m / (1 - b1^t)) / ((v / (1 - b2^t)) ** (hessian_power / 2) + eps)

    Weight decay as in the reference: decoupled (``p *= 1 - lr * weight_decay``; with
    ``fixed_decay`` ``p *= 1 - weight_decay``) unless ``weight_decouple=False`` (then L2, added to
    ``g``). Like the reference and unlike the paper's code, the Hessian diagonal is not averaged
    over convolution kernels ("spatial averaging"). On steps without a new estimate ``v`` is kept
    but the bias correction still advances (as in the reference). Needs ``hvp_fn`` or ``loss_fn``
    in ``update(..., **extra)``; ``probes`` overrides the drawn probes (module docstring).

    Args:
        lr: learning rate.
        betas: ``(b1, b2)``, decay rates of ``m`` and ``v``.
        eps: added to the denominator.
        weight_decay: weight decay coefficient.
        weight_decouple: decoupled decay (else L2 into ``g``).
        fixed_decay: with ``weight_decouple``, a decay not scaled by ``lr``.
        hessian_power: the exponent ``k`` of ``v^(k/2)``.
        update_period: steps between Hessian-diagonal estimates.
        num_samples: probes per estimate.
        hessian_distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        seed: seed of the probe generator.
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: an unknown ``hessian_distribution`` or a non-positive period or sample count.
    """
    _check(hessian_distribution, update_period, num_samples)
    b1, b2 = betas

    def init(params):
        return AdaHessianState(count_like(params), _initial_rng_state(seed), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        rng, v = state.rng, state.exp_hessian_diag_sq
        if int(state.count) % update_period == 0:
            D, rng = _hessian_diagonal(extra, params, rng, num_samples, hessian_distribution, "adahessian")
            v = {k: b2 * v[k] + (1 - b2) * D[k] * D[k] for k in updates}
        count = state.count + 1
        grads = updates
        if nonzero(weight_decay) and not weight_decouple:
            grads = {k: g + weight_decay * params[k] for k, g in grads.items()}
        m = {k: state.exp_avg[k] + (1 - b1) * (g - state.exp_avg[k]) for k, g in grads.items()}
        out = {}
        for k in grads:
            t = count.to(torch.promote_types(m[k].dtype, torch.float32))
            denom = _safe_pow(v[k] / (1 - b2**t), hessian_power / 2) + eps
            out[k] = -(lr / (1 - b1**t)) * m[k] / denom
            if nonzero(weight_decay) and weight_decouple:
                out[k] = out[k] + _decoupled_decay(params, k, lr, weight_decay, fixed_decay)
        return out, AdaHessianState(count, rng, m, v)

    return GradientTransformation(init, update)


# -- Sophia -----------------------------------------------------------------------------------
class SophiaState(NamedTuple):
    count: Tensor
    rng: Tensor
    momentum: Params
    hessian_moment: Params


@rebuildable
def sophia(lr: Hyper = 6e-2, betas: tuple[Hyper, Hyper] = (0.96, 0.99), eps: Hyper = 1e-12, weight_decay: Hyper = 0.0,
           weight_decouple: bool = True, fixed_decay: bool = False, p: Hyper = 1e-2, update_period: int = 10,
           num_samples: int = 1, hessian_distribution: str = "gaussian", seed: int = 0) -> GradientTransformation:
    """Sophia with Hutchinson's estimator, "Sophia-H" (Liu et al. 2023, arXiv 2305.14342), as
    ``pytorch_optimizer.SophiaH``::

        m <- b1 m + (1 - b1) g
        every update_period steps (k in the paper; from the first):
            D = mean_i z_i * (H z_i);   h <- b2 h + (1 - b2) D
        p <- p - lr * clip(m / max(h, eps), -p, p)

    The reference's parametrisation: the paper's ``lr_paper * clip(m / max(gamma h, eps_paper), 1)``
    is this with ``p = gamma``, ``lr = lr_paper / gamma``, ``eps = eps_paper / gamma``. Gaussian
    probes by default, as in the paper's Algorithm 2 and the reference (``"rademacher"`` also
    works). Weight decay as in ``adahessian``. Needs ``hvp_fn`` or ``loss_fn`` on the estimate steps.

    Args:
        lr: learning rate (the reference's, ``lr_paper / p``).
        betas: ``(b1, b2)``, decay rates of ``m`` and ``h``.
        eps: floor of ``h`` in the denominator.
        weight_decay: weight decay coefficient.
        weight_decouple: decoupled decay (else L2 into ``g``).
        fixed_decay: with ``weight_decouple``, a decay not scaled by ``lr``.
        p: the clip bound (the paper's gamma).
        update_period: steps between Hessian-diagonal estimates.
        num_samples: probes per estimate.
        hessian_distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        seed: seed of the probe generator.
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: an unknown ``hessian_distribution`` or a non-positive period or sample count.
    """
    _check(hessian_distribution, update_period, num_samples)
    b1, b2 = betas
    clip = p

    def init(params):
        return SophiaState(count_like(params), _initial_rng_state(seed), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        rng, h = state.rng, state.hessian_moment
        if int(state.count) % update_period == 0:
            D, rng = _hessian_diagonal(extra, params, rng, num_samples, hessian_distribution, "sophia")
            h = {k: h[k] + (1 - b2) * (D[k] - h[k]) for k in updates}
        grads = updates
        if nonzero(weight_decay) and not weight_decouple:
            grads = {k: g + weight_decay * params[k] for k, g in grads.items()}
        m = {k: state.momentum[k] + (1 - b1) * (g - state.momentum[k]) for k, g in grads.items()}
        out = {}
        for k in grads:
            ratio = torch.clamp(m[k] / torch.clamp(h[k], min=eps), -clip, clip)
            out[k] = -lr * ratio
            if nonzero(weight_decay) and weight_decouple:
                out[k] = out[k] + _decoupled_decay(params, k, lr, weight_decay, fixed_decay)
        return out, SophiaState(state.count + 1, rng, m, h)

    return GradientTransformation(init, update)


# -- Apollo -----------------------------------------------------------------------------------
class ApolloState(NamedTuple):
    count: Tensor
    exp_avg_grad: Params
    approx_hessian: Params
    update: Params


def _expand_instance(x: Tensor, like: Tensor) -> Tensor:
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


@rebuildable
def apollo(lr: Hyper = 1e-2, init_lr: Hyper | None = 1e-5, beta: Hyper = 0.9, rebound: str = "constant",
           weight_decay: Hyper = 0.0, weight_decay_type: str = "l2", warmup_steps: int = 500, eps: Hyper = 1e-4,
           batch_dims: int = 0) -> GradientTransformation:
    """Apollo (Ma 2021, arXiv 2009.13586): a diagonal quasi-Newton method whose diagonal ``B`` is the
    least-change update satisfying the weak secant equation; as ``pytorch_optimizer.ApolloDQN``
    (a transcription of the author's code), per tensor::

        alpha = (1 - beta) / (1 - beta^t);   lr_t = linear warmup from init_lr to lr over warmup_steps
        dg = g - m;   m <- m + alpha dg                          (bias-corrected gradient average)
        d <- d / (||d||_4 + eps');  dB = (-alpha <dg / (||d||_4 + eps'), d> - <B, d^2>) d^2;  B <- B + dB
        d <- m / max(|B|, rebound)                     ("constant": rebound = 0.01, eps' = eps / 0.01)
           (or m / (max(|B|, ||dg||_inf) + eps' / alpha) with rebound="belief", eps' = eps)
        p <- p - lr_t (d + decay p)

    ``d`` is the previous step's direction (the parameter change divided by ``-lr``). Weight decay:
    ``"l2"`` adds ``weight_decay * p`` to ``g``; ``"decoupled"`` adds it to ``d``; ``"stable"`` adds
    ``weight_decay / mean(max(|B|, rebound)) * p`` to ``d``. The norms, inner products and means are
    per tensor, per instance (``batch_dims``).

    Args:
        lr: learning rate after warmup.
        init_lr: learning rate at step 0 of the warmup (None: ``lr / 1000``).
        beta: decay rate of the gradient average.
        rebound: ``"constant"`` or ``"belief"``.
        weight_decay: weight decay coefficient.
        weight_decay_type: ``"l2"``, ``"decoupled"`` or ``"stable"``.
        warmup_steps: length of the linear warmup.
        eps: the ``eps`` above (``eps'`` derives from it).
        batch_dims: leading task-instance dimensions.
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: an unknown ``rebound`` or ``weight_decay_type``.
    """
    if rebound not in ("constant", "belief"):
        raise ValueError(f"rebound must be 'constant' or 'belief', got {rebound!r}")
    if weight_decay_type not in ("l2", "decoupled", "stable"):
        raise ValueError(f"weight_decay_type must be 'l2', 'decoupled' or 'stable', got {weight_decay_type!r}")
    start_lr = lr / 1000.0 if init_lr is None else init_lr
    eps_eff = eps / 1e-2 if rebound == "constant" else eps

    def init(params):
        return ApolloState(count_like(params), zeros_like(params), zeros_like(params), zeros_like(params))

    def reduce_sum(x: Tensor) -> Tensor:
        return instance_sum(x, batch_dims)

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        m_new, b_new, d_new, out = {}, {}, {}, {}
        for k, g in updates.items():
            t = count.to(torch.promote_types(g.dtype, torch.float32))
            step_lr = torch.where(t >= warmup_steps, torch.as_tensor(lr, dtype=t.dtype, device=t.device),
                                  (lr - start_lr) * t / warmup_steps + start_lr)
            alpha = (1 - beta) / (1 - beta**t)
            if nonzero(weight_decay) and weight_decay_type == "l2":
                g = g + weight_decay * params[k]
            m, B, d = state.exp_avg_grad[k], state.approx_hessian[k], state.update[k]
            delta_grad = g - m
            m_new[k] = m + alpha * delta_grad
            denom = _safe_pow(reduce_sum(d**4), 0.25) + eps_eff
            d = d / denom
            v_sq = d * d
            delta = -alpha * reduce_sum(delta_grad / denom * d) - reduce_sum(B * v_sq)
            b_new[k] = B + v_sq * delta
            if rebound == "belief":
                bound = _expand_instance(torch.amax(torch.abs(delta_grad), dim=tuple(range(batch_dims, g.dim())))
                                         if g.dim() > batch_dims else torch.abs(delta_grad), g)
                den = torch.maximum(torch.abs(b_new[k]), bound) + eps_eff / alpha
            else:
                den = torch.clamp(torch.abs(b_new[k]), min=1e-2)
            direction = m_new[k] / den
            if nonzero(weight_decay) and weight_decay_type != "l2":
                decay = weight_decay
                if weight_decay_type == "stable":
                    decay = weight_decay / (reduce_sum(den) / den.shape[batch_dims:].numel())
                direction = direction + decay * params[k]
            d_new[k] = direction
            out[k] = -step_lr * direction
        return out, ApolloState(count, m_new, b_new, d_new)

    return GradientTransformation(init, update)
