"""The exact line search of a metric of argmax decisions along a line in weight space.

A linear scorer gives example ``i``'s candidate ``c`` the score ``a[i, c] + t b[i, c]`` at step
``t`` along a direction (``a = F w``, ``b = F d`` for features ``F``). The decision of example ``i``
is the argmax over candidates (the lowest index among equal scores), which changes only where
two of its lines cross, so any metric of the decisions is piecewise constant in ``t``. Sweeping
the breakpoints of each example's upper envelope finds the exact minimiser (Och 2003, ACL
P03-1021, section 6; the envelope as in Macherey et al. 2008).

Metrics are given by additive sufficient statistics: ``stats[i, c, :]`` is what example ``i``
contributes when it decides ``c`` (an error indicator; BLEU's n-gram counts), and
``aggregate(totals[m, K]) -> [m]`` turns summed statistics into the loss to minimise. The sweep
updates the totals at each breakpoint, so every interval is scored exactly.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

# Examples per block of the envelope computation: the pairwise crossings take n·C²·C floats.
_BLOCK_ELEMENTS = 1 << 22


class DecisionMetric(NamedTuple):
    """``stats[i, c, k]``: example ``i``'s statistics when it decides ``c``; ``aggregate``:
    ``[m, K]`` summed statistics to ``[m]`` losses (lower is better)."""

    stats: np.ndarray
    aggregate: Callable[[np.ndarray], np.ndarray]

    def __call__(self, decisions: np.ndarray) -> float:
        totals = self.stats[np.arange(len(decisions)), decisions].sum(axis=0)
        return float(self.aggregate(totals[None])[0])


class LineSearchResult(NamedTuple):
    """``step``: the chosen ``t`` (0 when nothing beats the start); ``value``: the metric there;
    ``start_value``: the metric at ``t = 0``; ``breakpoints``: where some decision changes;
    ``interval_values``: the metric on each interval between them (``len(breakpoints) + 1``)."""

    step: float
    value: float
    start_value: float
    breakpoints: np.ndarray
    interval_values: np.ndarray


def error_metric(labels: np.ndarray, num_candidates: int) -> DecisionMetric:
    """The 0/1 error rate of decisions against ``labels`` (candidate indices).

    Args:
      labels: ``[n]`` the correct candidate of each example.
      num_candidates: ``C``.
    Returns:
      A ``DecisionMetric``.
    """
    labels = np.asarray(labels)
    stats = (np.arange(num_candidates)[None, :] != labels[:, None]).astype(np.float64)[..., None]
    n = len(labels)
    return DecisionMetric(stats, lambda totals: totals[:, 0] / n)


def decisions_at(a: np.ndarray, b: np.ndarray, t: float, mask: np.ndarray | None = None) -> np.ndarray:
    """The argmax decision of every example at step ``t`` (lowest index among equal scores).

    Args:
      a: ``[n, C]`` scores at ``t = 0``.
      b: ``[n, C]`` slopes.
      t: the step.
      mask: ``[n, C]``, False for missing candidates.
    Returns:
      ``[n]`` candidate indices.
    """
    scores = a + t * b
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    return np.argmax(scores, axis=1)


def _envelopes(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Every change of an example's decision as ``(example, t, old, new)`` arrays, and each
    example's decision on ``(-inf, its first crossing)``.

    Between two consecutive crossings of an example's lines its argmax is constant, so it is
    read at their midpoints; a change between neighbouring intervals happens at the crossing
    that separates them."""
    n, C = a.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (a[:, :, None] - a[:, None, :]) / (b[:, None, :] - b[:, :, None])  # [n, C, C]
    upper = np.triu(np.ones((C, C), dtype=bool), k=1)[None]  # each pair of lines once
    valid = upper & np.isfinite(cross) & (b[:, None, :] != b[:, :, None])
    if mask is not None:
        valid &= mask[:, :, None] & mask[:, None, :]
    cross = np.sort(np.where(valid, cross, np.nan).reshape(n, C * C), axis=1)  # NaNs last
    count = np.sum(~np.isnan(cross), axis=1)
    width = int(count.max()) if n else 0
    cross = cross[:, :width]
    # one point inside each interval: t_1 - 1, the midpoints, t_k + 1 (at index k = count)
    points = np.full((n, width + 1), np.nan)
    if width:
        points[:, 0] = cross[:, 0] - 1.0
        points[:, 1:width] = 0.5 * (cross[:, :-1] + cross[:, 1:])
        has = count > 0
        points[np.nonzero(has)[0], count[has]] = cross[has, count[has] - 1] + 1.0
    points[count == 0, 0] = 0.0
    scores = a[:, None, :] + np.where(np.isnan(points), 0.0, points)[:, :, None] * b[:, None, :]
    if mask is not None:
        scores = np.where(mask[:, None, :], scores, -np.inf)
    dec = np.argmax(scores, axis=2)  # [n, width + 1]; column j: the interval after crossing j - 1
    change = (np.arange(width)[None, :] < count[:, None]) & (dec[:, 1:] != dec[:, :-1])
    ex, pos = np.nonzero(change)
    return ex, cross[ex, pos], dec[ex, pos], dec[ex, pos + 1], dec[:, 0]


