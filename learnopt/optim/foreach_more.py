"""Multi-tensor kernels (``learnopt.optim.foreach``) of the rest of the catalogue's elementwise
optimizers: AMSGrad, NAdam, RAdam, EAdam, AdaBelief, generalized SignSGD, Lion, AdaGrad-Norm,
LAMB, Quickprop, Lookahead (around a kernel of its inner optimizer) and Apollo. Importing this
module registers them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from learnopt.optim import alias, hessian
from learnopt.optim.base import GradientTransformation
from learnopt.optim.param_state import split_parameter_state
from learnopt.optim.foreach import adam_moments, adam_step, decay_, kernel_for, l2_, new_count, plain, register_kernel

@register_kernel(alias.amsgrad)
def amsgrad_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
             arguments: dict[str, Any]) -> bool:
    """``alias.amsgrad`` in place, as torch.optim's multi-tensor ``Adam(amsgrad=True)``."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay):
        return False
    mu, nu = adam_moments(l2_(grads, params, weight_decay), states, b1, b2)
    nu_max = [s["nu_max"] for s in states]
    torch._foreach_maximum_(nu_max, nu)
    adam_step(params, mu, nu_max, lr, b1, b2, eps, float(new_count(states)))
    return True


@register_kernel(alias.nadam)
def nadam_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
           arguments: dict[str, Any]) -> bool:
    """``alias.nadam`` in place, as torch.optim's multi-tensor NAdam; ``mu_product`` is a shared
    leaf, replaced like the step count."""
    lr, (b1, b2), eps, weight_decay, momentum_decay, decoupled = (
        arguments[k] for k in ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay, momentum_decay, decoupled):
        return False
    if decoupled:
        decay_(params, 1 - lr * weight_decay)
    else:
        grads = l2_(grads, params, weight_decay)
    mu, nu = adam_moments(grads, states, b1, b2)
    t = float(new_count(states))
    mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    product = states[0]["mu_product"] * mu_t
    for s in states:
        s["mu_product"] = product
    product = float(product)
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, (1 - b2**t) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, grads, denom, -lr * (1 - mu_t) / (1 - product))
    torch._foreach_addcdiv_(params, mu, denom, -lr * mu_next / (1 - product * mu_next))
    return True


@register_kernel(alias.radam)
def radam_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
           arguments: dict[str, Any]) -> bool:
    """``alias.radam`` in place, as torch.optim's multi-tensor RAdam (the rectification is a
    number per step, so the two cases are two branches)."""
    lr, (b1, b2), eps, weight_decay, decoupled = (
        arguments[k] for k in ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay, decoupled):
        return False
    if decoupled:
        decay_(params, 1 - lr * weight_decay)
    else:
        grads = l2_(grads, params, weight_decay)
    mu, nu = adam_moments(grads, states, b1, b2)
    t = float(new_count(states))
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / bc2
    if rho_t > 5:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        denom = torch._foreach_sqrt(nu)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, mu, denom, -lr * rect * bc2**0.5 / bc1)
    else:
        torch._foreach_add_(params, mu, alpha=-lr / bc1)
    return True


