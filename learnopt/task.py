"""The task interfaces that ``tasks/`` implements and the meta-training layers consume.

A ``Task`` is a *batch* of problem instances sharing one structure: its parameters carry a
leading instance dimension and ``loss`` returns one value per instance, so many instances
train in one call (and a coordinate-wise learned optimizer sees all their coordinates as
rows of one matmul). Because instances never interact, the gradient of ``loss(...).sum()``
is each instance's own gradient: any elementwise optimizer applied to the batch follows
exactly the trajectories it would follow on each instance alone.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = dict[str, Tensor]


@runtime_checkable
class Task(Protocol):
    """A batch of instances; ``num_instances`` tells how many."""

    def init(self, generator: torch.Generator | None = None) -> Params:
        """Initial parameters, each with leading dimension ``num_instances``."""

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """Per-instance loss, shape ``[num_instances]``."""

    def sample_batch(self, generator: torch.Generator | None = None) -> Any:
        """The data for one inner step (``None`` for deterministic tasks)."""


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution over tasks. Families also carry a ``name`` attribute for reports."""

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """Draw ``num_instances`` task instances as one batched ``Task``."""


def seeded_generator(*keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from a tuple of keys (e.g. ``("train", seed, episode)``), so that the
    splits used for meta-training, tuning and testing draw from disjoint seed streams and a
    resumed run draws exactly what the interrupted one would have."""
    import hashlib

    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
