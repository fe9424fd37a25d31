"""Multi-tensor in-place steps for the drop-in optimizer (``torch._foreach_*`` kernels).

The functional ``update`` of a transform is the reference; it runs out of place, one tensor at a
time, so autograd can flow through it. A drop-in step that nothing differentiates through may
instead run one of these kernels, which compute the same trajectory (tested against the
functional path) in place over lists of tensors, as torch.optim's ``foreach`` implementations do.

A kernel is registered for a catalogue factory and is called as::

    handled = kernel(params, grads, states, arguments)

* ``params``, ``grads``: lists of tensors of one parameter group that are updated together (the
  parameters are changed in place);
* ``states``: their flat per-parameter states (``opt.state[p]``, keys as
  ``learnopt.optim.param_state.split_parameter_state`` names them), updated in place; a shared
  leaf (a step count) is replaced by one new tensor that every state gets, as ``scatter`` would;
* ``arguments``: the factory's arguments for this step (``recipe.arguments``).

It returns ``False``, having changed nothing, for a case it does not cover (e.g. a tensor
hyperparameter that requires grad); the drop-in then runs the functional path.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from learnopt.optim import alias, hessian
from learnopt.optim.base import GradientTransformation
from learnopt.optim.param_state import split_parameter_state

Kernel = Callable[[list[Tensor], list[Tensor], list[dict[str, Any]], dict[str, Any]], bool]

_KERNELS: dict[Callable, Kernel] = {}


def register_kernel(factory: Callable) -> Callable[[Kernel], Kernel]:
    """Register the decorated function as ``factory``'s multi-tensor step."""

    def register(kernel: Kernel) -> Kernel:
        _KERNELS[factory] = kernel
        return kernel

    return register


def kernel_for(factory: Callable | None) -> Kernel | None:
    """The kernel registered for ``factory``, if any."""
    return _KERNELS.get(factory) if factory is not None else None


def plain(*values: Any) -> bool:
    """Whether every hyperparameter is a Python number (or bool/None), not a tensor: the kernels
    take numbers; a tensor hyperparameter (maybe meta-learned) takes the functional path."""
    for v in values:
        if isinstance(v, (tuple, list)):
            if not plain(*v):
                return False
        elif not (v is None or isinstance(v, (bool, int, float))):
            return False
    return True


def new_count(states: list[dict[str, Any]], key: str = "count") -> Tensor:
    """``count + 1`` of a group updated together, as one new tensor written into every state."""
    count = states[0][key] + 1
    for s in states:
        s[key] = count
    return count


# -- shared pieces ---------------------------------------------------------------------------------


def _l2(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """``g + weight_decay * p`` as new tensors (torch.optim's L2 penalty); the gradients are the
    user's ``.grad`` and are never written."""
    return torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads


def _adam_moments(grads: list[Tensor], states: list[dict[str, Any]], b1: float, b2: float) -> tuple[list, list]:
    """Adam's moments updated in place, as torch.optim's multi-tensor Adam: ``m`` by ``lerp``,
    ``v <- b2 v + (1 - b2) g^2``."""
    mu = [s["mu"] for s in states]
    nu = [s["nu"] for s in states]
    torch._foreach_lerp_(mu, grads, 1 - b1)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, grads, grads, 1 - b2)
    return mu, nu


def _adam_step(params: list[Tensor], mu: list[Tensor], nu: list[Tensor], lr: float, b1: float, b2: float,
               eps: float, step: float) -> None:
    """``p <- p - lr (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``, torch.optim's order."""
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, (1 - b2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, mu, denom, -lr / (1 - b1**step))


# -- kernels --------------------------------------------------------------------------------------


