"""``inject_hyperparams``: hyperparameters that live in the optimizer state (optax's
``inject_hyperparams``).

::

    tx = inject_hyperparams(lo.adam)(lr=0.1, betas=(0.9, 0.999))
    state = tx.init(params)                   # state.hyperparams == {"lr": tensor(0.1), "betas": (...), ...}
    state = set_hyperparams(state, lr=0.05)   # read or change them between steps
    tx = inject_hyperparams(lo.sgd)(lr=lo.cosine_decay_schedule(0.1, 1000))   # evaluated every step

Numeric hyperparameters (floats, tensors, and tuples of them such as ``betas``) become
tensors in ``InjectHyperparamsState.hyperparams``; a callable is a schedule of the step
count and is evaluated before every update (its value is what the state shows). Bools,
strings, ``None``, ints whose default is an int (``batch_dims``, ``ns_steps``) and the
names in ``static_args`` stay as given. The inner transform is rebuilt from the current
values at every update: factories only build closures, so this is cheap, and it keeps
the stored values the single source of truth.

Because every injected value is a tensor, factories that skip a stage for a literal zero
(``sgd``'s momentum, ``weight_decay``) keep that stage with a zero coefficient: the
trajectory is the same, the state holds the (unused) buffer. Name such an argument in
``static_args`` to keep it a plain float.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Params, named_arguments
from learnopt.optim.numerics import count_like


class InjectHyperparamsState(NamedTuple):
    """``count``: updates so far; ``hyperparams``: name -> tensor (or tuple of tensors), the
    values used by the last update (after ``init``: the initial ones); ``inner_state``: the
    wrapped transform's state."""

    count: Tensor
    hyperparams: dict
    inner_state: Any


def set_hyperparams(state: InjectHyperparamsState, **values: Any) -> InjectHyperparamsState:
    """A copy of ``state`` with the named hyperparameters replaced (floats are converted to the
    dtype and device of the value they replace). A scheduled hyperparameter is overwritten by
    its schedule again at the next update.

    Args:
        state: an ``InjectHyperparamsState``.
        **values: new values by hyperparameter name (a tuple for a tuple such as ``betas``).
    Returns:
        The new state.
    Raises:
        KeyError: a name is not an injected hyperparameter.
        ValueError: a tuple hyperparameter is given a value of another length.
    """
    hyperparams = dict(state.hyperparams)
    for name, value in values.items():
        if name not in hyperparams:
            raise KeyError(f"set_hyperparams: {name!r} is not an injected hyperparameter ({sorted(hyperparams)})")
        hyperparams[name] = _like(value, hyperparams[name])
    return state._replace(hyperparams=hyperparams)


