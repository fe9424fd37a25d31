"""Task augmentation by random reparameterisation (learned_optimization's ``ReparamWeights``
task family; Celo and Celo2 meta-train with it).

Every parameter tensor θ of a task is seen by the optimizer as θ' = θ / s, with s > 0 drawn
per task instance (``level="global"``: one s for all tensors of an instance; ``"tensor"``: one
per tensor), log-uniform in ``scale_range``. The loss is unchanged as a function of θ::

    loss'(θ') = loss(s · θ')          so   ∂loss'/∂θ' = s · ∂loss/∂θ

The optimizer thus meets the same problem at other parameter scales and other gradient
scales, and a step of size η in θ' moves θ by s · η: a rule that relies on one scale of
parameters or one learning rate does badly on part of the distribution.

Task parameters carry one leading instance dimension (the ``tasks/`` convention). The scales
are a pure function of a seed drawn in ``sample`` and of the parameter's name, so re-drawing
an episode's task (a resumed run) gives the same scales.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from learnopt.task import Params, Task, TaskFamily, seeded_generator

LEVELS = ("global", "tensor")


class ReparameterizedTask:
    """``task`` seen through θ' = θ / s (module docstring); ``scales(params)`` gives s.

    Args:
        task: the wrapped task (parameters with a leading instance dimension).
        seed: the seed the scales are drawn from.
        scale_range: ``(low, high)``: s is log-uniform between them.
        level: ``"global"`` (one s per instance) or ``"tensor"`` (one per tensor and instance).
    """

    def __init__(self, task: Task, seed: int, scale_range: tuple[float, float], level: str) -> None:
        self.task = task
        self.seed = int(seed)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.level = level
        self._cache: dict[tuple[str, int, torch.device, torch.dtype], Tensor] = {}

    @property
    def num_instances(self) -> int:
        """The wrapped task's number of instances."""
        return self.task.num_instances

    def scale_of(self, name: str, like: Tensor) -> Tensor:
        """s for parameter ``name``: ``[num_instances, 1, ...]``, broadcastable against ``like``.

        Args:
            name: the parameter's name (the seed of its scales at ``level="tensor"``).
            like: the parameter (gives the number of instances, rank, device and dtype).

        Returns:
            The scales, cached per name, instance count, device and dtype.
        """
        n = like.shape[0]
        key = (name, n, like.device, like.dtype)
        if key not in self._cache:
            g = seeded_generator("reparam", self.seed, name if self.level == "tensor" else "global")
            lo, hi = (math.log(s) for s in self.scale_range)
            u = torch.rand(n, generator=g, dtype=torch.float64)
            s = torch.exp(lo + (hi - lo) * u).to(device=like.device, dtype=like.dtype)
            self._cache[key] = s.reshape(n, *(1,) * (like.dim() - 1))
        return self._cache[key]

    def scales(self, params: Params) -> Params:
        """``{name: s}`` for every tensor of ``params``.

        Args:
            params: parameters θ' (or θ: only names and shapes are used).

        Returns:
            The scales by name.
        """
        return {k: self.scale_of(k, p) for k, p in params.items()}

    def to_task(self, params: Params) -> Params:
        """θ = s · θ': the parameters the wrapped task's loss sees.

        Args:
            params: the reparameterised parameters θ'.

        Returns:
            θ by name.
        """
        return {k: p * self.scale_of(k, p) for k, p in params.items()}

    def init(self, generator: torch.Generator | None = None) -> Params:
        """The wrapped task's initial parameters, as θ' = θ / s.

        Args:
            generator: the source of the wrapped task's initialization.

        Returns:
            θ'_0 by name.
        """
        return {k: p / self.scale_of(k, p) for k, p in self.task.init(generator).items()}

    def sample_batch(self, generator: torch.Generator | None = None) -> Any:
        """The wrapped task's minibatch (the data are not reparameterised).

        Args:
            generator: the source of the batch.

        Returns:
            The batch.
        """
        return self.task.sample_batch(generator)

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """The wrapped task's loss at θ = s · θ'.

        Args:
            params: θ'.
            batch: the minibatch (``None``: the task's own).

        Returns:
            The per-instance losses.
        """
        return self.task.loss(self.to_task(params), batch)

    def full_loss(self, params: Params) -> Tensor:
        """The wrapped task's ``full_loss`` at θ = s · θ' (its minibatch ``loss`` on ``None``
        where it has none).

        Args:
            params: θ'.

        Returns:
            The per-instance losses.
        """
        full = getattr(self.task, "full_loss", None)
        return full(self.to_task(params)) if full is not None else self.loss(params)

    def normalize(self, loss: Tensor) -> Tensor:
        """The wrapped task's ``normalize`` of ``loss`` (the identity where it has none).

        Args:
            loss: losses of this task.

        Returns:
            The normalized losses.
        """
        normalize = getattr(self.task, "normalize", None)
        return loss if normalize is None else normalize(loss)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ReparameterizedTask:
        """This task with the wrapped task moved (when it has ``to``); same seed and scales.

        Args:
            device: the target device.
            dtype: the target dtype.

        Returns:
            A new ``ReparameterizedTask``.
        """
        inner = self.task.to(device=device, dtype=dtype) if hasattr(self.task, "to") else self.task
        return ReparameterizedTask(inner, self.seed, self.scale_range, self.level)


class ReparameterizedFamily:
    """``family`` with every sampled task reparameterised by random scales (module docstring).

    Args:
        family: the task family to augment.
        scale_range: ``(low, high)``, 0 < low <= high: s is log-uniform between them.
        level: ``"global"`` (one s per instance) or ``"tensor"`` (one per tensor and instance).
    """

    def __init__(self, family: TaskFamily, scale_range: tuple[float, float] = (0.1, 10.0),
                 level: Literal["global", "tensor"] = "tensor") -> None:
        lo, hi = (float(s) for s in scale_range)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"ReparameterizedFamily: need 0 < low <= high < inf, got scale_range={scale_range}")
        if level not in LEVELS:
            raise ValueError(f"ReparameterizedFamily: level must be one of {LEVELS}, got {level!r}")
        self.family = family
        self.scale_range = (lo, hi)
        self.level = level
        self.name = f"reparam_{level}_{lo:g}-{hi:g}_{getattr(family, 'name', type(family).__name__)}"

    def normalize(self, loss: Tensor) -> Tensor:
        """The wrapped family's ``normalize`` of ``loss`` (the identity where it has none).

        Args:
            loss: losses of a task of this family.

        Returns:
            The normalized losses.
        """
        normalize = getattr(self.family, "normalize", None)
        return loss if normalize is None else normalize(loss)

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A task of the wrapped family with its own reparameterisation seed (drawn from
        ``generator`` after the task).

        Args:
            num_instances: the number of task instances.
            generator: the source of the task and of its reparameterisation seed.

        Returns:
            A ``ReparameterizedTask``.
        """
        task = self.family.sample(num_instances, generator)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return ReparameterizedTask(task, seed, self.scale_range, self.level)
