"""Gradient preprocessing for coordinate-wise learned optimizers."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log_and_sign(g: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. 2016, appendix A: each coordinate g becomes two inputs::

        (log|g| / p, sign g)   if |g| >= e^-p
        (-1, e^p g)            otherwise

    so gradients spanning many orders of magnitude reach the LSTM on one scale. The paper
    uses p = 10, the authors' code p = 5. The ``log`` is taken of
    a clamped value so no inf or NaN arises at ``g == 0``, in either branch's derivative.

    Args:
        g: the gradient, any shape.
        p: the scale ``p`` above.
    Returns:
        ``[*g.shape, 2]``.
    References:
        Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent", arXiv 1606.04474.
    """
    threshold = math.exp(-p)
    big = g.abs() >= threshold
    log_part = torch.log(g.abs().clamp_min(threshold)) / p
    first = torch.where(big, log_part, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), math.exp(p) * g)
    return torch.stack([first, second], dim=-1)
