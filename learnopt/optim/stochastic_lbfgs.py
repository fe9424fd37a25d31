"""The stochastic L-BFGS of Moritz, Nishihara & Jordan (2016, AISTATS, arXiv 1508.02087): SVRG
gradients preconditioned by an L-BFGS two-loop recursion whose curvature pairs come from
subsampled Hessian-vector products at averaged iterates (the two-loop machinery is
``quasi_newton``'s)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, rebuildable, zeros_like
from learnopt.optim.extra import MissingExtraArgument, require
from learnopt.optim.quasi_newton import _push, _push_scalar, _Trees, _two_loop


def _hvp_at(loss_fn: Callable[[Params], Tensor], point: Params, v: Params) -> Params:
    """``H(point) v`` as a vector-Jacobian product of the gradient with ``v`` held fixed (``v`` is
    built from the iterates, so differentiating ``<grad, v>`` would add ``grad`` itself). Stays
    differentiable when ``point`` or ``v`` carry a graph (unrolled meta-training). Per-instance
    losses are summed: the Hessian of the sum is each instance's own."""
    differentiable = any(t.requires_grad for t in (*point.values(), *v.values()))
    with torch.enable_grad():
        p = {k: x if x.requires_grad else x.detach().requires_grad_(True) for k, x in point.items()}
        grads = torch.autograd.grad(loss_fn(p).sum(), list(p.values()), create_graph=True)
        hv = torch.autograd.grad(grads, list(p.values()), grad_outputs=[v[k] for k in p],
                                 create_graph=differentiable, allow_unused=True)
    return {k: torch.zeros_like(p[k]) if h is None else h for k, h in zip(p, hv)}


class StochasticLBFGSState(NamedTuple):
    count: Tensor
    snapshot: Params
    snapshot_grad: Params
    iterate_sum: Params
    previous_average: Params
    s: Params
    y: Params
    rho: Tensor
    num_pairs: Tensor
    H_diag: Tensor


@rebuildable
def stochastic_lbfgs(lr: Hyper = 1e-2, history_size: int = 10, hessian_period: int = 10,
                     epoch_length: int | None = None, batch_dims: int = 0) -> GradientTransformation:
    """Stochastic L-BFGS with SVRG variance reduction (Moritz, Nishihara & Jordan 2016, "A
    Linearly-Convergent Stochastic L-BFGS Algorithm", AISTATS; arXiv 1508.02087), Algorithm 1 with
    option I. One ``update`` is one inner iteration; with ``c`` the number of previous updates::

        if c % m == 0:  w = x;  mu = full_grad_fn(w)                 (new epoch: snapshot, Option I)
        v = grads - batch_grad_fn(w, indices) + mu                   (variance-reduced gradient)
        x <- x - lr * H v            (H: two-loop recursion over the last M pairs, initial matrix
                                      (s.y / y.y) I of the newest pair; H = I before the first pair)
        every L updates (c % L == L - 1):
            u = mean of the last L iterates x (those at which grads were taken)
            s = u - u_prev;  y = Hessian(u) s on the Hessian subsample;  keep (s, y) if s.y > 0
            u_prev = u                                                (u_0 = the initial parameters)

    The default epoch is one pass over the data, as in the paper's experiments. The minibatch S
    is the extra ``indices`` (``grads`` is its mean gradient at ``x``); ``batch_grad_fn`` gives the
    same minibatch's gradient at the snapshot, ``full_grad_fn`` the full gradient at epoch starts.
    The Hessian subsample T is whatever the extra ``loss_fn`` sums
    over on the steps that form a pair: the product is taken at the averaged iterate ``u``, not at
    ``params``, so ``hvp_fn`` cannot serve. The ``s.y > 0`` test (always true for strictly convex
    problems) guards the two-loop recursion on non-convex ones.

    Args:
        lr: eta, the step size.
        history_size: M, the number of curvature pairs kept.
        hessian_period: L, updates between curvature pairs.
        epoch_length: m, updates between snapshots (None: ``num_examples // len(indices)``, one pass).
        batch_dims: leading task-instance dimensions.
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: a non-positive ``history_size`` or ``hessian_period``.
    """
    if history_size < 1 or hessian_period < 1:
        raise ValueError("history_size and hessian_period must be positive")
    M, L = history_size, hessian_period

    def init(params):
        trees = _Trees(params, batch_dims)
        count = torch.zeros((), dtype=torch.int64, device=trees.device)
        z = zeros_like(params)
        return StochasticLBFGSState(
            count, z, z, z, {k: p.detach().clone() for k, p in params.items()},
            {k: p.new_zeros((M,) + p.shape) for k, p in params.items()},
            {k: p.new_zeros((M,) + p.shape) for k, p in params.items()},
            torch.zeros((M,) + tuple(trees.shape), dtype=trees.dtype, device=trees.device),
            trees.full(0, torch.int64), trees.full(1.0),
        )

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("stochastic_lbfgs needs params")
        trees = _Trees(params, batch_dims)
        indices = require(extra, "indices", "stochastic_lbfgs")
        m = epoch_length or max(1, int(require(extra, "num_examples", "stochastic_lbfgs")) // len(indices))
        c = int(state.count)
        snapshot, mu = state.snapshot, state.snapshot_grad
        if c % m == 0:
            snapshot = dict(params)
            mu = require(extra, "full_grad_fn", "stochastic_lbfgs")(snapshot)
        snap_grad = require(extra, "batch_grad_fn", "stochastic_lbfgs")(snapshot, indices)
        v = {k: g - snap_grad[k] + mu[k] for k, g in updates.items()}

        s, y, rho, num, gamma = state.s, state.y, state.rho, state.num_pairs, state.H_diag
        # -H v by the two-loop recursion; with no pair yet (num == 0, gamma == 1) it is -v (an SVRG step)
        direction = _two_loop(trees, v, y, s, rho, num, gamma)
        out = {k: lr * direction[k] for k in params}

        iterate_sum = {k: state.iterate_sum[k] + params[k] for k in params}
        previous_average = state.previous_average
        if c % L == L - 1:
            u = {k: x / L for k, x in iterate_sum.items()}
            loss_fn = extra.get("loss_fn")
            if loss_fn is None:
                raise MissingExtraArgument(
                    "stochastic_lbfgs needs the extra argument 'loss_fn' (the loss on the Hessian subsample) "
                    f"every {L}th update (this is update {c + 1}); see learnopt.optim.extra")
            s_pair = {k: u[k] - previous_average[k] for k in u}
            y_pair = _hvp_at(loss_fn, u, s_pair)
            sy = trees.dot(s_pair, y_pair)
            accept = sy > 0
            sy_safe = torch.where(accept, sy, torch.ones_like(sy))
            s = _push(trees, s, s_pair, accept, num)
            y = _push(trees, y, y_pair, accept, num)
            rho = _push_scalar(M, rho, 1.0 / sy_safe, accept, num)
            num = torch.where(accept & (num < M), num + 1, num)
            yy = trees.dot(y_pair, y_pair)
            gamma = torch.where(accept, sy_safe / torch.where(accept, yy, torch.ones_like(yy)), gamma)
            previous_average = u
            iterate_sum = zeros_like(params)
        return out, StochasticLBFGSState(state.count + 1, snapshot, mu, iterate_sum, previous_average, s, y, rho, num,
                                         gamma)

    return GradientTransformation(init, update)
