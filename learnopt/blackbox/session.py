"""The user-facing black-box API of a trained proposer: ask/tell and ``minimize``.

::

    proposer = learnopt.load("checkpoints/rnn_proposer_d2.pt")
    res = proposer.minimize(f, bounds=[(-5, 10), (0, 15)], budget=50)
    res.x, res.fun, res.xs, res.ys                 # scipy.optimize.OptimizeResult

    p = proposer.ask_tell(bounds)                  # or: several evaluations in flight
    xa, xb = p.ask(), p.ask()
    p.tell(xb, f(xb)); p.tell(xa, f(xa))

The box is mapped onto the unit box the proposer was trained on, and observations are
standardised by the proposer itself, so any box and any scale of ``f`` works.

Several asks in flight: the proposer's state is a deterministic function of the sequence of
(query, observation) pairs, so each ``ask`` replays that sequence from the longest prefix whose
observations are all known, feeding a pending observation with the *constant liar* value (the
best observation so far; Ginsbourger et al. 2010, the standard heuristic for parallel
Bayesian optimisation). When the true value arrives the next ``ask`` replays with it. A
proposer trained with ``num_queries = q`` emits q queries per step and hands them out one
``ask`` at a time.

Proposals run through a numpy snapshot of the proposer's weights taken when the session is
created (``RNNProposer.numpy_stepper``): a sequential proposal is a few dozen operations on
vectors of a few hundred numbers, and numpy's overhead per operation is a fraction of torch's
(about 45 µs per proposal against 150 µs with torch). Training the proposer further does
not change a session that already exists.

Bad input is refused before anything changes, so a rejected call leaves the session as it was:
a box with ``lower >= upper`` or the wrong dimension, a ``tell`` for a point never asked (or
already told), and a NaN or infinite observation (``nonfinite="raise"``, the default) raise
``ValueError``; with ``nonfinite="worst"`` a non-finite observation is recorded as the worst
finite value seen so far (a failed evaluation counts as a bad one).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import Tensor, nn

from learnopt.blackbox.proposer import quadratic_basis, quadratic_fit_minimum, ridge_penalty
from learnopt.blackbox.refine import RHO_START, min_points, numpy_suggestion, numpy_update_radius


class _Standardizer:
    """``learnopt.blackbox.proposer.RunningStandardizer`` for a single instance, in Python
    floats and numpy (the session's fast path; the same formulas, tested against it). With
    ``trend_dim`` it also keeps ``QuadraticTrend``'s sums and gives its features
    (``trend_features``); with ``refine`` it keeps the history and trust radius of
    ``LocalQuadraticModel`` and gives its suggestion (``suggestion``). Arrays are replaced, never
    changed in place, so ``copy.copy`` is a snapshot."""

    def __init__(self, trend_dim: int | None = None, ridge: float = 0.1, refine: bool = False) -> None:
        self.count, self.shift, self.total, self.total_sq = 0, 0.0, 0.0, 0.0
        self.best = math.inf
        self.best_x: np.ndarray | None = None
        self.mean = self.std = math.nan
        self.trend_dim = trend_dim
        if trend_dim is not None:
            k = 1 + 2 * trend_dim
            self.gram, self.moment = np.zeros((k, k)), np.zeros(k)
            self.penalty = ridge_penalty(trend_dim, ridge)
        self.refine, self.rho = refine, RHO_START
        self.hist_x: np.ndarray | None = None
        self.hist_y: np.ndarray | None = None

    def update(self, y: np.ndarray, x: np.ndarray, weight: float | None = None) -> tuple[np.ndarray, float]:
        """Add observations ``y`` ``[q]`` made at ``x`` ``[q, D]`` (``weight``: how much they
        followed the local model's suggestion, None if there was none); return them and the
        best value so far, standardised."""
        if self.refine:
            if weight is not None and self.count > 0:
                self.rho = numpy_update_radius(self.rho, weight, float(y.min()) < self.best)
            first = self.hist_x is None
            self.hist_x = x.copy() if first else np.concatenate([self.hist_x, x])
            self.hist_y = y.astype(np.float64) if first else np.concatenate([self.hist_y, y])
        if self.count == 0:
            self.shift = float(y[0])
        self.count += len(y)
        d = y - self.shift
        self.total += float(d.sum())
        self.total_sq += float((d * d).sum())
        if self.trend_dim is not None:
            phi = quadratic_basis(x)
            self.gram = self.gram + phi.T @ phi
            self.moment = self.moment + phi.T @ d
        arg = int(np.argmin(y))
        if y[arg] < self.best or self.best_x is None:
            self.best, self.best_x = float(y[arg]), x[arg]
        if self.count < 2:
            return np.zeros_like(y), 0.0
        mean = self.total / self.count
        std = math.sqrt(max(self.total_sq / self.count - mean * mean, np.finfo(np.float64).tiny))
        mean += self.shift
        self.mean, self.std = mean, std
        return (y - mean) / std, (self.best - mean) / std

    def suggestion(self) -> np.ndarray | None:
        """``LocalQuadraticModel.suggestion`` for this instance (None without ``refine`` or
        before enough observations)."""
        if not self.refine or self.hist_x is None:
            return None
        return numpy_suggestion(self.hist_x, self.hist_y, self.rho)

    def trend_features(self) -> np.ndarray | None:
        """``QuadraticTrend.features`` for this instance (None without ``trend_dim``; zeros until
        there are two observations)."""
        dim = self.trend_dim
        if dim is None:
            return None
        if self.count < 2:
            return np.zeros(dim + 1)
        z, fit_min = quadratic_fit_minimum(self.gram, self.moment, self.penalty, dim)
        fit_min = float(fit_min) + self.shift
        return np.concatenate([z, [min(max((fit_min - self.mean) / self.std, -10.0), 10.0)]])


def as_bounds(bounds: Any, dim: int | None = None) -> Tensor:
    """``bounds`` as a ``[2, D]`` float64 tensor (lower row, upper row). Accepts ``[(lo, hi), ...]``
    per dimension (scipy's form) or ``[lower, upper]`` rows (a 2×D array with D != 2 is
    unambiguous; a 2×2 input is read as scipy's per-dimension pairs)."""
    b = torch.as_tensor(np.asarray(bounds, dtype=np.float64))
    if b.dim() != 2 or 2 not in b.shape:
        raise ValueError(f"bounds must be [(lower, upper), ...] per dimension or a [2, D] array, got shape "
                         f"{tuple(b.shape)}")
    if b.shape[1] == 2:
        b = b.T.contiguous()  # per-dimension pairs -> rows
    if dim is not None and b.shape[1] != dim:
        raise ValueError(f"bounds have {b.shape[1]} dimensions, the proposer was trained for {dim}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("bounds must be finite")
    bad = (b[0] >= b[1]).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"bounds: lower >= upper in dimension(s) {bad}: "
                         + ", ".join(f"[{b[0, i]:g}, {b[1, i]:g}]" for i in bad))
    return b


class AskTellSession:
    """Ask/tell over the box ``bounds`` with a trained ``RNNProposer`` (see the module docstring).
    ``seed`` seeds the exploration draws of an exploring proposer (``explore=True``)."""

    def __init__(self, proposer: nn.Module, bounds: Any, nonfinite: str = "raise", seed: int = 0) -> None:
        if nonfinite not in ("raise", "worst"):
            raise ValueError(f"nonfinite must be 'raise' or 'worst', got {nonfinite!r}")
        self.proposer = proposer
        self.bounds = as_bounds(bounds, proposer.dim)
        self.nonfinite = nonfinite
        self._stepper = proposer.numpy_stepper()  # the proposer's step in numpy: ~1 µs per operation, not ~5
        self._lower = self.bounds[0].numpy()
        self._width = (self.bounds[1] - self.bounds[0]).numpy()
        self._units: list[np.ndarray] = []      # unit-box query of every record, in ask order
        self._xs: list[np.ndarray] = []         # the same in the user's box
        self._ys: list[float | None] = []       # observation, None while pending
        self._groups: list[list[int]] = []      # records emitted by each proposer step
        self._unasked: list[int] = []           # emitted, not yet handed out
        self._pending: dict[tuple[float, ...], int] = {}
        self._cache: tuple[int, Any, _Standardizer | None] | None = None  # (groups fed, state, stats)
        self.proposal_seconds = 0.0
        # Exploration draws of an exploring proposer: one per emitted step, in order.
        self._generator = torch.Generator().manual_seed(seed)

    # -- asking ---------------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """The next point to evaluate (float64 array in the user's box)."""
        if not self._unasked:
            start = time.perf_counter()
            self._emit()
            self.proposal_seconds += time.perf_counter() - start
        i = self._unasked.pop(0)
        self._pending[self._key(self._xs[i])] = i
        return self._xs[i].copy()

    def _emit(self) -> None:
        p = self._stepper
        k = len(self._groups)
        if self._cache is None:
            state = p.initial_state()
            x, state = p.step(p.start_input(), state, self._noise())
            self._cache = (0, state, None)
        else:
            x = None
        fed, state, stats = self._cache
        told = [y for y in self._ys if y is not None]
        liar = min(told) if told else 0.0
        clean = True
        for j in range(fed, k):
            group = self._groups[j]
            y = np.array([self._ys[i] if self._ys[i] is not None else liar for i in group])
            stats = copy.copy(stats) if stats is not None else _Standardizer(p.dim if p.trend else None,
                                                                             refine=p.refine)
            xg = np.stack([self._units[i] for i in group])
            # how much the step that emitted this group followed the model (it had a suggestion
            # once min_points observations were in)
            weight = (float(p.refine_weight(state, stats.count)[:len(group)].mean())
                      if p.refine and stats.count >= min_points(p.dim) else None)
            y_std, best_std = stats.update(y, xg, weight)
            inp = p.observation_input(xg, y_std, best_std, stats.best_x, stats.trend_features())
            # Only the last step's queries are new; replayed steps' outputs are not used.
            last = j == k - 1
            x, state = p.step(inp, state, self._noise() if last else np.zeros((p.num_queries, p.dim)),
                              stats.suggestion() if last else None, stats.count)
            clean = clean and all(self._ys[i] is not None for i in group)
            if clean:
                self._cache = (j + 1, state, stats)
        assert x is not None
        group = []
        for unit in x:
            self._units.append(unit)
            self._xs.append(self._lower + unit * self._width)
            self._ys.append(None)
            group.append(len(self._ys) - 1)
        self._groups.append(group)
        self._unasked.extend(group)

    def _noise(self) -> np.ndarray | None:
        """The next exploration draws ``[q, D]`` (None unless the proposer explores): the same
        stream as ``RNNProposer.rollout(..., generator=)`` with this session's seed."""
        u = self.proposer.draw_noise(1, self._generator)
        return None if u is None else u[0].double().cpu().numpy()

    # -- telling --------------------------------------------------------------------------------
    @staticmethod
    def _key(x: Any) -> tuple[float, ...]:
        return tuple(float(v) for v in np.asarray(x, dtype=np.float64).ravel())

    def tell(self, x: Any, y: Any) -> None:
        """Report the observation ``y`` of a point ``x`` returned by ``ask`` (in any order)."""
        key = self._key(x)
        if key not in self._pending:
            told = any(self._key(v) == key and self._ys[i] is not None for i, v in enumerate(self._xs))
            raise ValueError(f"tell: the point {list(key)} was {'already told' if told else 'never asked'}; "
                             "tell each asked point exactly once, with the array ask returned")
        try:
            value = float(y)
        except (TypeError, ValueError):
            raise ValueError(f"tell: the observation must be a real number, got {y!r}") from None
        if not np.isfinite(value):
            if self.nonfinite == "raise":
                raise ValueError(f"tell: observation {value} at {list(key)} is not finite (use nonfinite='worst' "
                                 "to record failed evaluations as the worst value seen)")
            finite = [v for v in self._ys if v is not None]
            if not finite:
                raise ValueError(f"tell: observation {value} is not finite and no finite value is known yet "
                                 "to stand in for it")
            value = max(finite)
        i = self._pending.pop(key)
        self._ys[i] = value

    # -- results --------------------------------------------------------------------------------
    @property
    def num_told(self) -> int:
        return sum(y is not None for y in self._ys)

    def result(self) -> OptimizeResult:
        """The best point and value so far and the history of told evaluations."""
        done = [i for i, y in enumerate(self._ys) if y is not None]
        if not done:
            raise ValueError("result: no observation has been told yet")
        xs = np.stack([self._xs[i] for i in done])
        ys = np.array([self._ys[i] for i in done])
        best = int(np.argmin(ys))
        return OptimizeResult(x=xs[best], fun=float(ys[best]), xs=xs, ys=ys, nfev=len(done), nit=len(self._groups),
                              success=True, message="evaluation budget used",
                              time_per_proposal=self.proposal_seconds / max(1, len(self._xs)))


def training_horizon(proposer: Any) -> int | None:
    """The number of evaluations per episode the proposer was meta-trained with, read from the
    metadata of the checkpoint it was loaded from (None for a proposer that was not loaded)."""
    meta = getattr(proposer, "checkpoint_metadata", None) or {}
    horizon = ((meta.get("task_family") or {}).get("init_args") or {}).get("horizon")
    return int(horizon) if isinstance(horizon, int) and not isinstance(horizon, bool) else None


def minimize(fun: Callable[[np.ndarray], float], bounds: Any, budget: int, proposer: Any,
             nonfinite: str = "raise", seed: int = 0) -> OptimizeResult:
    """Minimise ``fun`` (a float64 array in the box → a number) over ``bounds`` with ``budget``
    evaluations proposed by ``proposer`` (an ``RNNProposer`` or the path of its checkpoint).

    Returns a ``scipy.optimize.OptimizeResult`` with ``x`` and ``fun`` (the best point and
    value), the history ``xs`` ``[budget, D]`` and ``ys`` ``[budget]``, ``nfev`` and
    ``time_per_proposal`` (seconds). A budget below the proposer's training horizon runs, with a
    warning: the proposer would still be exploring when the budget ends."""
    if isinstance(proposer, (str, bytes)) or hasattr(proposer, "__fspath__"):
        from learnopt.checkpoint import load

        proposer = load(proposer)
    if budget < 1:
        raise ValueError(f"minimize: budget must be >= 1, got {budget}")
    horizon = training_horizon(proposer)
    if horizon is not None and budget < horizon:
        warnings.warn(f"minimize: this proposer was meta-trained for {horizon} evaluations and is given {budget}; "
                      "a proposer explores for most of its training horizon and refines at its end, so a shorter "
                      "budget stops it early (checkpoints/README.md: use one trained for about this budget)",
                      stacklevel=2)
    session = AskTellSession(proposer, bounds, nonfinite=nonfinite, seed=seed)
    for _ in range(budget):
        x = session.ask()
        session.tell(x, fun(x))
    return session.result()
