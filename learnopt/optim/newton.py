"""Newton's method with Levenberg–Marquardt damping, matrix-free.

The Newton direction solves ``(H + λ I) d = g`` by conjugate gradient on Hessian-vector products
(Nocedal & Wright 2006, *Numerical Optimization*, ch. 7.1, "Newton–CG"), so no Hessian is
formed; with ``cg_iters`` at least the number of coordinates the solve is exact (up to
rounding) on a positive-definite system. The damping ``λ`` either stays as given or, with
``adaptive=True``, follows Levenberg–Marquardt's rule on the ratio of actual to predicted
decrease (Marquardt 1963; Nocedal & Wright ch. 10.3)::

    ρ = (f(x) - f(x - lr d)) / (lr g·d - lr²/2 d·H d)
    ρ < 1/4: λ <- 4 λ (and the step is rejected when ρ <= 0);   ρ > 3/4: λ <- max(λ / 4, λ_min)

Hessian-vector products come through the ``extra`` channel (``learnopt.optim.extra``):
``hvp_fn``, or ``loss_fn`` (double backward), or, for a drop-in ``step(closure)``, a finite
difference of two gradients from ``value_and_grad_fn``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, rebuildable
from learnopt.optim.numerics import instance_sum
from learnopt.optim.extra import MissingExtraArgument, hvp_fn_from

WHO = "newton"


class NewtonState(NamedTuple):
    count: Tensor
    damping: Tensor  # λ per task instance (shape: the batch dimensions)


def _dot(a: Params, b: Params, batch_dims: int) -> Tensor:
    total = None
    for k, x in a.items():
        s = instance_sum(x * b[k], batch_dims).reshape(x.shape[:batch_dims])
        total = s if total is None else total + s
    return total


def _axpy(alpha: Tensor, x: Params, y: Params, batch_dims: int) -> Params:
    """``y + alpha x`` with ``alpha`` per instance."""
    return {k: y[k] + alpha.reshape(alpha.shape + (1,) * (v.dim() - batch_dims)) * v for k, v in x.items()}


def _hvp(extra: dict[str, Any], params: Params) -> Callable[[Params], Params]:
    """``v -> H v``: ``hvp_fn`` or double backward through ``loss_fn``; otherwise a central
    difference of gradients from ``value_and_grad_fn`` (what a drop-in ``step(closure)`` gives)."""
    if extra.get("hvp_fn") is not None or extra.get("loss_fn") is not None:
        if extra.get("hvp_fn") is None:
            loss_fn = extra["loss_fn"]
            extra = {**extra, "loss_fn": lambda p: loss_fn(p).sum()}  # per-instance losses: block-diagonal H
        return hvp_fn_from(extra, params, WHO)
    value_and_grad = extra.get("value_and_grad_fn")
    if value_and_grad is None:
        raise MissingExtraArgument(f"{WHO} needs 'hvp_fn', 'loss_fn' or 'value_and_grad_fn' in update(...); "
                                   "see learnopt.optim.extra")

    def finite_difference(v: Params) -> Params:
        norm = torch.sqrt(sum((x * x).sum() for x in v.values()))
        scale = float(torch.sqrt(sum((p * p).sum() for p in params.values())).detach()) + 1.0
        eps = (torch.finfo(next(iter(params.values())).dtype).eps ** (1 / 3)) * scale / max(float(norm), 1e-30)
        _, plus = value_and_grad({k: p + eps * v[k] for k, p in params.items()})
        _, minus = value_and_grad({k: p - eps * v[k] for k, p in params.items()})
        return {k: (plus[k] - minus[k]) / (2 * eps) for k in params}

    return finite_difference


def conjugate_gradient(hvp: Callable[[Params], Params], g: Params, damping: Tensor, iters: int, tol: float,
                       batch_dims: int = 0) -> Params:
    """``d`` with ``(H + damping I) d = g`` per instance, by at most ``iters`` CG iterations.

    An instance stops when its residual falls below ``tol`` times the first, or at non-positive
    curvature (a non-convex region); if that happens at once, its direction is ``g`` itself (a
    gradient step). Differentiable through the iterations it ran.

    Args:
        hvp: ``hvp(v) -> H v``.
        g: the right-hand side.
        damping: ``[*batch]`` damping per instance.
        iters: the most CG iterations.
        tol: relative residual at which an instance stops.
        batch_dims: leading task-instance dimensions.
    Returns:
        The solution ``d``, keyed as ``g``.
    """
    x = {k: torch.zeros_like(v) for k, v in g.items()}
    r, p = dict(g), dict(g)
    rr = _dot(r, r, batch_dims)
    rr0 = rr
    active = rr > 0
    first_failed = torch.zeros_like(active)
    for i in range(iters):
        hp = hvp(p)
        hp = _axpy(damping, p, hp, batch_dims)
        curvature = _dot(p, hp, batch_dims)
        ok = active & (curvature > 0)
        if i == 0:
            first_failed = active & ~ok
        alpha = torch.where(ok, rr / torch.where(ok, curvature, torch.ones_like(curvature)), torch.zeros_like(rr))
        x = _axpy(alpha, p, x, batch_dims)
        r = _axpy(-alpha, hp, r, batch_dims)
        rr_new = _dot(r, r, batch_dims)
        active = ok & (rr_new > tol * tol * rr0)
        beta = torch.where(active, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = _axpy(beta, p, r, batch_dims)
        rr = rr_new
        if not bool(active.any()):
            break
    return {k: torch.where(first_failed.reshape(first_failed.shape + (1,) * (v.dim() - batch_dims)), g[k], v)
            for k, v in x.items()}


@rebuildable
def newton(lr: Hyper = 1.0, damping: Hyper = 1e-4, adaptive: bool = False, min_damping: float = 1e-12,
           cg_iters: int = 0, cg_tol: float = 1e-10, batch_dims: int = 0) -> GradientTransformation:
    """Damped Newton (module docstring): ``p <- p - lr d`` with ``(H + λ I) d = g``.

    Args:
      lr: step length along the Newton direction (1 is Newton's step).
      damping: λ, the Levenberg–Marquardt damping (its initial value when ``adaptive``).
      adaptive: adapt λ by the ratio of actual to predicted decrease; needs ``loss_fn`` or
        ``value_and_grad_fn`` for the trial loss (per instance with ``batch_dims``).
      min_damping: the floor of an adaptive λ.
      cg_iters: conjugate-gradient iterations; 0 means the number of coordinates per instance
        (an exact solve).
      cg_tol: relative residual at which CG stops.
      batch_dims: leading task-instance dimensions; each instance has its own λ and solve.
    Returns:
      A ``GradientTransformation`` with state ``NewtonState(count, damping)``.
    References:
      Nocedal & Wright 2006, Numerical Optimization, ch. 7.1 and 10.3; Marquardt 1963.
    """

    def init(params: Params) -> NewtonState:
        first = next(iter(params.values()))
        shape = first.shape[:batch_dims]
        dtype = torch.promote_types(first.dtype, torch.float32)
        lam = torch.as_tensor(damping, dtype=dtype, device=first.device).detach()
        return NewtonState(torch.zeros((), dtype=torch.int64, device=first.device),
                           lam * torch.ones(shape, dtype=dtype, device=first.device))

    def update(grads: Params, state: NewtonState, params: Params | None = None, **extra: Any):
        if params is None:
            raise ValueError(f"{WHO} needs params (Hessian-vector products are taken at them)")
        hvp = _hvp(extra, params)
        # A tensor damping that requires grad is read afresh (meta-learnable); otherwise the state's.
        lam = damping * torch.ones_like(state.damping) if (isinstance(damping, Tensor) and damping.requires_grad
                                                           and not adaptive) else state.damping
        iters = cg_iters or sum(v[(0,) * batch_dims].numel() for v in grads.values())
        d = conjugate_gradient(hvp, grads, lam, iters, cg_tol, batch_dims)
        step = {k: -lr * v for k, v in d.items()}
        if not adaptive:
            return step, NewtonState(state.count + 1, lam)
        accept, lam = _levenberg_marquardt(extra, params, grads, d, hvp, lam, lr, batch_dims)
        step = {k: torch.where(accept.reshape(accept.shape + (1,) * (v.dim() - batch_dims)), v, torch.zeros_like(v))
                for k, v in step.items()}
        return step, NewtonState(state.count + 1, lam)

    def _levenberg_marquardt(extra, params, grads, d, hvp, lam, lr, batch_dims):
        loss = _loss_fn(extra)
        f0 = loss(params)
        f1 = loss({k: p - lr * d[k] for k, p in params.items()})
        predicted = lr * _dot(grads, d, batch_dims) - 0.5 * lr * lr * _dot(d, hvp(d), batch_dims)
        rho = (f0 - f1) / torch.where(predicted > 0, predicted, torch.ones_like(predicted))
        rho = torch.where(predicted > 0, rho, torch.full_like(rho, -1.0))
        lam = torch.where(rho < 0.25, lam * 4, torch.where(rho > 0.75, torch.clamp(lam / 4, min=min_damping), lam))
        return rho > 0, lam

    return GradientTransformation(init, update)


def _loss_fn(extra: dict[str, Any]) -> Callable[[Params], Tensor]:
    if extra.get("loss_fn") is not None:
        return extra["loss_fn"]
    if extra.get("value_and_grad_fn") is not None:
        value_and_grad = extra["value_and_grad_fn"]
        return lambda p: value_and_grad(p)[0]
    raise MissingExtraArgument(f"{WHO}(adaptive=True) needs 'loss_fn' or 'value_and_grad_fn' in update(...) for "
                               "the trial loss; see learnopt.optim.extra")
