"""L-BFGS as ``torch.optim.LBFGS`` computes it, and the per-instance two-loop machinery that the
stochastic L-BFGS of Moritz, Nishihara & Jordan (2016) shares (``stochastic_lbfgs.py``).

Batched parameters (``batch_dims > 0``): every instance runs its own L-BFGS — its own history,
curvature test, step sizes, line search and stopping rules — in lock step with the others. The
objective is still evaluated once for all instances per trial point (instances that have stopped
are evaluated too and their results ignored), and must then return per-instance losses of shape
``batch_shape`` (the gradient is that of their sum, i.e. each instance's own gradient).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Hyper, Params, zeros_like, rebuildable
from learnopt.optim.numerics import instance_sum
from learnopt.optim.extra import value_and_grad_fn_from


# -- per-instance tree algebra ------------------------------------------------------------------
class _Trees:
    """Reductions over all parameters of one instance (the first ``batch_dims`` dims index instances)."""

    def __init__(self, params: Params, batch_dims: int):
        ref = next(iter(params.values()))
        self.bd = batch_dims
        self.shape = ref.shape[:batch_dims]
        self.dtype = torch.promote_types(ref.dtype, torch.float32)
        self.device = ref.device

    def dot(self, a: Params, b: Params) -> Tensor:
        return sum(instance_sum(a[k] * b[k], self.bd).reshape(self.shape) for k in a)

    def abs_max(self, a: Params) -> Tensor:
        out = None
        for x in a.values():
            m = torch.amax(torch.abs(x), dim=tuple(range(self.bd, x.dim()))) if x.dim() > self.bd else torch.abs(x)
            out = m if out is None else torch.maximum(out, m)
        return out

    def abs_sum(self, a: Params) -> Tensor:
        return sum(instance_sum(torch.abs(x), self.bd).reshape(self.shape) for x in a.values())

    def expand(self, s: Tensor, like: Tensor) -> Tensor:
        """A per-instance value broadcast against ``like`` (which may carry a leading history dim)."""
        return s.reshape(s.shape + (1,) * (like.dim() - s.dim()))

    def where(self, mask: Tensor, a: Params, b: Params) -> Params:
        return {k: torch.where(self.expand(mask, a[k]), a[k], b[k]) for k in a}

    def axpy(self, alpha: Tensor, x: Params, y: Params) -> Params:
        """``y + alpha * x`` with a per-instance ``alpha``."""
        return {k: y[k] + self.expand(alpha, x[k]) * x[k] for k in x}

    def full(self, value, dtype=None) -> Tensor:
        return torch.full(self.shape, value, dtype=dtype or self.dtype, device=self.device)


def _two_loop(trees: _Trees, grad: Params, dirs: Params, stps: Params, ro: Tensor, num_old: Tensor,
              H_diag: Tensor) -> Params:
    """``-H grad`` by L-BFGS's two-loop recursion (Nocedal 1980) over the valid history slots
    ``[0, num_old)`` of each instance (oldest first), in torch.optim.LBFGS's order of operations."""
    q = {k: -g for k, g in grad.items()}
    hmax = int(num_old.max()) if num_old.numel() else 0
    al = [None] * hmax
    for i in range(hmax - 1, -1, -1):
        valid = i < num_old
        s_i = {k: v[i] for k, v in stps.items()}
        y_i = {k: v[i] for k, v in dirs.items()}
        al[i] = torch.where(valid, trees.dot(s_i, q) * ro[i], torch.zeros_like(ro[i]))
        q = trees.axpy(-al[i], y_i, q)
    r = {k: x * trees.expand(H_diag, x) for k, x in q.items()}
    for i in range(hmax):
        valid = i < num_old
        s_i = {k: v[i] for k, v in stps.items()}
        y_i = {k: v[i] for k, v in dirs.items()}
        be_i = trees.dot(y_i, r) * ro[i]
        r = trees.axpy(torch.where(valid, al[i] - be_i, torch.zeros_like(be_i)), s_i, r)
    return r


