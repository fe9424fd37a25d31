"""Statistics of optimizer comparisons: the speedup over a reference (VeLO's), the steps to
reach a level, and the t-interval over seeds (a leaf module: ``evaluate`` and ``compare`` both
use it)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def steps_to_reach(curve: Sequence[float], level: float) -> int | None:
    """First inner step at which ``curve`` is at or below ``level`` (None: never).

    Args:
        curve: one value per inner step, step 0 first.
        level: the level.
    Returns:
        The step index, or None.
    """
    return next((t for t, v in enumerate(curve) if v <= level), None)


def speedup(curve: Sequence[float], reference: Sequence[float]) -> float:
    """Speedup of the optimizer with loss curve ``curve`` over the one with ``reference``
    (tuned Adam), in the spirit of VeLO's evaluation (Metz et al. 2022).

    Both curves hold one value per inner step (step 0 first), e.g. mean log10 loss; lower is
    better. Let ``L`` be the worse of the two final values, ``max(curve[-1], reference[-1])``,
    a level both optimizers reach within their runs, and ``s(c, L)`` the first step at which
    curve ``c`` is at or below ``L``. Then

        speedup = s(reference, L) / s(curve, L)

    If the optimizer ends better than Adam, ``L`` is Adam's final loss and the speedup is how
    many times fewer steps the optimizer needs to reach it (Adam first reaching its final loss
    at step 100 and the optimizer reaching it at step 25 gives 4). If it ends worse, ``L`` is its
    own final loss and the speedup is below 1: Adam reaching that loss at step 50 while the
    optimizer first got there at step 100 gives 0.5. Adam against itself gives 1, and
    ``speedup(a, b) == 1 / speedup(b, a)``.

    Edge cases: an optimizer whose final value is not below its starting value (no progress)
    or not finite (diverged) gets 0; one that made progress against a reference that made none
    (or diverged) gets infinity.

    Args:
        curve: the optimizer's curve.
        reference: the reference's curve.
    Returns:
        The speedup (0 or infinity in the edge cases above).
    Raises:
        ValueError: an empty curve.
    References:
        Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up", arXiv 2211.09760.
    """
    if not curve or not reference:
        raise ValueError("speedup needs two non-empty curves")
    final, ref_final = float(curve[-1]), float(reference[-1])
    if not math.isfinite(final) or not final < float(curve[0]):
        return 0.0
    if not math.isfinite(ref_final):
        return math.inf
    level = max(final, ref_final)
    steps, ref_steps = steps_to_reach(curve, level), steps_to_reach(reference, level)
    assert steps is not None and ref_steps is not None  # the worse curve reaches its own end
    if steps == 0:  # the reference never got below where this curve started
        return math.inf
    return ref_steps / steps


def t_interval(x: Tensor | Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided t confidence interval of the mean.

    Args:
        x: the samples (any shape; flattened), computed in float64.
        confidence: the interval's coverage.

    Returns:
        ``(mean, half_width)``; the half-width is NaN for fewer than two samples.
    """
    from scipy.stats import t as student_t

    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan")
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(unbiased=True)) / math.sqrt(n)
    return mean, half
