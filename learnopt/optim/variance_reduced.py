"""Variance-reduced methods for finite sums ``f(x) = (1/n) sum_i f_i(x)``: SVRG, SAGA, JacSketch.

They read the minibatch and gradient oracles from the extra arguments (``learnopt.optim.extra``):
``indices`` (this step's example indices), ``batch_grad_fn(params, indices)`` (mean gradient over
``indices``), ``full_grad_fn(params)``, ``example_grads_fn(params, indices)`` (per-example gradients
with a leading ``len(indices)`` dimension) and ``num_examples``. Everything is elementwise in the
parameters, so batched instances (leading dimensions) work unchanged when the oracles return
batched gradients; the minibatch is shared by all instances.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, zeros_like, rebuildable
from learnopt.optim.extra import require
from learnopt.optim.numerics import count_like


def _epoch_length(epoch_length: int | None, extra: dict, indices: Tensor, per_pass: float, who: str) -> int:
    if epoch_length is not None:
        return epoch_length
    n = int(require(extra, "num_examples", who))
    return max(1, int(per_pass * n) // len(indices))


# -- SVRG -------------------------------------------------------------------------------------
class SVRGState(NamedTuple):
    count: Tensor
    snapshot: Params
    snapshot_grad: Params


@rebuildable
def svrg(lr: Hyper = 1e-2, epoch_length: int | None = None) -> GradientTransformation:
    """Stochastic variance-reduced gradient (Johnson & Zhang 2013, NeurIPS), option I::

        every m updates (from the first):  w = x;  mu = full_grad_fn(w)
        x <- x - lr * (grads - batch_grad_fn(w, indices) + mu)

    ``grads`` is the minibatch ``indices``' mean gradient at ``x``. The default ``m`` is the paper's
    ``m = 2n`` for convex problems, in minibatch steps. Option I: the snapshot is the last iterate
    (the paper's option II, a random earlier iterate, is not implemented).

    Args:
        lr: step size.
        epoch_length: ``m`` (None: ``2 * num_examples // len(indices)``).
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return SVRGState(count_like(params), zeros_like(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        indices = require(extra, "indices", "svrg")
        m = _epoch_length(epoch_length, extra, indices, 2.0, "svrg")
        snapshot, mu = state.snapshot, state.snapshot_grad
        if int(state.count) % m == 0:
            if params is None:
                raise ValueError("svrg needs params (to take snapshots)")
            snapshot = dict(params)
            mu = require(extra, "full_grad_fn", "svrg")(snapshot)
        at_snapshot = require(extra, "batch_grad_fn", "svrg")(snapshot, indices)
        out = {k: -lr * (g - at_snapshot[k] + mu[k]) for k, g in updates.items()}
        return out, SVRGState(state.count + 1, snapshot, mu)

    return GradientTransformation(init, update)


# -- SAGA and JacSketch: a table of per-example gradients ----------------------------------------
class GradientTableState(NamedTuple):
    """``table[k][i]``: the stored gradient (Jacobian column) of example ``i``; ``mean``: its average
    over all examples, kept up to date incrementally."""

    count: Tensor
    table: Params
    mean: Params


def _table_init(num_examples: int) -> Callable[[Params], GradientTableState]:
    def init(params):
        table = {k: p.new_zeros((num_examples,) + p.shape) for k, p in params.items()}
        return GradientTableState(count_like(params), table, zeros_like(params))

    return init


def _checked_indices(extra: dict, num_examples: int, who: str, state: GradientTableState) -> Tensor:
    """This step's example indices, on the table's device (they index it)."""
    table = next(iter(state.table.values()), None)
    indices = torch.as_tensor(require(extra, "indices", who))
    if table is not None:
        indices = indices.to(table.device)
    n = extra.get("num_examples")
    if n is not None and int(n) != num_examples:
        raise ValueError(f"{who} was built for num_examples={num_examples}, the step says {int(n)}")
    if indices.numel() != torch.unique(indices).numel():
        raise ValueError(f"{who}: a minibatch must not repeat an example (sample without replacement)")
    return indices


def _filled_table(state: GradientTableState, params: Params, extra: dict, num_examples: int, table_init: str,
                  who: str) -> GradientTableState:
    """The paper's start ``phi_i = x_0``: on the first update, every example's gradient at ``x_0``."""
    if table_init == "zeros" or int(state.count) > 0:
        return state
    if params is None:
        raise ValueError(f"{who} needs params to fill its gradient table")
    every = torch.arange(num_examples, device=next(iter(params.values())).device)
    table = require(extra, "example_grads_fn", who)(params, every)
    return GradientTableState(state.count, dict(table), {k: t.sum(0) / num_examples for k, t in table.items()})


def _check_table_init(table_init: str) -> None:
    if table_init not in ("full", "zeros"):
        raise ValueError(f"table_init must be 'full' or 'zeros', got {table_init!r}")


@rebuildable
def saga(lr: Hyper = 1e-2, num_examples: int = 0, table_init: str = "full") -> GradientTransformation:
    """SAGA (Defazio, Bach & Lacoste-Julien 2014, NeurIPS, arXiv 1407.0202), with minibatches::

        G_j = grad f_j(x) for j in B = indices                      (example_grads_fn)
        x <- x - lr * (sum_{j in B} (G_j - T_j) / |B| + mean_i T_i)
        T_j <- G_j for j in B

    The table holds ``n`` copies of the parameters. ``table_init="full"``
    starts from the paper's ``phi_i = x_0`` (all ``n`` example gradients at the first point, one
    extra pass); ``"zeros"`` starts from an empty table. A minibatch must not repeat an example.
    The ``grads`` argument is not used: SAGA needs the per-example gradients, whose mean it is.

    Args:
        lr: step size.
        num_examples: ``n``, the size of the gradient table.
        table_init: ``"full"`` or ``"zeros"``.
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: ``num_examples < 1`` or an unknown ``table_init``.
    """
    if num_examples < 1:
        raise ValueError("saga needs num_examples (the size of its gradient table)")
    _check_table_init(table_init)

    def update(updates, state, params=None, **extra):
        indices = _checked_indices(extra, num_examples, "saga", state)
        state = _filled_table(state, params, extra, num_examples, table_init, "saga")
        G = require(extra, "example_grads_fn", "saga")(params, indices)
        out, table, mean = {}, {}, {}
        for k in updates:
            diff = G[k] - state.table[k][indices]
            out[k] = -lr * (diff.sum(0) / len(indices) + state.mean[k])
            table[k] = state.table[k].index_copy(0, indices, G[k])
            mean[k] = state.mean[k] + diff.sum(0) / num_examples
        return out, GradientTableState(state.count + 1, table, mean)

    return GradientTransformation(_table_init(num_examples), update)


@rebuildable
def jacsketch(lr: Hyper = 1e-2, num_examples: int = 0, sketch: str | Callable[[Tensor], Tensor] = "saga",
              theta: float | None = None, table_init: str = "full") -> GradientTransformation:
    """JacSketch (Gower, Richtárik & Bach 2018, "Stochastic quasi-gradient methods: variance reduction
    via Jacobian sketching", Math. Programming; arXiv 1805.02632) with sketches supported on the
    minibatch, ``S = I_{:,B} R`` and ``W = I``::

        Jacobian estimate J (n columns, one per example), D = grad F(x) S - J S (only B's columns)
        Pi = S (S^T S)^+ S^T = I_B P I_B^T  with  P = R (R^T R)^+ R^T
        g = J e / n + (theta / n) (grad F(x) - J) Pi e = mean_i J_i + (theta / n) sum_b (D P)_b
        x <- x - lr * g;      J <- J + (grad F(x) - J) Pi     (columns B: J_B <- J_B + D P)

    ``sketch="saga"`` is ``R = I`` (replace the sampled columns): minibatch SAGA, computed exactly as
    ``saga`` computes it. ``"mean"`` is ``R = 1`` (one column: all sampled columns move by the mean
    of their residuals). A callable maps ``indices`` to ``R`` (``|B| x r``). The default ``theta``
    makes ``g`` unbiased for uniformly sampled minibatches whenever ``1 in span(R)`` (then
    ``Pi e = 1_B``); ``theta = 1`` gives a SAG-like biased estimate.

    Args:
        lr: step size.
        num_examples: ``n``, the number of columns of ``J``.
        sketch: ``"saga"``, ``"mean"`` or a callable ``indices -> R``.
        theta: the bias-correction scalar (None: ``n / |B|``).
        table_init: ``"full"`` or ``"zeros"``, as in ``saga``.
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: ``num_examples < 1``, an unknown ``table_init`` or ``sketch``.
    """
    if num_examples < 1:
        raise ValueError("jacsketch needs num_examples (the size of its Jacobian estimate)")
    _check_table_init(table_init)
    if not (callable(sketch) or sketch in ("saga", "mean")):
        raise ValueError(f"sketch must be 'saga', 'mean' or a callable indices -> R, got {sketch!r}")

    def projection(indices: Tensor, like: Tensor) -> Tensor | None:
        if sketch == "saga":
            return None  # P = I
        R = torch.ones(len(indices), 1, dtype=like.dtype, device=like.device) if sketch == "mean" else sketch(indices)
        R = torch.as_tensor(R, dtype=like.dtype, device=like.device)
        return R @ torch.linalg.pinv(R)  # R (R^T R)^+ R^T

    def update(updates, state, params=None, **extra):
        indices = _checked_indices(extra, num_examples, "jacsketch", state)
        state = _filled_table(state, params, extra, num_examples, table_init, "jacsketch")
        G = require(extra, "example_grads_fn", "jacsketch")(params, indices)
        P = projection(indices, next(iter(G.values())))
        out, table, mean = {}, {}, {}
        for k in updates:
            D = G[k] - state.table[k][indices]
            DP = D if P is None else torch.tensordot(P, D, dims=([0], [0]))  # (D P)_b = sum_a P_ab D_a
            correction = DP.sum(0) / len(indices) if theta is None else (theta / num_examples) * DP.sum(0)
            out[k] = -lr * (correction + state.mean[k])
            table[k] = state.table[k].index_copy(0, indices, state.table[k][indices] + DP if P is not None else G[k])
            mean[k] = state.mean[k] + DP.sum(0) / num_examples
        return out, GradientTableState(state.count + 1, table, mean)

    return GradientTransformation(_table_init(num_examples), update)
