"""Muon (Jordan et al. 2024): momentum orthogonalised by a Newton–Schulz iteration, for the
2-d hidden weight matrices of a network; AdamW for everything else.

Reference: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
https://kellerjordan.github.io/posts/muon/ and https://github.com/KellerJordan/Muon
(``zeropower_via_newtonschulz5``, ``muon_update``, ``MuonWithAuxAdam``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, chain, zeros_like, rebuildable
from learnopt.optim.combinators import partition
from learnopt.optim.numerics import nonzero, safe_sqrt
from learnopt.optim.transforms import add_decayed_weights, scale_by_adam, scale_by_learning_rate

# Keller Jordan's quintic coefficients: chosen to maximise the slope at 0 (fast growth of small
# singular values) while keeping the iteration's fixed-point band around 1 ("original" preset of
# pytorch_optimizer). Not an exact polar factor: singular values end up in roughly [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise ``G`` (``U V^T`` of its SVD) with ``steps`` quintic Newton–Schulz
    iterations, batched over leading dimensions (each trailing matrix on its own)::

        X = G / (||G||_F + eps)              (transposed first when rows > cols, so X X^T is small)
        repeat steps:  A = X X^T;  B = b A + c A A;  X = a X + B X      (a, b, c) = NS_COEFFICIENTS

    Keller Jordan's reference casts to bfloat16 for speed; here the input's dtype is kept (so
    float64 results are exact); cast before calling for speed. The Frobenius norm uses
    ``safe_sqrt`` so differentiating through a zero matrix gives 0, not NaN.

    Args:
        G: ``[..., rows, cols]``, at least 2-d.
        steps: Newton–Schulz iterations.
        eps: added to the norm.
    Returns:
        The approximately orthogonalised matrices, shape and dtype of ``G``.
    Raises:
        ValueError: ``G`` has fewer than 2 dimensions.
    """
    if G.dim() < 2:
        raise ValueError(f"zeropower_via_newtonschulz5 needs a matrix (or a batch of them), got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    transpose = G.size(-2) > G.size(-1)
    X = G.mT if transpose else G
    X = X / (safe_sqrt((X * X).sum(dim=(-2, -1), keepdim=True)) + eps)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    for _ in range(steps):
        # fused multiply-adds (as torch.optim.Muon's addmm): one rounding per step in low precision
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(shape)
    return X.mT if transpose else X


class ScaleByMuonState(NamedTuple):
    momentum_buffer: Params


def _as_matrix(x: Tensor, batch_dims: int) -> Tensor:
    """``[*batch, rows, ...] -> [*batch, rows, prod(...)]`` (conv filters are flattened, as in the reference)."""
    if x.dim() - batch_dims < 2:
        raise ValueError(
            f"scale_by_muon orthogonalises matrices; got a tensor of shape {tuple(x.shape)} "
            f"with batch_dims={batch_dims} (route vectors to another transform, e.g. with learnopt.optim.muon's "
            "partition)"
        )
    return x.reshape(*x.shape[: batch_dims + 1], -1)


def scale_by_muon(momentum: Hyper = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  batch_dims: int = 0, ns_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Muon's direction for matrix parameters (``muon_update`` of Keller Jordan's reference)::

        b <- lerp(b, g, 1 - momentum)                         (b = momentum b + (1 - momentum) g)
        u = lerp(g, b, momentum) if nesterov else b
        u <- zeropower_via_newtonschulz5(u as [rows, cols]) * max(1, rows / cols) ** 0.5

    The factor ``sqrt(max(1, rows/cols))`` is Keller Jordan's: an orthogonal ``rows x cols`` matrix
    with rows > cols has per-entry RMS ``1/sqrt(rows)`` instead of ``1/sqrt(cols)``; the factor
    restores the update RMS of tall matrices (it is pytorch_optimizer's ``use_adjusted_lr=False``;
    Moonlight's ``0.2 * sqrt(max(rows, cols))`` is not used). ``rows`` is the first dimension after
    the ``batch_dims`` instance dimensions, ``cols`` the product of the rest. Each instance is
    orthogonalised on its own. ``ns_dtype=torch.bfloat16`` is what Keller Jordan's reference and
    ``torch.optim.Muon`` use; the result is cast back.

    Args:
        momentum: momentum factor.
        nesterov: use the Nesterov look-ahead.
        ns_steps: Newton–Schulz iterations.
        batch_dims: leading task-instance dimensions.
        ns_dtype: dtype of the Newton–Schulz iteration (None: the parameters').
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return ScaleByMuonState(zeros_like(params))

    def update(updates, state, params=None, **extra):
        buf = {k: state.momentum_buffer[k] + (1 - momentum) * (g - state.momentum_buffer[k])
               for k, g in updates.items()}
        out = {}
        for k, g in updates.items():
            u = g + momentum * (buf[k] - g) if nesterov else buf[k]
            m = _as_matrix(u, batch_dims)
            rows, cols = m.shape[-2], m.shape[-1]
            o = zeropower_via_newtonschulz5(m if ns_dtype is None else m.to(ns_dtype), ns_steps).to(m.dtype)
            out[k] = (o * math.sqrt(max(1.0, rows / cols))).reshape(g.shape)
        return out, ScaleByMuonState(buf)

    return GradientTransformation(init, update)


@rebuildable
def muon(lr: Hyper = 0.02, momentum: Hyper = 0.95, nesterov: bool = True, ns_steps: int = 5, weight_decay: Hyper = 0.0,
         adamw_lr: Hyper = 3e-4, adamw_betas: tuple[Hyper, Hyper] = (0.9, 0.95), adamw_eps: Hyper = 1e-8,
         adamw_weight_decay: Hyper = 0.0, batch_dims: int = 0, is_matrix: Callable[[str, Tensor], bool] | None = None,
         ns_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Muon for hidden weight matrices, AdamW for the rest (Keller Jordan's ``MuonWithAuxAdam``)::

        matrices:  p <- p - lr * (scale_by_muon(g) + weight_decay * p)
        the rest:  p <- p - adamw_lr * (adam(g; adamw_betas, adamw_eps) + adamw_weight_decay * p)

    Weight decay is decoupled in both groups (``p *= 1 - lr * wd``), as in the reference and
    ``torch.optim.AdamW``. Embeddings and output heads are 2-d but should go to AdamW (Jordan
    2024): pass ``is_matrix`` to exclude them by name. A custom ``is_matrix`` may also select conv
    filters (flattened to ``[out, in * k * k]``). ``ns_dtype=torch.bfloat16`` is the reference's.

    Args:
        lr: learning rate of the Muon parameters.
        momentum: Muon's momentum factor.
        nesterov: Muon's Nesterov look-ahead.
        ns_steps: Newton–Schulz iterations.
        weight_decay: decoupled weight decay of the Muon parameters.
        adamw_lr: learning rate of the other parameters.
        adamw_betas: their Adam betas.
        adamw_eps: their Adam eps.
        adamw_weight_decay: their decoupled weight decay.
        batch_dims: leading task-instance dimensions.
        is_matrix: ``is_matrix(name, tensor)`` selects the Muon parameters (None: 2-d after ``batch_dims``).
        ns_dtype: dtype of the Newton–Schulz iteration (None: the parameters').
    Returns:
        A ``GradientTransformation`` (a ``partition`` of the two groups).
    References:
        Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
        https://kellerjordan.github.io/posts/muon/
    """
    if is_matrix is None:
        def is_matrix(name: str, x: Tensor) -> bool:
            return x.dim() - batch_dims == 2

    def decay(wd: Hyper) -> list[GradientTransformation]:
        return [add_decayed_weights(wd)] if nonzero(wd) else []

    matrices = chain(scale_by_muon(momentum, nesterov, ns_steps, batch_dims, ns_dtype), *decay(weight_decay),
                     scale_by_learning_rate(lr))
    rest = chain(scale_by_adam(adamw_betas[0], adamw_betas[1], adamw_eps), *decay(adamw_weight_decay),
                 scale_by_learning_rate(adamw_lr))
    return partition({"muon": matrices, "adamw": rest},
                     lambda name, x: "muon" if is_matrix(name, x) else "adamw")
