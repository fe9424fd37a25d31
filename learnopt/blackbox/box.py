"""The search box of a black-box problem: reading it from the forms users write
(``as_bounds``) and the random symmetry of the box a seeded session searches through
(``box_symmetry``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def _is_tuple_pairs(bounds: Any) -> bool:
    """Whether ``bounds`` is a sequence of tuples: scipy's ``minimize`` form, one
    ``(lower, upper)`` pair per dimension, whatever the number of dimensions."""
    return isinstance(bounds, (list, tuple)) and len(bounds) > 0 and all(isinstance(b, tuple) for b in bounds)


def as_bounds(bounds: Any, dim: int | None = None) -> Tensor:
    """``bounds`` as a ``[2, D]`` float64 tensor (lower row, upper row).

    Accepted: ``scipy.optimize.Bounds(lower, upper)`` (scalars broadcast to ``dim``); one
    ``(lower, upper)`` tuple per dimension, ``[(-5, 10), (0, 15)]`` (scipy's ``minimize`` form);
    an array (or nested lists) whose shape tells which form it is: ``[D, 2]`` pairs or ``[2, D]``
    rows with ``D != 2``. A 2×2 array can be read either way, which gives two different boxes,
    so it is refused with the two spellings that are not ambiguous.

    Args:
        bounds: the box, in one of the forms above.
        dim: the expected dimension (None: any).
    Returns:
        ``[2, D]`` float64.
    Raises:
        ValueError: a shape that is not a box, an ambiguous 2×2 array, a dimension other than
            ``dim``, a bound that is not finite, or ``lower >= upper`` somewhere.
    """
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):  # scipy.optimize.Bounds (or alike)
        lb, ub = np.asarray(bounds.lb, dtype=np.float64), np.asarray(bounds.ub, dtype=np.float64)
        if lb.ndim > 1 or ub.ndim > 1:
            raise ValueError(f"bounds: scipy.optimize.Bounds with lb of shape {lb.shape} and ub of shape {ub.shape}; "
                             "expected scalars or one value per dimension")
        sizes = {lb.size, ub.size} - {1}  # (scipy stores a scalar bound as one value)
        if len(sizes) > 1:
            raise ValueError(f"bounds: scipy.optimize.Bounds lb ({lb.size} values) and ub ({ub.size} values) "
                             "differ in length")
        n = sizes.pop() if sizes else (dim or 1)
        b = np.stack([np.broadcast_to(lb.ravel(), (n,)), np.broadcast_to(ub.ravel(), (n,))])
    else:
        source = bounds.detach().cpu().numpy() if isinstance(bounds, Tensor) else bounds
        try:
            arr = np.asarray(source, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bounds must be numbers: (lower, upper) per dimension or scipy.optimize.Bounds ({e})") \
                from None
        if arr.ndim != 2 or 2 not in arr.shape:
            raise ValueError(f"bounds must be [(lower, upper), ...] per dimension, scipy.optimize.Bounds, or a [2, D] "
                             f"array of rows, got shape {tuple(arr.shape)}")
        if arr.shape[1] == 2 and (arr.shape[0] != 2 or _is_tuple_pairs(bounds)):
            b = arr.T  # one (lower, upper) pair per dimension
        elif arr.shape[1] != 2:
            b = arr  # [lower, upper] rows
        else:
            raise ValueError(
                f"bounds: the 2×2 array {arr.tolist()} is ambiguous: as [lower, upper] rows it is the box "
                f"{list(zip(arr[0].tolist(), arr[1].tolist()))}, as one pair per dimension the box "
                f"{[tuple(r) for r in arr.tolist()]}. Write per-dimension (lower, upper) tuples, e.g. "
                "[(-5, 10), (0, 15)], or scipy.optimize.Bounds(lower, upper)")
    b = torch.as_tensor(np.ascontiguousarray(b, dtype=np.float64))
    if dim is not None and b.shape[1] != dim:
        raise ValueError(f"bounds have {b.shape[1]} dimensions, the proposer was trained for {dim}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"bounds must be finite, got lower {b[0].tolist()} and upper {b[1].tolist()}")
    bad = (b[0] >= b[1]).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"bounds: lower >= upper in dimension(s) {bad}: "
                         + ", ".join(f"[{b[0, i]:g}, {b[1, i]:g}]" for i in bad))
    return b


def box_symmetry(dim: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The symmetry of the unit box a session with ``seed`` applies to the proposer's queries:
    a permutation of the coordinates and a reflection of each (``u[perm]``, then ``1 − u`` where
    ``flip``).

    Args:
        dim: ``D``.
        seed: the session's seed (None: the identity).
    Returns:
        ``(perm, flip)``: ``[D]`` int and ``[D]`` bool arrays.
    """
    if seed is None:
        return np.arange(dim), np.zeros(dim, dtype=bool)
    rng = np.random.default_rng([0x5E55, int(seed)])  # its own stream, apart from the exploration draws
    return rng.permutation(dim), rng.random(dim) < 0.5
