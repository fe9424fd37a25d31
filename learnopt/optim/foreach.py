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

This module holds the registry and the pieces kernels share; the kernels are in
``foreach_torch`` (the optimizers torch.optim has) and ``foreach_more`` (the rest), which
``torch_optimizer`` imports.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


Kernel = Callable[[list[Tensor], list[Tensor], list[dict[str, Any]], dict[str, Any]], bool]

_KERNELS: dict[Callable, Kernel] = {}


def register_kernel(factory: Callable) -> Callable[[Kernel], Kernel]:
    """Register the decorated function as ``factory``'s multi-tensor step.

    Args:
        factory: a catalogue factory (``learnopt.optim.adam``, ...).
    Returns:
        The decorator (it returns the kernel unchanged).
    """

    def register(kernel: Kernel) -> Kernel:
        _KERNELS[factory] = kernel
        return kernel

    return register


def kernel_for(factory: Callable | None) -> Kernel | None:
    """The kernel registered for ``factory``, if any.

    Args:
        factory: a factory, or None.
    Returns:
        The kernel, or None.
    """
    return _KERNELS.get(factory) if factory is not None else None


def plain(*values: Any) -> bool:
    """Whether every hyperparameter is a Python number (or bool/None), not a tensor: the kernels
    take numbers; a tensor hyperparameter (maybe meta-learned) takes the functional path.

    Args:
        *values: hyperparameters (tuples and lists are searched).
    Returns:
        Whether the kernels can take them.
    """
    for v in values:
        if isinstance(v, (tuple, list)):
            if not plain(*v):
                return False
        elif not (v is None or isinstance(v, (bool, int, float))):
            return False
    return True


def new_count(states: list[dict[str, Any]], key: str = "count") -> Tensor:
    """``count + 1`` of a group updated together, as one new tensor written into every state.

    Args:
        states: the flat states of the group.
        key: the count's key.
    Returns:
        The new count.
    """
    count = states[0][key] + 1
    for s in states:
        s[key] = count
    return count


# -- shared pieces ---------------------------------------------------------------------------------


def l2_(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """``g + weight_decay * p`` as new tensors (torch.optim's L2 penalty); the gradients are the
    user's ``.grad`` and are never written.

    Args:
        grads: the gradients.
        params: the parameters.
        weight_decay: the L2 coefficient.
    Returns:
        The penalised gradients (``grads`` itself when the decay is 0).
    """
    return torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads


def adam_moments(grads: list[Tensor], states: list[dict[str, Any]], b1: float, b2: float) -> tuple[list, list]:
    """Adam's moments updated in place, as torch.optim's multi-tensor Adam: ``m`` by ``lerp``,
    ``v <- b2 v + (1 - b2) g^2``.

    Args:
        grads: the gradients.
        states: the flat states (``mu``, ``nu``).
        b1: decay rate of ``m``.
        b2: decay rate of ``v``.
    Returns:
        ``(mu, nu)``, the state's lists.
    """
    mu = [s["mu"] for s in states]
    nu = [s["nu"] for s in states]
    torch._foreach_lerp_(mu, grads, 1 - b1)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, grads, grads, 1 - b2)
    return mu, nu


def adam_step(params: list[Tensor], mu: list[Tensor], nu: list[Tensor], lr: float, b1: float, b2: float,
               eps: float, step: float) -> None:
    """``p <- p - lr (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``, torch.optim's order.

    Args:
        params: the parameters, changed in place.
        mu: first moments.
        nu: second moments.
        lr: learning rate.
        b1: decay rate of ``m``.
        b2: decay rate of ``v``.
        eps: added to the denominator.
        step: the step count ``t``.
    """
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, (1 - b2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, mu, denom, -lr / (1 - b1**step))


def decay_(params: list[Tensor], factor: float) -> None:
    """``p <- factor * p``: decoupled weight decay applied before the step, as torch.optim does.

    Args:
        params: the parameters, changed in place.
        factor: the multiplier.
    """
    if factor != 1:
        torch._foreach_mul_(params, factor)