def _push(trees: _Trees, buf: Params, new: Params, accept: Tensor, num_old: Tensor) -> Params:
    """Append ``new`` to each accepting instance's history, dropping the oldest when full."""
    size = next(iter(buf.values())).shape[0]
    out = {}
    for k, b in buf.items():
        shifted = torch.cat([b[1:], new[k].unsqueeze(0)]) if size > 1 else new[k].unsqueeze(0)
        slot = torch.arange(size, device=b.device).reshape((size,) + (1,) * trees.bd) == num_old
        inserted = torch.where(trees.expand(slot, b), new[k].unsqueeze(0), b)
        full = trees.expand(num_old == size, b[0])
        take = trees.expand(accept, b[0])
        out[k] = torch.where(take, torch.where(full, shifted, inserted), b)
    return out


def _push_scalar(size: int, buf: Tensor, new: Tensor, accept: Tensor, num_old: Tensor) -> Tensor:
    shifted = torch.cat([buf[1:], new.unsqueeze(0)]) if size > 1 else new.unsqueeze(0)
    slot = torch.arange(size, device=buf.device).reshape((size,) + (1,) * new.dim()) == num_old
    inserted = torch.where(slot, new.unsqueeze(0), buf)
    return torch.where(accept, torch.where(num_old == size, shifted, inserted), buf)


# -- the objective ----------------------------------------------------------------------------
def _objective(extra: dict[str, Any], trees: _Trees, who: str) -> Callable[[Params], tuple[Tensor, Params]]:
    if trees.bd > 0 and extra.get("value_and_grad_fn") is None and extra.get("loss_fn") is not None:
        loss_fn = extra["loss_fn"]

        def value_and_grad(params: Params) -> tuple[Tensor, Params]:
            with torch.enable_grad():
                p = {k: x.detach().requires_grad_(True) for k, x in params.items()}
                loss = loss_fn(p)
                grads = torch.autograd.grad(loss.sum(), list(p.values()), allow_unused=True)
            return loss.detach(), {k: torch.zeros_like(p[k]) if g is None else g for k, g in zip(p, grads)}
    else:
        value_and_grad = value_and_grad_fn_from(extra, who)

    def evaluate(params: Params) -> tuple[Tensor, Params]:
        loss, grads = value_and_grad(params)
        loss = torch.as_tensor(loss)
        if loss.shape != trees.shape:
            if loss.numel() == 1 and trees.shape.numel() == 1:
                loss = loss.reshape(trees.shape)
            else:
                raise ValueError(
                    f"{who} with batch_dims={trees.bd} needs per-instance losses of shape {tuple(trees.shape)} "
                    f"from value_and_grad_fn / loss_fn, got shape {tuple(loss.shape)}"
                )
        return loss.to(trees.dtype), grads

    return evaluate