@register_kernel(alias.eadam)
def eadam_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
           arguments: dict[str, Any]) -> bool:
    """``alias.eadam`` in place: Adam's step with eps added to ``v`` and none outside the square
    root. ``eps <= 0`` (where the functional path guards a division by zero) takes the
    functional path."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay) or eps <= 0:
        return False
    mu, nu = adam_moments(l2_(grads, params, weight_decay), states, b1, b2)
    torch._foreach_add_(nu, eps)
    t = float(new_count(states))
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, (1 - b2**t) ** 0.5)
    torch._foreach_addcdiv_(params, mu, denom, -lr / (1 - b1**t))
    return True


@register_kernel(alias.adabelief)
def adabelief_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
               arguments: dict[str, Any]) -> bool:
    """``alias.adabelief`` in place (every weight-decay mode), as pytorch_optimizer's AdaBelief
    (``rectify=False, ams_bound=False``)."""
    lr, (b1, b2), eps, weight_decay, decouple, fixed = (
        arguments[k] for k in ("lr", "betas", "eps", "weight_decay", "weight_decouple", "fixed_decay"))
    if not plain(lr, b1, b2, eps, weight_decay, decouple, fixed):
        return False
    if decouple:
        decay_(params, 1 - (weight_decay if fixed else lr * weight_decay))
    else:
        grads = l2_(grads, params, weight_decay)
    mu = [s["mu"] for s in states]
    nu = [s["nu"] for s in states]
    torch._foreach_lerp_(mu, grads, 1 - b1)
    diff = torch._foreach_sub(grads, mu)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, diff, diff, 1 - b2)
    torch._foreach_add_(nu, eps)
    adam_step(params, mu, nu, lr, b1, b2, eps, float(new_count(states)))
    return True


@register_kernel(alias.sign_sgd)
def sign_sgd_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
              arguments: dict[str, Any]) -> bool:
    """``alias.sign_sgd`` in place. With ``eps > 0`` the denominator is positive and the step is
    one ``addcdiv``; signum and SignSGD (``b2 = eps = 0``) step by ``sign(m)``; any other
    ``eps <= 0`` goes tensor by tensor, a zero denominator giving a zero step as in the
    functional path."""
    lr, (b1, b2), eps, weight_decay, bias_correction = (
        arguments[k] for k in ("lr", "betas", "eps", "weight_decay", "use_bias_correction"))
    if not plain(lr, b1, b2, eps, weight_decay, bias_correction):
        return False
    grads = l2_(grads, params, weight_decay)
    mu = [s["mu"] for s in states]
    torch._foreach_lerp_(mu, grads, 1 - b1)
    t = float(new_count(states))
    if eps == 0 and b2 == 0:  # signum / SignSGD: the step is sign(m) and no v is kept (transforms)
        torch._foreach_add_(params, torch._foreach_sign(mu), alpha=-lr / (1 - b1**t if bias_correction else 1.0))
        return True
    nu = [s["nu"] for s in states]
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, mu, mu, 1 - b2)
    bc1, bc2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
    denom = torch._foreach_sqrt(nu)
    if bc2 != 1:
        torch._foreach_div_(denom, bc2**0.5)
    if eps > 0:
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, mu, denom, -lr / bc1)
        return True
    for p, m, d in zip(params, mu, denom):
        d.add_(eps)
        nonzero = d != 0
        p.sub_(torch.where(nonzero, m / torch.where(nonzero, d, 1.0), 0.0), alpha=lr / bc1)
    return True


@register_kernel(alias.lion)
def lion_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
          arguments: dict[str, Any]) -> bool:
    """``alias.lion`` in place, as pytorch_optimizer's multi-tensor Lion."""
    lr, (b1, b2), weight_decay, decouple = (arguments[k] for k in ("lr", "betas", "weight_decay", "weight_decouple"))
    if not plain(lr, b1, b2, weight_decay, decouple):
        return False
    if decouple:
        decay_(params, 1 - lr * weight_decay)
    else:
        grads = l2_(grads, params, weight_decay)
    mu = [s["mu"] for s in states]
    direction = torch._foreach_lerp(mu, grads, 1 - b1)
    torch._foreach_sign_(direction)
    torch._foreach_lerp_(mu, grads, 1 - b2)
    torch._foreach_add_(params, direction, alpha=-lr)
    return True


@register_kernel(alias.adagrad_norm)
def adagrad_norm_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                  arguments: dict[str, Any]) -> bool:
    """``alias.adagrad_norm`` in place for one task instance (``batch_dims == 0``): the squared
    norms of all gradients from one multi-tensor reduction; ``b_sq`` is a shared leaf."""
    lr, b0, batch_dims = (arguments[k] for k in ("lr", "b0", "batch_dims"))
    if not plain(lr, b0) or batch_dims != 0:
        return False
    b_sq = states[0]["b_sq"]
    norms = torch.stack([n.to(b_sq.dtype) for n in torch._foreach_norm(grads)])
    b_sq = b_sq + (norms * norms).sum()
    for s in states:
        s["b_sq"] = b_sq
    b = float(b_sq) ** 0.5
    if b != 0:
        torch._foreach_add_(params, grads, alpha=-lr / b)
    return True


