"""Multi-tensor kernels (``learnopt.optim.foreach``) of the optimizers torch.optim has:
SGD with its momentum and Nesterov forms, RMSprop, Adagrad, Adadelta, Adam and AdamW. Importing
this module registers them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from learnopt.optim import alias
from learnopt.optim.foreach import adam_moments, adam_step, l2_, new_count, plain, register_kernel

@register_kernel(alias.adam)
def adam_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], arguments: dict[str, Any]) -> bool:
    """``alias.adam`` in place, as torch.optim's multi-tensor Adam."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay):
        return False
    mu, nu = adam_moments(l2_(grads, params, weight_decay), states, b1, b2)
    adam_step(params, mu, nu, lr, b1, b2, eps, float(new_count(states)))
    return True


@register_kernel(alias.adamw)
def adamw_(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], arguments: dict[str, Any]) -> bool:
    """``alias.adamw`` in place, as torch.optim's multi-tensor AdamW: the parameters are first
    multiplied by ``1 - lr * weight_decay``, then take Adam's step."""
    lr, (b1, b2), eps, weight_decay = (arguments[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if not plain(lr, b1, b2, eps, weight_decay):
        return False
    mu, nu = adam_moments(grads, states, b1, b2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    adam_step(params, mu, nu, lr, b1, b2, eps, float(new_count(states)))
    return True


def _sgd(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], lr: float, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool) -> bool:
    """torch.optim's multi-tensor SGD; the momentum buffer is ``trace`` (absent for momentum 0
    without nesterov, as in ``alias.sgd``), whose first value is the gradient itself."""
    if not plain(lr, momentum, dampening, weight_decay, nesterov):
        return False
    grads = l2_(grads, params, weight_decay)
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
    grads = l2_(grads, params, weight_decay)
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
    grads = l2_(grads, params, weight_decay)
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
    grads = l2_(grads, params, weight_decay)
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
