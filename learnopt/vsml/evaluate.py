"""Scoring online learners on fixed streams, and tuning the learning rate of online baselines.

The streams come from the caller (``tasks.online`` in the reproduction script), so this module
stays below ``tasks`` in the layering. A stream batch is ``(x [E, T, A], y [E, T], C)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from learnopt.metrics import t_interval
from learnopt.vsml.online import OnlineLearner, online_episode

Stream = tuple[Tensor, Tensor, int]


def online_correct(learner: OnlineLearner, streams: Iterable[Stream], seed: int = 0) -> Tensor:
    """Whether each online prediction was right: ``[episodes, T]`` (0/1) over all batches; a
    prediction that is not finite counts as wrong.

    Args:
        learner: the online learner.
        streams: batches ``(x, y, C)``.
        seed: the first batch's generator seed (batch ``k``: ``seed + k``).
    Returns:
        ``[episodes, T]`` floats.
    """
    rows = []
    with torch.no_grad():
        for k, (x, y, C) in enumerate(streams):
            logits = online_episode(learner, x, y, C, torch.Generator().manual_seed(seed + k))
            ok = (logits.argmax(-1) == y) & torch.isfinite(logits).all(-1)
            rows.append(ok.float())
    return torch.cat(rows)


def tune_learning_rate(make: Callable[[float], OnlineLearner], lrs: Sequence[float], streams: list[Stream],
                       ) -> tuple[float, dict[float, float]]:
    """The learning rate of ``lrs`` with the highest mean online accuracy on ``streams``.

    Args:
        make: builds the learner for a rate.
        lrs: the rates tried.
        streams: tuning streams.
    Returns:
        ``(best rate, {rate: accuracy})``.
    """
    scores = {lr: float(online_correct(make(lr), streams).mean()) for lr in lrs}
    return max(scores, key=scores.get), scores


def log_grid(low: float, high: float) -> list[float]:
    """Half-decade grid ``low … high`` (1, 3.16, 10, …), the project's tuning protocol.

    Args:
        low: the first rate.
        high: the last rate.
    Returns:
        The grid.
    """
    n = int(round(2 * math.log10(high / low)))
    return [float(low * 10 ** (k / 2)) for k in range(n + 1)]


def running_accuracy(correct: Tensor) -> Tensor:
    """Mean over episodes of the accuracy up to each step: ``[T]``.

    Args:
        correct: ``[episodes, T]`` from ``online_correct``.
    Returns:
        ``[T]``.
    """
    steps = torch.arange(1, correct.shape[1] + 1, dtype=correct.dtype)
    return (correct.cumsum(1) / steps).mean(0)


def summary(correct: Tensor) -> dict[str, Any]:
    """Mean online accuracy per episode, its mean and 95% CI, and the raw per-episode values.

    Args:
        correct: ``[episodes, T]`` from ``online_correct``.
    Returns:
        ``{"mean", "ci95", "episodes", "per_episode"}``.
    """
    per_episode = correct.mean(1)
    mean, ci = t_interval(per_episode)
    return {"mean": mean, "ci95": ci, "episodes": len(per_episode), "per_episode": per_episode.tolist()}


def choose_ensemble(learner: Any, streams: list[Stream], sizes: Sequence[int] = (1, 2, 4, 8),
                    tolerance: float = 0.0005) -> tuple[int, dict[int, float]]:
    """The ensemble size of a VSML learner (``learner.ensemble``) chosen on ``streams``: the
    smallest of ``sizes`` whose mean online accuracy is within ``tolerance`` (a fraction; 0.0005
    is 0.05 points) of the best size's, since each member costs a whole network;
    ``learner.ensemble`` is left as it was.

    Args:
        learner: a ``VSMLNetwork``.
        streams: the selection streams.
        sizes: ensemble sizes tried.
        tolerance: accuracy a smaller size may lose.
    Returns:
        ``(size, {size: accuracy})``.
    Raises:
        ValueError: a size that is not an integer >= 1.
    """
    if not sizes or any(int(r) != r or r < 1 for r in sizes):
        raise ValueError(f"choose_ensemble: sizes must be integers >= 1, got {sizes}")
    before = learner.ensemble
    try:
        scores = {}
        for r in sizes:
            learner.ensemble = int(r)
            scores[int(r)] = float(online_correct(learner, streams).mean())
    finally:
        learner.ensemble = before
    best = max(scores.values())
    return min(r for r, s in scores.items() if s >= best - tolerance), scores