# -- strong Wolfe line search, transcribed from torch.optim.lbfgs ---------------------------------
def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """torch.optim.lbfgs._cubic_interpolate, elementwise over instances (minimum of the cubic
    through two points with values and slopes, clamped to ``bounds``; the midpoint if none)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = torch.minimum(x1, x2), torch.maximum(x1, x2)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    real = d2_square >= 0
    d2 = torch.sqrt(torch.where(real, d2_square, torch.zeros_like(d2_square)))
    min_pos = torch.where(
        x1 <= x2,
        x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2)),
        x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2)),
    )
    clamped = torch.minimum(torch.maximum(min_pos, xmin_bound), xmax_bound)
    return torch.where(real, clamped, (xmin_bound + xmax_bound) / 2.0)


_BRACKET, _ZOOM, _FINISHED = 0, 1, 2


def _strong_wolfe(trees: _Trees, evaluate, x: Params, t: Tensor, d: Params, f: Tensor, g: Params, gtd: Tensor,
                  max_ls: Tensor, run: Tensor, c1: float = 1e-4, c2: float = 0.9, tolerance_change: float = 1e-9):
    """torch.optim.lbfgs._strong_wolfe (ported from minFunc / torch7's lswolfe.lua) for every
    instance in ``run`` at once. Each instance follows the reference's control flow on its own: a
    phase (bracketing, zooming, finished) and its own counters; one objective evaluation per round
    serves all instances that need one. Returns ``(f_new, g_new, t, evaluations)`` per instance.
    Nothing here is differentiated (hypergradients do not flow through line searches)."""
    x = {k: v.detach() for k, v in x.items()}
    d = {k: v.detach() for k, v in d.items()}
    t, f, gtd = t.detach(), f.detach(), gtd.detach()
    g = {k: v.detach() for k, v in g.items()}
    W = trees.where

    def at(step: Tensor) -> tuple[Tensor, Params, Tensor]:
        f_e, g_e = evaluate(trees.axpy(step, d, x))
        g_e = {k: v.detach() for k, v in g_e.items()}
        return f_e.detach(), g_e, trees.dot(g_e, d)

    d_norm = trees.abs_max(d)
    f_new, g_new, gtd_new = at(t)
    evals = trees.full(1, torch.int64)
    ls_iter = trees.full(0, torch.int64)
    t_prev, f_prev, g_prev, gtd_prev = torch.zeros_like(t), f, g, gtd
    zero = torch.zeros_like(t)
    b0, b1, bf0, bf1, bgtd0, bgtd1 = zero, zero, zero, zero, zero, zero
    bg0, bg1 = g, g
    low0 = trees.full(True, torch.bool)  # the reference's low_pos == 0
    done = trees.full(False, torch.bool)
    insuf = trees.full(False, torch.bool)
    phase = torch.where(run, torch.full_like(ls_iter, _BRACKET), torch.full_like(ls_iter, _FINISHED))
    pending_zoom = trees.full(False, torch.bool)

    def armijo(f_n: Tensor, step: Tensor) -> Tensor:  # sufficient decrease fails
        return f_n > f + c1 * step * gtd

    while True:
        # zoom: take in the evaluation requested in the previous round
        if bool(pending_zoom.any()):
            bf_low = torch.where(low0, bf0, bf1)
            fail = pending_zoom & (armijo(f_new, t) | (f_new >= bf_low))
            hi1, hi0 = fail & low0, fail & ~low0  # the point replaces the high end
            b1, bf1, bgtd1 = (torch.where(hi1, new, old) for new, old in ((t, b1), (f_new, bf1), (gtd_new, bgtd1)))
            b0, bf0, bgtd0 = (torch.where(hi0, new, old) for new, old in ((t, b0), (f_new, bf0), (gtd_new, bgtd0)))
            bg1, bg0 = W(hi1, g_new, bg1), W(hi0, g_new, bg0)
            low0 = torch.where(fail, bf0 <= bf1, low0)
            ok = pending_zoom & ~fail
            wolfe = ok & (torch.abs(gtd_new) <= -c2 * gtd)
            done = done | wolfe
            b_lo, b_hi = torch.where(low0, b0, b1), torch.where(low0, b1, b0)
            swap = ok & ~wolfe & (gtd_new * (b_hi - b_lo) >= 0)  # old high becomes new low
            s1, s0 = swap & low0, swap & ~low0  # high is 1 when low is 0
            b1, bf1, bgtd1 = (torch.where(s1, lo, hi) for lo, hi in ((b0, b1), (bf0, bf1), (bgtd0, bgtd1)))
            bg1 = W(s1, bg0, bg1)
            b0, bf0, bgtd0 = (torch.where(s0, lo, hi) for lo, hi in ((b1, b0), (bf1, bf0), (bgtd1, bgtd0)))
            bg0 = W(s0, bg1, bg0)
            l0, l1 = ok & low0, ok & ~low0  # the point becomes the new low end
            b0, bf0, bgtd0 = (torch.where(l0, new, old) for new, old in ((t, b0), (f_new, bf0), (gtd_new, bgtd0)))
            b1, bf1, bgtd1 = (torch.where(l1, new, old) for new, old in ((t, b1), (f_new, bf1), (gtd_new, bgtd1)))
            bg0, bg1 = W(l0, g_new, bg0), W(l1, g_new, bg1)

        # bracketing phase
        bracketing = phase == _BRACKET
        cont = trees.full(False, torch.bool)
        if bool(bracketing.any()):
            in_loop = bracketing & (ls_iter < max_ls)
            exhausted = bracketing & ~in_loop
            c_armijo = in_loop & (armijo(f_new, t) | ((ls_iter > 1) & (f_new >= f_prev)))
            c_wolfe = in_loop & ~c_armijo & (torch.abs(gtd_new) <= -c2 * gtd)
            c_pos = in_loop & ~c_armijo & ~c_wolfe & (gtd_new >= 0)
            cont = in_loop & ~(c_armijo | c_wolfe | c_pos)
            two = c_armijo | c_pos
            b0 = torch.where(two, t_prev, torch.where(c_wolfe, t, torch.where(exhausted, zero, b0)))
            b1 = torch.where(two | exhausted, t, b1)
            bf0 = torch.where(two, f_prev, torch.where(c_wolfe, f_new, torch.where(exhausted, f, bf0)))
            bf1 = torch.where(two | exhausted, f_new, bf1)
            bg0 = W(two, g_prev, W(c_wolfe, g_new, W(exhausted, g, bg0)))
            bg1 = W(two | exhausted, g_new, bg1)
            bgtd0 = torch.where(two, gtd_prev, bgtd0)
            bgtd1 = torch.where(two, gtd_new, bgtd1)
            done = done | c_wolfe
            low0 = torch.where(two | exhausted, bf0 <= bf1, torch.where(c_wolfe, True, low0))
            phase = torch.where(two | c_wolfe | exhausted, torch.full_like(phase, _ZOOM), phase)
            if bool(cont.any()):
                t_next = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                            bounds=(t + 0.01 * (t - t_prev), t * 10))
                t_prev, f_prev, gtd_prev = (torch.where(cont, new, old) for new, old in
                                            ((t, t_prev), (f_new, f_prev), (gtd_new, gtd_prev)))
                g_prev = W(cont, g_new, g_prev)
                t = torch.where(cont, t_next, t)

        # zoom phase: choose the next trial point inside the bracket
        zooming = phase == _ZOOM
        go = zooming & ~done & (ls_iter < max_ls) & ~(torch.abs(b1 - b0) * d_norm < tolerance_change)
        phase = torch.where(zooming & ~go, torch.full_like(phase, _FINISHED), phase)
        if bool(go.any()):
            t_c = _cubic_interpolate(b0, bf0, bgtd0, b1, bf1, bgtd1)
            b_max, b_min = torch.maximum(b0, b1), torch.minimum(b0, b1)
            eps = 0.1 * (b_max - b_min)
            near = torch.minimum(b_max - t_c, t_c - b_min) < eps
            at_edge = insuf | (t_c >= b_max) | (t_c <= b_min)
            moved = torch.where(torch.abs(t_c - b_max) < torch.abs(t_c - b_min), b_max - eps, b_min + eps)
            t = torch.where(go, torch.where(near & at_edge, moved, t_c), t)
            insuf = torch.where(go, near & ~at_edge, insuf)

        need = cont | go
        if not bool(need.any()):
            break
        f_e, g_e, gtd_e = at(t)
        f_new, gtd_new = torch.where(need, f_e, f_new), torch.where(need, gtd_e, gtd_new)
        g_new = W(need, g_e, g_new)
        evals = evals + need.long()
        ls_iter = ls_iter + need.long()
        pending_zoom = go

    t_out = torch.where(low0, b0, b1)
    f_out = torch.where(low0, bf0, bf1)
    g_out = W(low0, bg0, bg1)
    return f_out, g_out, t_out, evals


# -- L-BFGS -----------------------------------------------------------------------------------
class LBFGSState(NamedTuple):
    """torch.optim.LBFGS's state, per instance: ``old_dirs`` holds the ``y`` (gradient differences),
    ``old_stps`` the ``s`` (steps), oldest first, in fixed ``history_size`` slots of which the first
    ``num_old`` are in use."""

    n_iter: Tensor
    func_evals: Tensor
    d: Params
    t: Tensor
    old_dirs: Params
    old_stps: Params
    ro: Tensor
    num_old: Tensor
    H_diag: Tensor
    prev_flat_grad: Params
    prev_loss: Tensor


@rebuildable
def lbfgs(lr: Hyper = 1.0, max_iter: int = 20, max_eval: int | None = None, tolerance_grad: float = 1e-7,
          tolerance_change: float = 1e-9, history_size: int = 10, line_search_fn: str | None = None,
          batch_dims: int = 0) -> GradientTransformation:
    """L-BFGS (Liu & Nocedal 1989), computing ``torch.optim.LBFGS``'s trajectory: one ``update`` is
    one ``LBFGS.step`` (up to ``max_iter`` inner iterations)::

        repeat up to max_iter times (g: gradient at the current point):
            first iteration ever:  d = -g;  H_diag = 1
            else:  y = g - g_prev;  s = t d;  if y.s > 1e-10: push (y, s) (keep history_size), H_diag = y.s / y.y
                   d = -H g  (two-loop recursion, initial matrix H_diag I)
            t = min(1, 1 / ||g||_1) lr on the very first iteration, else lr
            stop if g.d > -tolerance_change
            line_search_fn == "strong_wolfe": t from the strong-Wolfe search (c1 = 1e-4, c2 = 0.9)
            x <- x + t d;  re-evaluate (unless it is the last iteration, without a line search)
            stop on max_iter, max_eval evaluations, max|g| <= tolerance_grad,
                 max|t d| <= tolerance_change or |f - f_prev| < tolerance_change
        (no iteration at all when max|g| <= tolerance_grad at the start)

    The gradient at the current parameters is ``grads``; everything else is evaluated through the
    extra ``value_and_grad_fn`` (or ``loss_fn``), needed unless ``max_iter == 1`` and there is no
    line search. ``as_torch_optimizer`` builds it from ``step(closure)``, which makes this a
    drop-in ``torch.optim.LBFGS``. ``history_size`` defaults to 10, not torch's 100, because the
    history is stored in fixed slots (``history_size`` copies of the parameters, twice), where
    torch's lists grow as needed; pass 100 for torch's memory. The strong-Wolfe search is a
    transcription of torch's ``_strong_wolfe`` and ``_cubic_interpolate``. Hypergradients flow
    through the two-loop recursion and the step (``line_search_fn=None``), not through the line
    search's choice of ``t``.

    Args:
        lr: learning rate (the step ``t`` without a line search; the search's first trial with one).
        max_iter: the most inner iterations per ``update``.
        max_eval: the most function evaluations per ``update`` (None: ``max_iter * 5 // 4``).
        tolerance_grad: stop when ``max|g|`` is at most this.
        tolerance_change: stop on a step, directional derivative or loss change below this.
        history_size: number of ``(y, s)`` pairs kept.
        line_search_fn: None or ``"strong_wolfe"``.
        batch_dims: leading task-instance dimensions (module docstring).
    Returns:
        A ``GradientTransformation``.
    Raises:
        ValueError: an unknown ``line_search_fn``, or a non-positive ``history_size`` or ``max_iter``.
    """
    if line_search_fn not in (None, "strong_wolfe"):
        raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got {line_search_fn!r}")
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    if history_size < 1 or max_iter < 1:
        raise ValueError("history_size and max_iter must be positive")
    H = history_size

    def init(params):
        trees = _Trees(params, batch_dims)
        return LBFGSState(
            n_iter=trees.full(0, torch.int64), func_evals=trees.full(0, torch.int64),
            d=zeros_like(params), t=trees.full(0.0),
            old_dirs={k: p.new_zeros((H,) + p.shape) for k, p in params.items()},
            old_stps={k: p.new_zeros((H,) + p.shape) for k, p in params.items()},
            ro=torch.zeros((H,) + tuple(trees.shape), dtype=trees.dtype, device=trees.device),
            num_old=trees.full(0, torch.int64), H_diag=trees.full(1.0),
            prev_flat_grad=zeros_like(params), prev_loss=trees.full(0.0),
        )

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("lbfgs needs params")
        trees = _Trees(params, batch_dims)
        evaluate = _objective(extra, trees, "lbfgs") if (line_search_fn is not None or max_iter > 1) else None
        W, dot = trees.where, trees.dot
        flat_grad = dict(updates)
        loss = evaluate(params)[0] if evaluate is not None else trees.full(0.0)
        func_evals = state.func_evals + 1
        current_evals = trees.full(1, torch.int64)
        active = ~(trees.abs_max(flat_grad) <= tolerance_grad)

        n_iter, d, t = state.n_iter, state.d, state.t
        dirs, stps, ro, num_old, H_diag = state.old_dirs, state.old_stps, state.ro, state.num_old, state.H_diag
        prev_grad, prev_loss = state.prev_flat_grad, state.prev_loss
        x = dict(params)
        one = torch.ones_like(H_diag)
        for it in range(1, max_iter + 1):
            if not bool(active.any()):
                break
            n_iter = n_iter + active.long()
            first = n_iter == 1

            # direction: update the memory, then the two-loop recursion
            y = {k: flat_grad[k] - prev_grad[k] for k in flat_grad}
            s = {k: d[k] * trees.expand(t, d[k]) for k in d}
            ys = dot(y, s)
            accept = active & ~first & (ys > 1e-10)
            ys_safe = torch.where(accept, ys, one)  # no 1/0 even in unused branches (NaN-free gradients)
            dirs, stps = _push(trees, dirs, y, accept, num_old), _push(trees, stps, s, accept, num_old)
            ro = _push_scalar(H, ro, 1.0 / ys_safe, accept, num_old)
            num_old = torch.where(accept & (num_old < H), num_old + 1, num_old)
            num_old = torch.where(active & first, torch.zeros_like(num_old), num_old)
            H_diag = torch.where(accept, ys_safe / torch.where(accept, dot(y, y), one), H_diag)
            H_diag = torch.where(active & first, one, H_diag)
            direction = _two_loop(trees, flat_grad, dirs, stps, ro, num_old, H_diag)
            d = W(active, W(first, {k: -g for k, g in flat_grad.items()}, direction), d)
            prev_grad = W(active, flat_grad, prev_grad)
            prev_loss = torch.where(active, loss, prev_loss)

            # step length
            g_l1 = trees.abs_sum(flat_grad)
            first_t = torch.clamp(1.0 / torch.where(g_l1 > 0, g_l1, one), max=1.0) * lr
            t = torch.where(active, torch.where(first, first_t, lr * one), t)
            gtd = dot(flat_grad, d)
            active = active & ~(gtd > -tolerance_change)
            opt_cond = trees.full(False, torch.bool)
            ls_evals = torch.zeros_like(current_evals)
            if line_search_fn is not None:
                if bool(active.any()):
                    f_new, g_new, t_ls, ls_evals = _strong_wolfe(
                        trees, evaluate, x, t, d, loss, flat_grad, gtd, max_eval - current_evals, active,
                        tolerance_change=tolerance_change)
                    ls_evals = torch.where(active, ls_evals, torch.zeros_like(ls_evals))
                    loss = torch.where(active, f_new, loss)
                    flat_grad = W(active, g_new, flat_grad)
                    t = torch.where(active, t_ls, t)
                    x = W(active, trees.axpy(t, d, x), x)
                    opt_cond = trees.abs_max(flat_grad) <= tolerance_grad
            else:
                x = W(active, trees.axpy(t, d, x), x)
                if it != max_iter:
                    new_loss, new_grad = evaluate(x)
                    loss = torch.where(active, new_loss, loss)
                    flat_grad = W(active, new_grad, flat_grad)
                    opt_cond = trees.abs_max(flat_grad) <= tolerance_grad
                    ls_evals = active.long()
            current_evals = current_evals + ls_evals
            func_evals = func_evals + ls_evals

            stop = (
                (it == max_iter) | (current_evals >= max_eval) | opt_cond
                | (trees.abs_max({k: v * trees.expand(t, v) for k, v in d.items()}) <= tolerance_change)
                | (torch.abs(loss - prev_loss) < tolerance_change)
            )
            active = active & ~stop

        out = {k: x[k] - params[k] for k in params}
        return out, LBFGSState(n_iter, func_evals, d, t, dirs, stps, ro, num_old, H_diag, prev_grad, prev_loss)

    return GradientTransformation(init, update)
