"""The core type of learnopt.optim: a gradient transformation, in the style of optax.

A ``GradientTransformation`` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params, **extra)
    params = apply_updates(params, updates)

``params``, ``grads`` and ``updates`` are ``dict[str, Tensor]`` (the names of
``named_parameters()``, what ``torch.func.functional_call`` takes); ``state`` is a
``NamedTuple`` whose leaves are tensors. Updates are *added* to the parameters
(``sgd`` returns ``-lr * g``). Nothing is modified in place, so autograd flows
through any number of steps, which is what unrolled meta-training needs.

Tensors may carry a leading task dimension: every transform here is elementwise or
reduces only over what it documents, so a batch of task instances is optimised by
one call. Extra keyword arguments (``**extra``) are the single channel for anything a
method needs beyond the gradient (a loss closure, Hessian-vector products, ...);
``chain`` passes them to every member.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Params = dict[str, Tensor]
Updates = dict[str, Tensor]
State = Any
Hyper = Union[float, Tensor]

InitFn = Callable[[Params], State]
UpdateFn = Callable[..., "tuple[Updates, State]"]


class Recipe(NamedTuple):
    """How a transform was made: ``factory(**arguments)`` builds it again, with the same or with
    changed hyperparameters (what a drop-in's param groups and schedulers need)."""

    factory: Callable[..., "GradientTransformation"]
    arguments: dict[str, Any]


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None, **extra) -> (updates, state)``.

    ``recipe``: set by the factories of the catalogue (``rebuildable``), ``None`` for a transform
    put together by hand."""

    init: InitFn
    update: UpdateFn
    recipe: Recipe | None = None


def named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by name, defaults filled in and ``**kwargs`` merged in.

    Args:
        signature: the callee's signature.
        args: positional arguments of the call.
        kwargs: keyword arguments of the call.
    Returns:
        ``{name: value}`` for every parameter.
    Raises:
        TypeError: the arguments do not bind to ``signature``.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    return arguments


def rebuildable(factory: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
    """Decorate a factory so that the transforms it returns carry their ``Recipe``: the factory and
    its arguments with the defaults filled in (``named_arguments``).

    Args:
        factory: a function returning a ``GradientTransformation``.
    Returns:
        The wrapped factory (same signature and docstring).
    """
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> GradientTransformation:
        tx = factory(*args, **kwargs)
        return tx._replace(recipe=Recipe(build, named_arguments(signature, args, kwargs)))

    return build


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class ChainState(NamedTuple):
    """``chain``'s state: the tuple of its members' states."""

    states: tuple


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return ``params + updates`` key by key, out of place and keeping each parameter's dtype.

    Args:
        params: the parameters.
        updates: the updates, with the same keys.
    Returns:
        The new parameters.
    Raises:
        KeyError: the keys of ``params`` and ``updates`` differ.
    """
    missing = params.keys() ^ updates.keys()
    if missing:
        raise KeyError(f"apply_updates: params and updates differ in keys {sorted(missing)}")
    return {k: p + updates[k].to(p.dtype) for k, p in params.items()}


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    Args:
        *transforms: the transforms, in order of application.
    Returns:
        A ``GradientTransformation`` with state ``ChainState(states)``; ``extra`` goes to every member.
    """

    def init(params: Params) -> ChainState:
        return ChainState(tuple(t.init(params) for t in transforms))

    def update(updates: Updates, state: ChainState, params: Params | None = None, **extra):
        new_states = []
        for t, s in zip(transforms, state.states):
            updates, s = t.update(updates, s, params, **extra)
            new_states.append(s)
        return updates, ChainState(tuple(new_states))

    return GradientTransformation(init, update)


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """Map ``fn`` over the tensor leaves of a pytree (dicts, tuples, NamedTuples).

    Args:
        fn: applied to the leaves of ``tree`` (and the matching leaves of ``rest``).
        tree: the pytree.
        *rest: pytrees of the same structure.
    Returns:
        A pytree of the same structure holding ``fn``'s results.
    """
    return pytree.tree_map(fn, tree, *rest)


def tree_leaves(tree: Any) -> list:
    """The leaves of a pytree (dicts, tuples, NamedTuples), in flattening order.

    Args:
        tree: the pytree.
    Returns:
        A list of its leaves.
    """
    return pytree.tree_leaves(tree)


def zeros_like(params: Params) -> Params:
    """Zeros shaped like each parameter.

    Args:
        params: the parameters.
    Returns:
        ``{name: zeros}``.
    """
    return {k: torch.zeros_like(p) for k, p in params.items()}


def detach_state(tree: Any) -> Any:
    """Cut the autograd history of every tensor leaf (truncation boundaries).

    Args:
        tree: a pytree (optimizer state).
    Returns:
        The same structure with detached tensors.
    """
    return tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, tree)