@register_kernel(alias.adam)
def adam_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], arguments: dict[str, Any]) -> bool:
    """``alias.adam`` in place, as torch.optim's multi-tensor Adam."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay):
        return False
    mu, nu = _adam_moments(_l2(grads, params, weight_decay), states, b1, b2)
    _adam_step(params, mu, nu, lr, b1, b2, eps, float(new_count(states)))
    return True


@register_kernel(alias.adamw)
def adamw_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], arguments: dict[str, Any]) -> bool:
    """``alias.adamw`` in place, as torch.optim's multi-tensor AdamW: the parameters are first
    multiplied by ``1 - lr * weight_decay``, then take Adam's step."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay):
        return False
    mu, nu = _adam_moments(grads, states, b1, b2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    _adam_step(params, mu, nu, lr, b1, b2, eps, float(new_count(states)))
    return True


def _sgd(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], lr: float, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool) -> bool:
    """torch.optim's multi-tensor SGD; the momentum buffer is ``trace`` (absent for momentum 0
    without nesterov, as in ``alias.sgd``), whose first value is the gradient itself."""
    if not plain(lr, momentum, dampening, weight_decay, nesterov):
        return False
    grads = _l2(grads, params, weight_decay)
    if momentum != 0 or nesterov:
        bufs = [s["trace"] for s in states]
        first = bool(states[0]["count"] == 0)
        new_count(states)
        if first:
            torch._foreach_copy_(bufs, grads)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        if nesterov:
            # p - lr (g + momentum b) as two in-place passes: the sum torch.optim forms in place
            # would be written into the user's .grad (or need a new buffer).
            torch._foreach_add_(params, grads, alpha=-lr)
            torch._foreach_add_(params, bufs, alpha=-lr * momentum)
            return True
        grads = bufs
    torch._foreach_add_(params, grads, alpha=-lr)
    return True


@register_kernel(alias.sgd)
def sgd_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], arguments: dict[str, Any]) -> bool:
    """``alias.sgd`` in place (every option), as torch.optim's multi-tensor SGD."""
    return _sgd(params, grads, states, *(arguments[k] for k in ("lr", "momentum", "dampening", "weight_decay",
                                                                  "nesterov")))


@register_kernel(alias.momentum)
def momentum_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
              arguments: dict[str, Any]) -> bool:
    """``alias.momentum``: ``sgd_`` with heavy-ball momentum."""
    return _sgd(params, grads, states, arguments["lr"], arguments["momentum"], 0.0, arguments["weight_decay"], False)


@register_kernel(alias.nesterov)
def nesterov_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
              arguments: dict[str, Any]) -> bool:
    """``alias.nesterov``: ``sgd_`` with Nesterov momentum."""
    return _sgd(params, grads, states, arguments["lr"], arguments["momentum"], 0.0, arguments["weight_decay"], True)


@register_kernel(alias.rmsprop)
def rmsprop_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
             arguments: dict[str, Any]) -> bool:
    """``alias.rmsprop`` in place (every option), as torch.optim's multi-tensor RMSprop."""
    lr, alpha, eps, weight_decay, momentum, centered = (
        arguments[k] for k in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"))
    if not plain(lr, alpha, eps, weight_decay, momentum, centered):
        return False
    grads = _l2(grads, params, weight_decay)
    square_avg = [s["square_avg"] for s in states]
    torch._foreach_mul_(square_avg, alpha)
    torch._foreach_addcmul_(square_avg, grads, grads, 1 - alpha)
    if centered:
        grad_avg = [s["grad_avg"] for s in states]
        torch._foreach_lerp_(grad_avg, grads, 1 - alpha)
        avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
        # s - a^2 >= 0 in exact arithmetic but may round below 0; the functional path's safe_sqrt
        # gives 0 there (torch would give NaN).
        torch._foreach_clamp_min_(avg, 0.0)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avg)
    torch._foreach_add_(avg, eps)
    if momentum != 0:
        # ``trace`` starts at zero, so its first value momentum * 0 + u is u, as the functional path's.
        bufs = [s["trace"] for s in states]
        new_count(states)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_addcdiv_(bufs, grads, avg)
        torch._foreach_add_(params, bufs, alpha=-lr)
    else:
        torch._foreach_addcdiv_(params, grads, avg, -lr)
    return True