@register_kernel(alias.lamb)
def lamb_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
          arguments: dict[str, Any]) -> bool:
    """``alias.lamb`` in place for one task instance (``batch_dims == 0``): Adam's direction plus
    decoupled weight decay, scaled per tensor by the trust ratio from multi-tensor norms."""
    lr, (b1, b2), eps, weight_decay, clamp_value, bias_correction, batch_dims = (
        arguments[k] for k in ("lr", "betas", "eps", "weight_decay", "clamp_value", "bias_correction", "batch_dims"))
    if not plain(lr, b1, b2, eps, weight_decay, clamp_value, bias_correction) or batch_dims != 0:
        return False
    if len({p.dtype for p in params}) > 1:  # the trust ratios are computed together, in one dtype
        return False
    mu, nu = adam_moments(grads, states, b1, b2)
    t = float(new_count(states))
    denom = torch._foreach_sqrt(nu)
    if bias_correction:
        torch._foreach_div_(denom, (1 - b2**t) ** 0.5)
    torch._foreach_add_(denom, eps)
    direction = torch._foreach_div(mu, denom)
    if bias_correction:
        torch._foreach_div_(direction, 1 - b1**t)
    if weight_decay != 0:
        torch._foreach_add_(direction, params, alpha=weight_decay)
    w = torch.stack(torch._foreach_norm(params))
    n = torch.stack(torch._foreach_norm(direction)).to(w.dtype)
    if clamp_value is not None:
        w = w.clamp(max=clamp_value)
    ok = (w > 0) & (n > 0)
    ratio = torch.where(ok, w / torch.where(ok, n + eps, 1.0), 1.0)
    torch._foreach_mul_(direction, (-lr * ratio).tolist())
    torch._foreach_add_(params, direction)
    return True


@register_kernel(alias.quickprop)
def quickprop_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
               arguments: dict[str, Any]) -> bool:
    """``alias.quickprop`` in place, tensor by tensor (its rule is a choice per coordinate, which
    ``torch._foreach_*`` has no operation for); the same arithmetic as ``scale_by_quickprop``
    with the masks combined in place and scalars instead of filled tensors."""
    lr, mu, weight_decay = (arguments[k] for k in ("lr", "mu", "weight_decay"))
    if not plain(lr, mu, weight_decay):
        return False
    shrink = mu / (1 + mu)
    grads = l2_(grads, params, weight_decay)
    for p, g, s in zip(params, grads, states):
        d_prev, s_prev = s["prev_step"], s["prev_slope"]
        slope = torch.neg(g)
        gradient_step = slope * lr
        moving = d_prev != 0
        direction = torch.sign(d_prev)  # the functional path's ±1 wherever it is used (d_prev != 0)
        capped = (slope * direction) > (s_prev * shrink * direction)
        secant_ok = (s_prev != slope).logical_and_(moving).logical_and_(capped.logical_not())
        secant = (slope / torch.where(secant_ok, s_prev - slope, 1.0)).mul_(d_prev)
        quadratic = torch.where(capped, d_prev * mu, torch.where(secant_ok, secant, gradient_step))
        gradient_term = torch.where(slope * d_prev > 0, gradient_step, 0.0)
        step = torch.where(moving, gradient_term.add_(quadratic), gradient_step)
        d_prev.copy_(step)
        s_prev.copy_(slope)
        p.add_(step)
    return True


# inner transform -> (the transform, kept so that its id is not reused; [(inner key, lookahead key)])
_LOOKAHEAD_KEYS: dict[int, tuple[GradientTransformation, list[tuple[str, str]]]] = {}


