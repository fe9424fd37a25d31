"""Combinators and utilities shared by the optimizers: per-instance reductions, clipping,
schedules, and ``partition`` (different transforms for different parameters).

Batched parameters: transforms that reduce over a tensor (norms, trust ratios, a scalar
step size, orthogonalisation) take ``batch_dims``: the number of leading dimensions that
index independent task instances. Reductions run over the remaining dimensions only, so
instances never interact; ``batch_dims=0`` (default) is the ordinary, unbatched case.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import EmptyState, GradientTransformation, Hyper, Params
from learnopt.optim.numerics import count_like, instance_norm, instance_sum  # noqa: F401 (public here too)

Schedule = Callable[[Tensor], Tensor]


def _expand(scalar_per_instance: Tensor, like: Tensor, batch_dims: int) -> Tensor:
    return scalar_per_instance.reshape(scalar_per_instance.shape + (1,) * (like.dim() - batch_dims))


def clip(max_delta: Hyper) -> GradientTransformation:
    """Clip every coordinate to ``[-max_delta, max_delta]``.

    Args:
        max_delta: the bound.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        return {k: torch.clamp(u, -max_delta, max_delta) for k, u in updates.items()}, state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: Hyper, batch_dims: int = 0) -> GradientTransformation:
    """Rescale the update so its norm over all parameters (per instance) is at most ``max_norm``,
    as ``torch.nn.utils.clip_grad_norm_`` does.

    Args:
        max_norm: the largest norm let through (the factor is ``max_norm / (norm + 1e-6)``, at most 1).
        batch_dims: leading task-instance dimensions, each clipped on its own.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        norm = instance_norm(updates, batch_dims)
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return {k: u * _expand(factor, u, batch_dims) for k, u in updates.items()}, state

    return GradientTransformation(init, update)


# -- schedules: functions of the step count (0-based) ------------------------------------------
def constant_schedule(value: float) -> Schedule:
    """The constant ``value`` (float32).

    Args:
        value: the value.
    Returns:
        A schedule: the step count tensor -> ``value`` as a tensor.
    """
    return lambda count: torch.as_tensor(value, dtype=torch.float32)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``init_value * ((1 - alpha) * (1 + cos(pi * min(t, T) / T)) / 2 + alpha)`` (Loshchilov & Hutter 2016).

    Args:
        init_value: the value at step 0.
        decay_steps: ``T``, after which the value stays at ``alpha * init_value``.
        alpha: the final value as a fraction of ``init_value``.
    Returns:
        A schedule: the step count tensor -> the value (a tensor).
    """

    def schedule(count):
        t = torch.clamp(count.float(), max=decay_steps) / decay_steps
        return init_value * ((1 - alpha) * 0.5 * (1 + torch.cos(math.pi * t)) + alpha)

    return schedule


def linear_warmup_schedule(init_value: float, peak_value: float, warmup_steps: int) -> Schedule:
    """Linear from ``init_value`` at step 0 to ``peak_value`` at ``warmup_steps``, constant after.

    Args:
        init_value: the value at step 0.
        peak_value: the value from ``warmup_steps`` on.
        warmup_steps: the length of the ramp.
    Returns:
        A schedule: the step count tensor -> the value (a tensor).
    """

    def schedule(count):
        t = torch.clamp(count.float(), max=warmup_steps) / max(warmup_steps, 1)
        return init_value + (peak_value - init_value) * t

    return schedule


def exponential_decay_schedule(init_value: float, decay_rate: float, transition_steps: int = 1) -> Schedule:
    """``init_value * decay_rate ** (t / transition_steps)`` (continuous, not staircase).

    Args:
        init_value: the value at step 0.
        decay_rate: the factor per ``transition_steps`` steps.
        transition_steps: the steps over which the value falls by ``decay_rate``.
    Returns:
        A schedule: the step count tensor -> the value (a tensor).
    """
    return lambda count: init_value * decay_rate ** (count.float() / transition_steps)


class ScaleByScheduleState(NamedTuple):
    count: Tensor


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """``u <- schedule(t) * u`` with ``t`` the number of previous updates.

    Args:
        schedule: a function of the step count.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByScheduleState(count_like(params))

    def update(updates, state, params=None, **extra):
        factor = schedule(state.count)
        return {k: factor.to(u.dtype) * u for k, u in updates.items()}, ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


# -- partition --------------------------------------------------------------------------------
class PartitionState(NamedTuple):
    states: dict


def partition(transforms: dict[str, GradientTransformation], labels: Callable[[str, Tensor], str] | dict[str, str]
              ) -> GradientTransformation:
    """Route each parameter to one of ``transforms`` by label (optax's ``partition``).

    E.g. Muon for 2-d hidden weights, AdamW for the rest. Each transform sees only its own
    parameters; extra arguments reach all of them.

    Args:
        transforms: ``{label: transform}``.
        labels: ``{name: label}`` or a function ``(name, tensor) -> label``.
    Returns:
        A ``GradientTransformation`` with state ``PartitionState({label: state})``.
    Raises:
        KeyError: (from ``init`` / ``update``) a parameter's label is not a key of ``transforms``.
    """

    def label_of(name: str, tensor: Tensor) -> str:
        label = labels[name] if isinstance(labels, dict) else labels(name, tensor)
        if label not in transforms:
            raise KeyError(f"partition: parameter {name!r} has label {label!r}, not one of {sorted(transforms)}")
        return label

    def split(tree: Params, params: Params) -> dict[str, Params]:
        groups: dict[str, Params] = {label: {} for label in transforms}
        for name, x in tree.items():
            groups[label_of(name, params[name])][name] = x
        return groups

    def init(params):
        groups = split(params, params)
        return PartitionState({label: transforms[label].init(groups[label]) for label in transforms})

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("partition needs params to label them")
        groups, pgroups = split(updates, params), split(params, params)
        out, states = {}, {}
        for label, tx in transforms.items():
            u, states[label] = tx.update(groups[label], state.states[label], pgroups[label], **extra)
            out.update(u)
        return {k: out[k] for k in updates}, PartitionState(states)

    return GradientTransformation(init, update)