@register_kernel(alias.adagrad)
def adagrad_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
             arguments: dict[str, Any]) -> bool:
    """``alias.adagrad`` in place (every option), as torch.optim's multi-tensor Adagrad; the step
    count exists only with ``lr_decay`` (as in ``alias.adagrad``)."""
    lr, lr_decay, weight_decay, initial, eps = (
        arguments[k] for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"))
    if not plain(lr, lr_decay, weight_decay, initial, eps):
        return False
    grads = _l2(grads, params, weight_decay)
    clr = lr
    if lr_decay != 0:
        clr = lr / (1 + float(states[0]["count"]) * lr_decay)
        new_count(states)
    sums = [s["sum"] for s in states]
    torch._foreach_addcmul_(sums, grads, grads, 1)
    std = torch._foreach_sqrt(sums)
    torch._foreach_add_(std, eps)
    torch._foreach_addcdiv_(params, grads, std, -clr)
    return True


@register_kernel(alias.adadelta)
def adadelta_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
              arguments: dict[str, Any]) -> bool:
    """``alias.adadelta`` in place, as torch.optim's multi-tensor Adadelta. ``eps <= 0`` (where
    the functional path's guarded division differs from torch's) takes the functional path."""
    lr, rho, eps, weight_decay = (arguments[k] for k in ("lr", "rho", "eps", "weight_decay"))
    if not plain(lr, rho, eps, weight_decay) or eps <= 0:
        return False
    grads = _l2(grads, params, weight_decay)
    square_avg = [s["square_avg"] for s in states]
    acc_delta = [s["acc_delta"] for s in states]
    torch._foreach_mul_(square_avg, rho)
    torch._foreach_addcmul_(square_avg, grads, grads, 1 - rho)
    std = torch._foreach_add(square_avg, eps)
    torch._foreach_sqrt_(std)
    deltas = torch._foreach_add(acc_delta, eps)
    torch._foreach_sqrt_(deltas)
    torch._foreach_div_(deltas, std)
    torch._foreach_mul_(deltas, grads)
    torch._foreach_mul_(acc_delta, rho)
    torch._foreach_addcmul_(acc_delta, deltas, deltas, 1 - rho)
    torch._foreach_add_(params, deltas, alpha=-lr)
    return True


def _decay_(params: list[Tensor], factor: float) -> None:
    """``p <- factor * p``: decoupled weight decay applied before the step, as torch.optim does."""
    if factor != 1:
        torch._foreach_mul_(params, factor)


@register_kernel(alias.amsgrad)
def amsgrad_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
             arguments: dict[str, Any]) -> bool:
    """``alias.amsgrad`` in place, as torch.optim's multi-tensor ``Adam(amsgrad=True)``."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay):
        return False
    mu, nu = _adam_moments(_l2(grads, params, weight_decay), states, b1, b2)
    nu_max = [s["nu_max"] for s in states]
    torch._foreach_maximum_(nu_max, nu)
    _adam_step(params, mu, nu_max, lr, b1, b2, eps, float(new_count(states)))
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
        _decay_(params, 1 - lr * weight_decay)
    else:
        grads = _l2(grads, params, weight_decay)
    mu, nu = _adam_moments(grads, states, b1, b2)
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
        _decay_(params, 1 - lr * weight_decay)
    else:
        grads = _l2(grads, params, weight_decay)
    mu, nu = _adam_moments(grads, states, b1, b2)
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
    mu, nu = _adam_moments(_l2(grads, params, weight_decay), states, b1, b2)
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
        _decay_(params, 1 - (weight_decay if fixed else lr * weight_decay))
    else:
        grads = _l2(grads, params, weight_decay)
    mu = [s["mu"] for s in states]
    nu = [s["nu"] for s in states]
    torch._foreach_lerp_(mu, grads, 1 - b1)
    diff = torch._foreach_sub(grads, mu)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, diff, diff, 1 - b2)
    torch._foreach_add_(nu, eps)
    _adam_step(params, mu, nu, lr, b1, b2, eps, float(new_count(states)))
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
    grads = _l2(grads, params, weight_decay)
    mu = [s["mu"] for s in states]
    nu = [s["nu"] for s in states]
    torch._foreach_lerp_(mu, grads, 1 - b1)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, mu, mu, 1 - b2)
    t = float(new_count(states))
    bc1, bc2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
    if eps == 0 and b2 == 0:
        # signum / SignSGD: v = m^2 and sqrt(fl(m^2)) = |m| exactly, so m / sqrt(v) is sign(m)
        # where v > 0 and 0 where v == 0 (m == 0, or m^2 underflowed): sign(sign(m) * v), in
        # place. (Where m^2 overflows, the functional path's m / inf gives 0, this sign(m).)
        direction = torch._foreach_sign(mu)
        torch._foreach_mul_(direction, nu)
        torch._foreach_sign_(direction)
        torch._foreach_add_(params, direction, alpha=-lr / bc1)
        return True
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
        _decay_(params, 1 - lr * weight_decay)
    else:
        grads = _l2(grads, params, weight_decay)
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
    mu, nu = _adam_moments(grads, states, b1, b2)
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
    grads = _l2(grads, params, weight_decay)
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
        grads = _l2(grads, params, weight_decay)
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