def _lookahead_keys(inner: GradientTransformation, arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the inner transform's state keys sit in ``lookahead``'s flat state (they may be
    renamed there, e.g. the inner ``count`` is ``0.count``): both states split on a meta tensor,
    the lookahead's leaves being ``count``, ``slow``, then the inner's in order."""
    cached = _LOOKAHEAD_KEYS.get(id(inner))
    if cached is not None and cached[0] is inner:
        return cached[1]
    probe = {"w": torch.empty(1, device="meta")}
    inner_keys = list(split_parameter_state(inner.init(probe), "w")[0])
    outer_keys = list(split_parameter_state(alias.lookahead(**arguments).init(probe), "w")[0])
    pairs = list(zip(inner_keys, outer_keys[2:]))
    if len(_LOOKAHEAD_KEYS) > 64:  # transforms rebuilt for new hyperparameters; keep it small
        _LOOKAHEAD_KEYS.clear()
    _LOOKAHEAD_KEYS[id(inner)] = (inner, pairs)
    return pairs


@register_kernel(alias.lookahead)
def lookahead_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
               arguments: dict[str, Any]) -> bool:
    """``alias.lookahead`` in place around an inner optimizer that has a kernel: the inner kernel
    moves the fast weights (the parameters) on views of the inner state; every ``k``-th step the
    slow weights move towards them by ``alpha`` and the parameters are set to the slow weights,
    as pytorch_optimizer's Lookahead does."""
    inner, k, alpha = arguments["optimizer"], arguments["k"], arguments["alpha"]
    if not plain(k, alpha) or not isinstance(inner, GradientTransformation) or inner.recipe is None:
        return False
    kernel = kernel_for(inner.recipe.factory)
    if kernel is None:
        return False
    pairs = _lookahead_keys(inner, arguments)
    views = [{ik: s[ok] for ik, ok in pairs} for s in states]
    if not kernel(params, grads, views, inner.recipe.arguments):
        return False
    for s, view in zip(states, views):
        for ik, ok in pairs:
            s[ok] = view[ik]
    if int(new_count(states)) % k == 0:
        slow = [s["slow"] for s in states]
        torch._foreach_lerp_(slow, params, alpha)
        torch._foreach_copy_(params, slow)
    return True


@register_kernel(hessian.apollo)
def apollo_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
            arguments: dict[str, Any]) -> bool:
    """``hessian.apollo`` in place for one task instance (``batch_dims == 0``): the elementwise
    work in multi-tensor operations, the per-tensor norms and inner products as one reduction per
    tensor (``dot``), then their numbers as scalar lists."""
    lr, init_lr, beta, rebound, weight_decay, decay_type, warmup, eps, batch_dims = (
        arguments[k] for k in ("lr", "init_lr", "beta", "rebound", "weight_decay", "weight_decay_type",
                               "warmup_steps", "eps", "batch_dims"))
    if not plain(lr, init_lr, beta, weight_decay, eps, warmup) or batch_dims != 0:
        return False
    start_lr = lr / 1000.0 if init_lr is None else init_lr
    eps_eff = eps / 1e-2 if rebound == "constant" else eps
    t = float(new_count(states))
    step_lr = lr if t >= warmup else (lr - start_lr) * t / warmup + start_lr
    alpha = (1 - beta) / (1 - beta**t)
    if decay_type == "l2":
        grads = l2_(grads, params, weight_decay)
    m = [s["exp_avg_grad"] for s in states]
    hess = [s["approx_hessian"] for s in states]
    d = [s["update"] for s in states]

    def dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)).to(torch.float64) for x, y in zip(xs, ys)])

    delta_grad = torch._foreach_sub(grads, m)
    torch._foreach_add_(m, delta_grad, alpha=alpha)
    v_sq = torch._foreach_mul(d, d)
    denom = dots(v_sq, v_sq) ** 0.25 + eps_eff  # ||d||_4 + eps'
    torch._foreach_div_(d, denom.tolist())
    torch._foreach_div_(v_sq, (denom * denom).tolist())  # (d / denom)^2
    delta = -alpha * dots(delta_grad, d) / denom - dots(hess, v_sq)
    torch._foreach_mul_(v_sq, delta.tolist())
    torch._foreach_add_(hess, v_sq)
    den = torch._foreach_abs(hess)
    if rebound == "belief":
        bounds = [torch.aminmax(x) for x in delta_grad]
        torch._foreach_clamp_min_(den, [max(-float(lo), float(hi)) for lo, hi in bounds])
        torch._foreach_add_(den, eps_eff / alpha)
    else:
        torch._foreach_clamp_min_(den, 1e-2)
    torch._foreach_copy_(d, m)
    torch._foreach_div_(d, den)
    if weight_decay != 0 and decay_type == "decoupled":
        torch._foreach_add_(d, params, alpha=weight_decay)
    elif weight_decay != 0 and decay_type == "stable":
        for direction, p, b in zip(d, params, den):
            direction.add_(p, alpha=weight_decay / float(b.sum() / b.numel()))
    torch._foreach_add_(params, d, alpha=-step_lr)
    return True
