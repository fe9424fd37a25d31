"""Several task families trained side by side as one batched task.

Meta-training for generalization wants every meta-gradient to see several problems (Celo2
meta-trains on 4 small image MLPs at once). ``TaskGroupFamily`` samples one task from each
member family, each with its own instances, and presents them as one ``Task``: parameters
are the members' under the prefix ``"<index>/"``, and the per-instance losses are the members'
concatenated. The instances never interact (each member's tensors keep their own leading
instance dimension), so an optimizer with ``batch_dims=1`` treats every instance of every
member on its own, and a meta-loss averaged over instances weighs the members by their counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from learnopt.task import Params, Task, TaskFamily, normalize_loss


class TaskGroup:
    """``tasks`` as one task (module docstring)."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = list(tasks)

    @property
    def num_instances(self) -> int:
        return sum(t.num_instances for t in self.tasks)

    def _split(self, params: Params) -> list[Params]:
        parts: list[Params] = [{} for _ in self.tasks]
        for key, value in params.items():
            index, name = key.split("/", 1)
            parts[int(index)][name] = value
        return parts

    def init(self, generator: torch.Generator | None = None) -> Params:
        return {f"{i}/{k}": v for i, t in enumerate(self.tasks) for k, v in t.init(generator).items()}

    def sample_batch(self, generator: torch.Generator | None = None) -> list[Any]:
        return [t.sample_batch(generator) for t in self.tasks]

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        batches = batch if batch is not None else [None] * len(self.tasks)
        return torch.cat([t.loss(p, b) for t, p, b in zip(self.tasks, self._split(params), batches)])

    def full_loss(self, params: Params) -> Tensor:
        """Each member's ``full_loss`` (its ``loss`` on ``None`` where it has none)."""
        return torch.cat([getattr(t, "full_loss", lambda q, t=t: t.loss(q))(p)
                          for t, p in zip(self.tasks, self._split(params))])

    def normalize(self, loss: Tensor) -> Tensor:
        """Each member's own normalisation of its slice of ``loss`` (``[num_instances]``)."""
        counts = [t.num_instances for t in self.tasks]
        return torch.cat([normalize_loss(t, part) for t, part in zip(self.tasks, loss.split(counts))])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskGroup:
        return TaskGroup([t.to(device=device, dtype=dtype) if hasattr(t, "to") else t for t in self.tasks])


class TaskGroupFamily:
    """One task from each of ``families`` per ``sample``, trained together (module docstring).

    ``sample(n)`` gives each member ``n // len(families)`` instances (the first ``n %
    len(families)`` members one more); ``n`` must be at least the number of members. Members
    draw from the generator in order, so a group is reproducible from its seed.
    """

    def __init__(self, families: Sequence[TaskFamily]) -> None:
        self.families = list(families)
        if not self.families:
            raise ValueError("TaskGroupFamily needs at least one family")
        self.name = "group_" + "+".join(getattr(f, "name", type(f).__name__) for f in self.families)

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A ``TaskGroup`` of ``num_instances`` instances in all."""
        k = len(self.families)
        if num_instances < k:
            raise ValueError(f"TaskGroupFamily.sample: need at least one instance per family ({k}), "
                             f"got num_instances={num_instances}")
        counts = [num_instances // k + (1 if i < num_instances % k else 0) for i in range(k)]
        return TaskGroup([f.sample(c, generator) for f, c in zip(self.families, counts)])
