"""Truncation schedules: how many inner steps the next truncation unrolls.

A schedule draws a length K ≥ 1; ``truncation_length`` then clips it to the steps left in
the inner run, so a truncation never crosses the horizon T. Sampled lengths make the
truncation boundaries fall at different steps of the inner run from episode to episode (as
``learned_optimization``'s ``truncation_schedule`` does, Metz et al. 2022, arXiv
2203.11860), instead of always at multiples of K.

Draws come from a generator seeded by ``(split, seed, "truncation", episode, step)``: they
are reproducible, identical for every estimator with the same seed, independent of the task
data stream, and need no state of their own to be saved for resuming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from learnopt.task import seeded_generator


@runtime_checkable
class TruncationSchedule(Protocol):
    """What a truncation schedule is: anything with ``sample(generator) -> int``."""

    def sample(self, generator: torch.Generator) -> int:
        """A truncation length ≥ 1 (before clipping to the horizon).

        Args:
            generator: the seeded generator of this truncation's draw.

        Returns:
            The length.
        """


@dataclass(frozen=True)
class ConstantSchedule:
    """Always ``length`` steps.

    Attributes:
        length: the truncation length, ≥ 1.
    """

    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"ConstantSchedule: length must be >= 1, got {self.length}")

    def sample(self, generator: torch.Generator) -> int:
        """``length``.

        Args:
            generator: unused.

        Returns:
            The length.
        """
        return self.length


@dataclass(frozen=True)
class UniformSchedule:
    """A length drawn uniformly from the integers ``low`` … ``high`` (both included).

    Attributes:
        low: the shortest length, ≥ 1.
        high: the longest length, ≥ ``low``.
    """

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"UniformSchedule: need 1 <= low <= high, got low={self.low}, high={self.high}")

    def sample(self, generator: torch.Generator) -> int:
        """A uniform draw from ``low`` … ``high``.

        Args:
            generator: the source of the draw.

        Returns:
            The length.
        """
        return int(torch.randint(self.low, self.high + 1, (), generator=generator))


@dataclass(frozen=True)
class GeometricSchedule:
    """``low + G − 1`` with ``G`` geometric on {1, 2, …} with success probability
    ``p = 1 / (mean − low + 1)``, so the length has mean ``mean`` before it is clipped to
    ``high`` (``None``: no upper bound but the horizon). Short truncations are frequent and
    long ones rare, with a memoryless chance of stopping at every step.

    Attributes:
        mean: the mean length before clipping, ≥ ``low``.
        low: the shortest length, ≥ 1.
        high: the longest length (``None``: unbounded).
    """

    mean: float
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        if self.low < 1 or self.mean < self.low or (self.high is not None and self.high < self.low):
            raise ValueError(
                f"GeometricSchedule: need 1 <= low <= mean and low <= high, got "
                f"low={self.low}, mean={self.mean}, high={self.high}"
            )

    def sample(self, generator: torch.Generator) -> int:
        """A draw of ``low + G − 1``, clipped to ``high``.

        Args:
            generator: the source of the draw.

        Returns:
            The length.
        """
        p = 1.0 / (self.mean - self.low + 1.0)
        if p >= 1.0:
            k = self.low
        else:
            # Inverse CDF: P(G > g) = (1 − p)^g, so G = ceil(log U / log(1 − p)) for U ~ U(0, 1].
            u = 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))
            k = self.low + max(1, math.ceil(math.log(u) / math.log1p(-p))) - 1
        return k if self.high is None else min(k, self.high)


def truncation_length(
    schedule: TruncationSchedule, step: int, horizon: int, split: str, seed: int, episode: int
) -> int:
    """The length of the truncation starting at inner step ``step``: the schedule's draw,
    clipped to ``horizon - step`` so it never crosses the horizon.

    Args:
        schedule: the truncation schedule.
        step: the inner step the truncation starts at.
        horizon: the length T of the inner run.
        split: the task split of the draw's seed stream.
        seed: the run's seed.
        episode: the episode's index.

    Returns:
        The truncation length, 1 … ``horizon - step``.

    Raises:
        ValueError: ``step`` is not before the horizon, or the schedule drew a length < 1.
    """
    left = horizon - step
    if left < 1:
        raise ValueError(f"truncation_length: step {step} is not before the horizon {horizon}")
    k = schedule.sample(seeded_generator(split, seed, "truncation", episode, step))
    if k < 1:
        raise ValueError(f"truncation schedule {schedule!r} drew a length {k} < 1")
    return min(k, left)