def _like(value: Any, old: Any) -> Any:
    if isinstance(old, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(old):
            raise ValueError(f"set_hyperparams: expected a tuple of {len(old)} values, got {value!r}")
        return tuple(_like(v, o) for v, o in zip(value, old))
    if isinstance(value, Tensor):
        return value
    return torch.as_tensor(value, dtype=old.dtype, device=old.device)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_injectable_leaf(x: Any) -> bool:
    return _is_number(x) or (isinstance(x, Tensor) and x.is_floating_point()) or callable(x)


def _is_injectable(x: Any) -> bool:
    if isinstance(x, tuple):
        return len(x) > 0 and all(_is_injectable_leaf(v) for v in x)
    return _is_injectable_leaf(x)


def _hyperparam_dtype(params: Params, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.device | None]:
    device = next(iter(params.values())).device if params else None
    if dtype is not None:
        return dtype, device
    # The parameters' precision (at least float32), so float64 runs keep float64 hyperparameters.
    out = torch.float32
    for p in params.values():
        if p.is_floating_point():
            out = torch.promote_types(out, p.dtype)
    return out, device


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    static_args: Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wrap ``factory`` (e.g. ``lo.adam``) so its numeric hyperparameters live in the state
    (optax's ``inject_hyperparams``, DeepMind JAX ecosystem, Babuschkin et al. 2020)::

        init(p):        h <- {name: tensor(value or schedule(0))};   s <- factory(**h).init(p)
        update(g, st):  h <- st.hyperparams, schedules evaluated at st.count
                        u, s <- factory(**h).update(g, st.inner_state, p);   count <- count + 1

    The wrapped factory takes ``factory``'s arguments (its defaults are injected too) and returns
    a ``GradientTransformation`` with state ``InjectHyperparamsState``. Floats become tensors of
    ``hyperparam_dtype`` on the parameters' device; tensors given
    by the caller are kept as they are; one that requires grad is meta-learnable and, like a
    schedule, is read at every update rather than from the state.
    Callables are schedules ``schedule(count) -> value`` with ``count`` the number of
    previous updates, also inside tuples (``betas=(schedule, 0.999)``); a callable argument
    that is not a schedule must be named in ``static_args``.

    Args:
        factory: a function returning a ``GradientTransformation``, called with keyword arguments.
        static_args: names of arguments passed as given, never injected.
        hyperparam_dtype: dtype of the injected values (None: the parameters', at least float32).
    Returns:
        ``wrapped(*args, **kwargs) -> GradientTransformation``, with ``factory``'s arguments and docstring.
    Raises:
        TypeError: ``factory`` takes ``*args``, or ``static_args`` names an argument it does not take.
    """
    static_names = frozenset(static_args)
    signature = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
        raise TypeError(f"inject_hyperparams: {getattr(factory, '__name__', factory)} takes *args; "
                        "hyperparameters must be named")
    unknown = static_names - signature.parameters.keys()
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        raise TypeError(f"inject_hyperparams: static_args {sorted(unknown)} are not arguments of {factory.__name__}")

    def int_default(name: str) -> bool:
        param = signature.parameters.get(name)
        return param is not None and _is_number(param.default) and isinstance(param.default, int)

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        arguments = named_arguments(signature, args, kwargs)
        static, dynamic = {}, {}
        for name, value in arguments.items():
            # An int whose default is an int is a count or a size (batch_dims, ns_steps), not a rate.
            if name in static_names or not _is_injectable(value) or (isinstance(value, int) and int_default(name)):
                static[name] = value
            else:
                dynamic[name] = value

        def init(params: Params) -> InjectHyperparamsState:
            dtype, device = _hyperparam_dtype(params, hyperparam_dtype)
            count = count_like(params)

            def initial(value: Any) -> Tensor:
                if isinstance(value, Tensor):
                    return value
                if callable(value):
                    return _scheduled(value, count, dtype, device)
                return torch.as_tensor(value, dtype=dtype, device=device)

            hyperparams = {
                name: tuple(initial(v) for v in value) if isinstance(value, tuple) else initial(value)
                for name, value in dynamic.items()
            }
            return InjectHyperparamsState(count, hyperparams, factory(**static, **hyperparams).init(params))

        def update(updates, state: InjectHyperparamsState, params: Params | None = None, **extra):
            count = state.count

            def current(value: Any, stored: Any) -> Any:
                # The state's value (which the caller may have changed), except for schedules,
                # evaluated at this step in the stored value's dtype and device, and for tensors
                # that require grad, read afresh so that detaching the state at a truncation
                # boundary does not cut their hypergradient.
                if isinstance(value, Tensor) and value.requires_grad:
                    return value
                if not callable(value):
                    return stored
                if isinstance(stored, Tensor):
                    return _scheduled(value, count, stored.dtype, stored.device)
                return _scheduled(value, count, torch.get_default_dtype(), count.device)

            hyperparams = dict(state.hyperparams)
            for name, value in dynamic.items():
                stored = hyperparams[name]
                if isinstance(value, tuple):
                    hyperparams[name] = tuple(current(v, s) for v, s in zip(value, stored))
                else:
                    hyperparams[name] = current(value, stored)
            inner = factory(**static, **hyperparams)
            new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            return new_updates, InjectHyperparamsState(count + 1, hyperparams, inner_state)

        return GradientTransformation(init, update)

    wrapped.__name__ = f"inject_hyperparams({getattr(factory, '__name__', 'factory')})"
    wrapped.__doc__ = factory.__doc__
    return wrapped


def _scheduled(schedule: Callable[[Tensor], Any], count: Tensor, dtype: torch.dtype, device: Any) -> Tensor:
    return torch.as_tensor(schedule(count)).to(dtype=dtype, device=device)