def exact_line_search(a: np.ndarray, b: np.ndarray, metric: DecisionMetric,
                      mask: np.ndarray | None = None) -> LineSearchResult:
    """The step ``t`` minimising ``metric`` of the decisions ``argmax_c a[i, c] + t b[i, c]``.

    Args:
      a: ``[n, C]`` scores at ``t = 0``.
      b: ``[n, C]`` their slopes along the direction.
      metric: the loss of the decisions (``DecisionMetric``).
      mask: optional ``[n, C]`` booleans, ``False`` for candidates that do not exist (n-best
        lists of different lengths).
    Returns:
      A ``LineSearchResult``. Every interval between breakpoints is scored exactly; the step is
      the centre of the best interval (nearest to 0 among equals; for an unbounded interval, one
      unit or its neighbour's width beyond the breakpoint), or 0 when no interval is strictly
      better than ``t = 0`` itself, so the result is never worse than the start.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"exact_line_search: a and b must be [n, C] of one shape, got {a.shape} and {b.shape}")
    if metric.stats.shape[:2] != a.shape:
        raise ValueError(f"exact_line_search: metric statistics are {metric.stats.shape[:2]}, scores {a.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("exact_line_search: scores and slopes must be finite")
    start_value = metric(decisions_at(a, b, 0.0, mask))
    block = max(1, _BLOCK_ELEMENTS // a.shape[1] ** 3)
    events, firsts = [], []
    for lo in range(0, len(a), block):
        ex, t, old, new, first = _envelopes(a[lo:lo + block], b[lo:lo + block],
                                            None if mask is None else mask[lo:lo + block])
        events.append((ex + lo, t, old, new))
        firsts.append(first)
    ex, t, old, new = (np.concatenate(parts) for parts in zip(*events))
    first = np.concatenate(firsts)
    order = np.argsort(t, kind="stable")
    ex, t, old, new = ex[order], t[order], old[order], new[order]
    stats = metric.stats
    totals0 = stats[np.arange(len(a)), first].sum(axis=0)
    deltas = stats[ex, new] - stats[ex, old]
    totals = totals0[None] + np.cumsum(deltas, axis=0)
    breakpoints, last_of_group = _unique_sorted(t)
    interval_totals = np.concatenate([totals0[None], totals[last_of_group]], axis=0)
    values = np.asarray(metric.aggregate(interval_totals), dtype=np.float64)
    best = values.min()
    if not best < start_value:
        return LineSearchResult(0.0, start_value, start_value, breakpoints, values)
    centres = _centres(breakpoints)
    candidates = np.nonzero(values == best)[0]
    choice = candidates[np.argmin(np.abs(centres[candidates]))]
    return LineSearchResult(float(centres[choice]), float(best), start_value, breakpoints, values)


def _unique_sorted(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of sorted ``t`` and the index of the last occurrence of each."""
    if len(t) == 0:
        return t, np.zeros(0, dtype=np.int64)
    last = np.nonzero(np.append(t[1:] != t[:-1], True))[0]
    return t[last], last


def _centres(breakpoints: np.ndarray) -> np.ndarray:
    """A point inside each interval: midpoints, and beyond the ends by the neighbouring width
    (or 1 where there is none)."""
    if len(breakpoints) == 0:
        return np.zeros(1)
    width = float(np.max(np.diff(breakpoints))) if len(breakpoints) > 1 else 1.0
    width = max(width, 1.0)
    mids = 0.5 * (breakpoints[:-1] + breakpoints[1:])
    return np.concatenate([[breakpoints[0] - width], mids, [breakpoints[-1] + width]])
