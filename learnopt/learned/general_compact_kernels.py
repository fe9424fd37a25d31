"""The compiled drop-in of ``CompactNormalizedOptimizer`` (``learnopt.learned.general_compact``):
two loops per parameter tensor, written for ``torch.compile`` (inductor fuses each into one pass
over the tensor, so the features and hidden units never reach memory):

- ``feature_square_sums`` reads the gradient and the moments and returns the sums of squares of
  the next step's features (their per-tensor RMS) and the gradient's sum (its finiteness check);
- ``direction_into`` updates the moments in place and writes the un-normalized direction,
  returning the magnitude head's sum and ``Σ d²``.

``CompactNormalizedOptimizer.update_fast(..., compiled=True)`` calls them (tested equal to its
eager path and to the reference ``update``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

# Smaller tensors take the eager drop-in even with compile=True: a compiled call's guards cost
# more than their arithmetic (and inductor specializes its loops at 4,097 elements).
COMPILE_MIN_SIZE = 4097


def _features(g: Tensor, m: list[Tensor], v: Tensor, decay_weight: Tensor, beta2: float, eps2: Tensor,
              adam_row: int) -> tuple[list[Tensor], Tensor]:
    """The features ``[g, m …, r, m[adam_row] · r]`` of the updated momenta, ``r = rsqrt(v +
    eps2)``, and the updated ``v``. The momenta come as a list of ``[n]`` rows: a ``[K, n]``
    tensor makes inductor add loops over both dimensions."""
    rows = [torch.lerp(m_i, g, decay_weight[i]) for i, m_i in enumerate(m)]
    v_new = v * beta2 + (1.0 - beta2) * g * g
    r = torch.rsqrt(v_new + eps2)
    return [g, *rows, r, rows[adam_row] * r], v_new


def feature_square_sums(g: Tensor, m: list[Tensor], v: Tensor, decay_weight: Tensor, beta2: float, scalars: Tensor,
                        adam_row: int) -> Tensor:
    """``[Σ g, Σ x_i² for the features x_i]`` of one tensor's next step, from the gradient
    ``g [n]``, the momenta ``m`` (``K`` rows ``[n]``) and second moment ``v [n]`` before it; ``scalars[0]``:
    ``eps2`` (one read-only loop once compiled; ``Σ g`` is non-finite exactly when
    the gradient is, up to overflow).

    Args:
        g: the gradient ``[n]``.
        m: the momenta, ``K`` tensors ``[n]`` (read only).
        v: the second moment ``[n]`` (read only).
        decay_weight: ``[K]``, ``1 − b`` per momentum decay ``b``.
        beta2: the second moment's decay.
        scalars: ``[eps2, ...]``.
        adam_row: index in ``m`` of the Adam direction's momentum.

    Returns:
        ``[1 + K + 3]``: ``Σ g`` then the features' sums of squares.
    """
    xs, _ = _features(g, m, v, decay_weight, beta2, scalars[0], adam_row)
    return torch.stack([g.sum(), *[(x * x).sum() for x in xs]])


def direction_into(d: Tensor, g: Tensor, m: list[Tensor], v: Tensor, decay_weight: Tensor, beta2: float,
                   scalars: Tensor, w: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, adam_row: int) -> Tensor:
    """Update ``m`` and ``v`` in place and write the direction before its normalization,
    ``d = scalars[1] · x_adam + w2[0] · relu(w x + b1) + b2[0]`` over the features ``x``
    (``_features``), the features' normalization folded into ``w`` and ``scalars[1]`` by the
    caller (left to inductor, it recomputes them at every coordinate); returns
    ``[Σ_coordinates w2[1] · h, Σ d²]`` (one loop once compiled: the hidden units never reach
    memory).

    Args:
        d: the output ``[n]``, overwritten with the direction.
        g, m, v, decay_weight, beta2, adam_row: as ``feature_square_sums`` (``m`` and ``v`` updated in place).
        scalars: ``[eps2, nominal weight of x_adam]``.
        w: the first layer's weight on the features ``[hidden, K + 3]``, normalization folded in.
        b1: the first layer's bias ``[hidden]``, progress folded in.
        w2: the second layer's weight ``[2, hidden]``.
        b2: the second layer's bias ``[2]``.

    Returns:
        ``[Σ w2[1] · h, Σ d²]``.
    """
    xs, v_new = _features(g, m, v, decay_weight, beta2, scalars[0], adam_row)
    out = scalars[1] * xs[-1] + b2[0]
    magnitude = torch.zeros((), dtype=g.dtype, device=g.device)
    for j in range(w.shape[0]):
        z = b1[j] + w[j, 0] * xs[0]
        for i in range(1, len(xs)):
            z = z + w[j, i] * xs[i]
        h = torch.relu(z)
        magnitude = magnitude + w2[1, j] * h.sum()
        out = out + w2[0, j] * h
    for i, m_i in enumerate(m):
        m_i.copy_(xs[1 + i])
    v.copy_(v_new)
    d.copy_(out)
    return torch.stack([magnitude, (out * out).sum()])


_KERNELS: list[Any] = []


def compiled_kernels() -> tuple[Any, Any] | None:
    """``torch.compile``d ``feature_square_sums`` and ``direction_into`` (dynamic shapes:
    one compilation serves every tensor size), tried once on a small input; None, with a
    warning, where inductor cannot build them (no C++ compiler, a backend failure).

    Returns:
        ``(feature_square_sums, direction_into)`` compiled, or None.
    """
    if not _KERNELS:
        kernels = (torch.compile(feature_square_sums, dynamic=True), torch.compile(direction_into, dynamic=True))
        try:
            n, g = COMPILE_MIN_SIZE, torch.linspace(-1.0, 1.0, COMPILE_MIN_SIZE)
            m, v = [torch.zeros(n), torch.zeros(n)], torch.zeros(n)
            scalars, decay = torch.tensor([1e-16, 1.0]), torch.tensor([0.1, 0.01])
            kernels[0](g, m, v, decay, 0.999, scalars, 0)
            kernels[1](torch.empty(n), g, m, v, decay, 0.999, scalars, torch.ones(4, 5), torch.ones(4),
                       torch.ones(2, 4), torch.ones(2), 0)
        except Exception as error:  # no C++ compiler, an inductor failure: the eager path serves
            warnings.warn(f"CompactNormalizedOptimizer: torch.compile failed ({type(error).__name__}: {error}); "
                          "running the drop-in eagerly", RuntimeWarning, stacklevel=3)
            kernels = None
        _KERNELS.append(kernels)
    return _KERNELS[0]
