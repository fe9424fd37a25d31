"""The one channel for what an optimizer needs beyond the gradient: ``update(..., **extra)``.

Every ``GradientTransformation.update`` accepts keyword arguments after ``params``;
``chain`` and every combinator pass them on to all members, and a transform ignores
the ones it does not use. The names are fixed here:

=====================  =====================================================================
``loss_fn``            ``loss_fn(params) -> Tensor``: the (summed) objective at any
                       parameters, differentiable. Line searches (``lbfgs``) and
                       Hessian-vector products (``adahessian``, ``sophia``,
                       ``stochastic_lbfgs``) use it.
``value_and_grad_fn``  ``value_and_grad_fn(params) -> (loss, grads)``: loss and gradient at any
                       parameters (line searches). Derived from ``loss_fn`` when absent;
                       ``as_torch_optimizer`` builds it from the ``step(closure)`` closure.
``hvp_fn``             ``hvp_fn(v: Params) -> Params``: the Hessian-vector product at the
                       current parameters. Given directly (``as_torch_optimizer`` builds it
                       from gradients computed with ``create_graph=True``) or derived from
                       ``loss_fn`` by ``hessian_vector_product``.
``indices``            ``LongTensor`` of the example indices in this step's minibatch
                       (finite-sum methods: ``svrg``, ``saga``, ``jacsketch``,
                       ``stochastic_lbfgs``).
``example_grads_fn``   ``example_grads_fn(params, indices) -> Params`` with a leading
                       ``len(indices)`` dimension: per-example gradients (``saga``,
                       ``jacsketch``).
``batch_grad_fn``      ``batch_grad_fn(params, indices) -> Params``: the mean gradient over
                       ``indices`` at any parameters (``svrg``: the same minibatch at the
                       snapshot; ``stochastic_lbfgs``).
``full_grad_fn``       ``full_grad_fn(params) -> Params``: the full-data gradient (``svrg``'s
                       snapshot gradient).
``num_examples``       ``int``: the number of examples of a finite-sum task.
``probes``             ``Params``: fixed random probe vectors for one step of a Hutchinson
                       estimate (``adahessian``, ``sophia``), instead of the seeded draws.
=====================  =====================================================================

Missing what a method needs raises ``MissingExtraArgument`` naming the method and the key.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from learnopt.optim.base import Params

EXTRA_KEYS = (
    "loss_fn", "value_and_grad_fn", "hvp_fn", "indices", "example_grads_fn", "batch_grad_fn", "full_grad_fn",
    "num_examples", "probes",
)


class MissingExtraArgument(TypeError):
    """An optimizer needs an extra argument the caller did not pass."""


def require(extra: dict[str, Any], key: str, who: str) -> Any:
    """``extra[key]``, or a ``MissingExtraArgument`` that says who needs it and what it is.

    Args:
        extra: the ``update``'s extra keyword arguments.
        key: one of ``EXTRA_KEYS``.
        who: the method's name, for the message.
    Returns:
        ``extra[key]``.
    Raises:
        KeyError: ``key`` is not a documented extra argument.
        MissingExtraArgument: ``extra[key]`` is missing or None.
    """
    if key not in EXTRA_KEYS:
        raise KeyError(f"{key!r} is not a documented extra argument ({', '.join(EXTRA_KEYS)})")
    value = extra.get(key)
    if value is None:
        raise MissingExtraArgument(
            f"{who} needs the extra argument {key!r} in update(..., {key}=...); see learnopt.optim.extra"
        )
    return value


def hessian_vector_product(loss_fn: Callable[[Params], Tensor], params: Params, v: Params,
                           create_graph: bool = False) -> Params:
    """H(params) · v by double backward through ``loss_fn`` (Pearlmutter 1994). With
    ``create_graph`` the product stays differentiable (meta-training through it).

    Args:
        loss_fn: ``loss_fn(params) -> Tensor``, twice differentiable.
        params: the point at which the Hessian is taken.
        v: the vector, with the keys of ``params``.
        create_graph: keep the product differentiable.
    Returns:
        ``{name: (H v)[name]}`` (zeros for parameters the loss does not use).
    """
    with torch.enable_grad():
        p = {k: x if x.requires_grad else x.detach().requires_grad_(True) for k, x in params.items()}
        loss = loss_fn(p)
        names = list(p)
        grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=True)
        # grad_outputs (not d<g, v>/dθ): v may itself depend on θ inside an unrolled graph, and
        # its derivative must not leak into the product.
        hv = torch.autograd.grad(grads, [p[k] for k in names], grad_outputs=[v[k] for k in names],
                                 create_graph=create_graph, allow_unused=True)
    return {k: torch.zeros_like(p[k]) if h is None else h for k, h in zip(names, hv)}


def hvp_fn_from(extra: dict[str, Any], params: Params, who: str, create_graph: bool | None = None
                ) -> Callable[[Params], Params]:
    """The Hessian-vector product function: ``extra["hvp_fn"]`` or one built from ``loss_fn``.
    A product built from ``loss_fn`` stays differentiable (for meta-training through it) when
    ``create_graph`` is true, by default whenever a parameter is part of an autograd graph.

    Args:
        extra: the ``update``'s extra keyword arguments.
        params: the current parameters.
        who: the method's name, for the message.
        create_graph: keep products differentiable (None: whenever a parameter requires grad).
    Returns:
        ``hvp(v) -> Params``.
    Raises:
        MissingExtraArgument: neither ``hvp_fn`` nor ``loss_fn`` is given.
    """
    if extra.get("hvp_fn") is not None:
        return extra["hvp_fn"]
    if extra.get("loss_fn") is None:
        raise MissingExtraArgument(f"{who} needs 'hvp_fn' or 'loss_fn' in update(...); see learnopt.optim.extra")
    loss_fn = extra["loss_fn"]
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
    return lambda v: hessian_vector_product(loss_fn, params, v, create_graph=create_graph)


def value_and_grad_fn_from(extra: dict[str, Any], who: str) -> Callable[[Params], tuple[Tensor, Params]]:
    """``extra["value_and_grad_fn"]``, or one built from ``extra["loss_fn"]``.

    Args:
        extra: the ``update``'s extra keyword arguments.
        who: the method's name, for the message.
    Returns:
        ``value_and_grad(params) -> (loss, grads)``.
    Raises:
        MissingExtraArgument: neither ``value_and_grad_fn`` nor ``loss_fn`` is given.
    """
    if extra.get("value_and_grad_fn") is not None:
        return extra["value_and_grad_fn"]
    if extra.get("loss_fn") is None:
        raise MissingExtraArgument(
            f"{who} needs 'value_and_grad_fn' or 'loss_fn' in update(...); see learnopt.optim.extra"
        )
    loss_fn = extra["loss_fn"]

    def value_and_grad(params: Params) -> tuple[Tensor, Params]:
        with torch.enable_grad():
            p = {k: x.detach().requires_grad_(True) for k, x in params.items()}
            loss = loss_fn(p)
            grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        return loss.detach(), {k: torch.zeros_like(p[k]) if g is None else g for k, g in zip(p, grads)}

    return value_and_grad
