"""The user-facing black-box API of a trained proposer: ask/tell and ``minimize``.

::

    proposer = learnopt.load("checkpoints/rnn_proposer_d2.pt")
    res = proposer.minimize(f, bounds=[(-5, 10), (0, 15)], budget=50)
    res.x, res.fun, res.xs, res.ys                 # scipy.optimize.OptimizeResult

    p = proposer.ask_tell(bounds)                  # or: several evaluations in flight
    xa, xb = p.ask(), p.ask()
    p.tell(xb, f(xb)); p.tell(xa, f(xa))

The box is mapped onto the unit box the proposer was trained on, and observations are
standardised by the proposer itself, so any box and any scale of ``f`` works: the running sums
behind the standardisation are kept in units of a power of two near the largest magnitude seen
(an exact rescaling, so ``1e300·f`` is asked the same points as ``f``), and a box wider than the
largest float (``±1e308``) is mapped as ``lower·(1 − v) + upper·v``. A query that is not finite
is never handed out (``RuntimeError``).

Restarts: an integer ``seed`` maps the queries through a random symmetry of the box
(``AskTellSession``). ``minimize(..., noisy=True)`` reports the point with the lowest GP mean, not
the luckiest draw. When the objective raises, the exception carries the evaluations before it.

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
(``scripts/benchmarks/numpy_stepper.py``; ``docs/blackbox``). Later training does not change a session.

Bad input (a box, a ``tell``, a non-finite observation: see ``as_bounds`` and ``tell``) is refused
before anything changes, so a rejected call leaves the session as it was.
"""

from __future__ import annotations

import copy
import numbers
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from learnopt.blackbox.box import as_bounds, box_symmetry  # noqa: F401 (as_bounds: public here too)
from learnopt.blackbox.gp import GPHyperparameters, GPPosterior, fit_hyperparameters
from learnopt.blackbox.refine import min_points
from learnopt.blackbox.standardizer import _Standardizer


def check_proposer(proposer: Any, source: Any = None, caller: str = "minimize") -> None:
    """Raise ``TypeError`` unless ``proposer`` is a black-box proposer (an ``RNNProposer``), naming
    what it is instead (``source``: the checkpoint it was loaded from, if any).

    Args:
        proposer: the object to check.
        source: the checkpoint it was loaded from, if any.
        caller: the caller's name, for the message.
    Raises:
        TypeError: ``proposer`` is not a black-box proposer.
    """
    if callable(getattr(proposer, "numpy_stepper", None)) and isinstance(getattr(proposer, "dim", None), int):
        return
    what = f"{source} holds" if source is not None else "the proposer given is"
    kind = getattr(proposer, "kind", None)
    kind_text = f" (checkpoint kind {kind!r})" if isinstance(kind, str) else ""
    raise TypeError(
        f"{caller}: {what} a {type(proposer).__name__}{kind_text}, not a black-box proposer (an RNNProposer, "
        "kind 'blackbox_proposer'). A learned optimizer trains a model from its gradients: "
        "learnopt.load_optimizer(path, model.parameters()); to minimise a black-box function pass a proposer "
        "checkpoint such as checkpoints/rnn_proposer_d2.pt (checkpoints/README.md lists them)")


class AskTellSession:
    """Ask/tell over the box ``bounds`` with a trained ``RNNProposer`` (see the module docstring).

    Args:
        proposer: a trained ``RNNProposer``.
        bounds: the box (``as_bounds``).
        nonfinite: ``"raise"`` on a non-finite observation, or ``"worst"``: record the worst value seen.
        seed: None runs the proposer in its own frame (a deterministic proposer asks the same points
            every run). An integer draws a random symmetry of the box (``box_symmetry``: coordinates
            permuted and reflected) through which the queries are mapped, and seeds the exploration
            draws; the GP prior of meta-training is invariant under it, so each seed is an equally
            good, independent restart.
    Raises:
        ValueError: an unknown ``nonfinite`` or bad ``bounds``.
        TypeError: ``proposer`` is not a black-box proposer.
    """

    def __init__(self, proposer: nn.Module, bounds: Any, nonfinite: str = "raise", seed: int | None = None) -> None:
        if nonfinite not in ("raise", "worst"):
            raise ValueError(f"nonfinite must be 'raise' or 'worst', got {nonfinite!r}")
        check_proposer(proposer, caller="AskTellSession")
        self.proposer = proposer
        self.bounds = as_bounds(bounds, proposer.dim)
        self.nonfinite = nonfinite
        self.seed = seed
        self.symmetry = box_symmetry(proposer.dim, seed)
        self._stepper = proposer.numpy_stepper()  # the proposer's step in numpy (module docstring)
        self._lower, self._upper = self.bounds[0].numpy(), self.bounds[1].numpy()
        with np.errstate(over="ignore"):
            width = self._upper - self._lower
        # a box wider than the largest float (e.g. ±1e308) is mapped as lower·(1−v) + upper·v
        self._wide = ~np.isfinite(width)
        self._width = np.where(self._wide, 0.0, width)
        self._units: list[np.ndarray] = []      # query of every record in the proposer's unit box, in ask order
        self._vs: list[np.ndarray] = []         # the same in the user's unit box (after the symmetry)
        self._xs: list[np.ndarray] = []         # the same in the user's box
        self._ys: list[float | None] = []       # observation, None while pending
        self._groups: list[list[int]] = []      # records emitted by each proposer step
        self._unasked: list[int] = []           # emitted, not yet handed out
        self._pending: dict[tuple[float, ...], int] = {}
        self._cache: tuple[int, Any, _Standardizer | None] | None = None  # (groups fed, state, stats)
        self.proposal_seconds = 0.0
        # Exploration draws of an exploring proposer: one per emitted step, in order.
        self._generator = torch.Generator().manual_seed(0 if seed is None else int(seed))

    def to_box(self, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A query ``unit`` ``[..., D]`` of the proposer's unit box → the user's unit box (through
        the session's symmetry) and the user's box (clipped to it, so rounding never leaves it).

        Args:
            unit: ``[..., D]`` points of the proposer's unit box.
        Returns:
            ``(v, x)``: the points in the user's unit box and in the user's box.
        """
        perm, flip = self.symmetry
        v = unit[..., perm]
        v = np.where(flip, 1.0 - v, v)
        x = self._lower + v * self._width
        if self._wide.any():
            x = np.where(self._wide, self._lower * (1.0 - v) + self._upper * v, x)
        return v, np.clip(x, self._lower, self._upper)

    # -- asking ---------------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """The next point to evaluate (float64 array in the user's box).

        Returns:
            ``[D]`` float64.
        Raises:
            RuntimeError: the proposer produced a non-finite query (nothing is handed out).
        """
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
        if not np.isfinite(x).all():  # never hand out a point the objective cannot be called at
            raise RuntimeError(f"the proposer produced a non-finite query {x.tolist()} for evaluation "
                               f"{len(self._xs) + 1}; no point was handed out (its weights or inputs are not finite)")
        group = []
        for unit in x:
            v, box = self.to_box(unit)
            self._units.append(unit)
            self._vs.append(v)
            self._xs.append(box)
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
        """Report the observation ``y`` of a point ``x`` returned by ``ask`` (in any order).

        Args:
            x: a point ``ask`` returned.
            y: its observation, a real number.
        Raises:
            ValueError: ``x`` was never asked or already told, ``y`` is not a number, or ``y`` is not
                finite (with ``nonfinite="raise"``, or before any finite value is known).
        """
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
        """The number of observations told so far."""
        return sum(y is not None for y in self._ys)

    def result(self, noisy: bool = False) -> OptimizeResult:
        """The best point and value so far and the history of told evaluations.

        Args:
            noisy: the observations are noisy, so the lowest one is partly luck: ``x`` is then
                the evaluated point where a GP fitted to all observations (noise included,
                hyperparameters by marginal likelihood) has its lowest mean, and ``fun`` that
                mean; the lowest observation stays in ``x_observed`` and ``fun_observed``.

        Returns:
            ``scipy.optimize.OptimizeResult``: ``x``, ``fun``, ``xs`` ``[n, D]``, ``ys`` ``[n]``,
            ``nfev``, ``nit`` (proposer steps), ``success``, ``message``, ``time_per_proposal``.
        Raises:
            ValueError: nothing has been told yet.
        """
        done = [i for i, y in enumerate(self._ys) if y is not None]
        if not done:
            raise ValueError("result: no observation has been told yet")
        xs = np.stack([self._xs[i] for i in done])
        ys = np.array([self._ys[i] for i in done])
        best = int(np.argmin(ys))
        res = OptimizeResult(x=xs[best], fun=float(ys[best]), xs=xs, ys=ys, nfev=len(done), nit=len(self._groups),
                             success=True, message="evaluation budget used",
                             time_per_proposal=self.proposal_seconds / max(1, len(self._xs)))
        if noisy:
            res.x_observed, res.fun_observed = res.x, res.fun
            if len(done) >= 2:
                i, res.fun = model_best(np.stack([self._vs[i] for i in done]), ys)
                res.x = xs[i]
        return res


def model_best(units: np.ndarray, ys: np.ndarray, steps: int = 100) -> tuple[int, float]:
    """The index of the point (of ``units`` ``[n, D]`` in the unit box, observed ``ys`` ``[n]``)
    where a GP fitted to the observations has its lowest posterior mean, and that mean (in the
    units of ``ys``). The GP has an observation-noise variance, fitted with the lengthscales and
    signal variance by marginal likelihood (``learnopt.blackbox.gp``): the recommendation of
    Bayesian optimisation under noise, which averages neighbours instead of trusting one draw.

    Args:
        units: ``[n, D]`` points in the unit box.
        ys: ``[n]`` their observations.
        steps: optimisation steps of the GP hyperparameter fit.
    Returns:
        ``(index, mean)``.
    """
    # standardised after dividing by a power of two near the largest magnitude (exact, no overflow)
    _, exponent = np.frexp(np.abs(ys).max())
    y = np.ldexp(ys, -int(exponent))
    centre, spread = float(y.mean()), float(y.std())
    spread = spread if spread > 0 else 1.0
    X = torch.as_tensor(units, dtype=torch.float64)[None]
    Y = torch.as_tensor((y - centre) / spread, dtype=torch.float64)[None]
    dim = X.shape[-1]
    init = GPHyperparameters(torch.full((1, dim), 0.3, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                             torch.full((1,), 0.1, dtype=torch.float64))
    hp = fit_hyperparameters(X, Y, init, steps=steps)
    with torch.no_grad():
        mean, _ = GPPosterior(X, Y, hp).predict(X)
    i = int(mean[0].argmin())
    return i, float(np.ldexp(float(mean[0, i]) * spread + centre, int(exponent)))


def training_horizon(proposer: Any) -> int | None:
    """The number of evaluations per episode the proposer was meta-trained with, read from the
    metadata of the checkpoint it was loaded from (None for a proposer that was not loaded).

    Args:
        proposer: a proposer, loaded or not.
    Returns:
        The horizon, or None.
    """
    meta = getattr(proposer, "checkpoint_metadata", None) or {}
    horizon = ((meta.get("task_family") or {}).get("init_args") or {}).get("horizon")
    return int(horizon) if isinstance(horizon, int) and not isinstance(horizon, bool) else None


def _check_budget(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"minimize: budget must be an integer (the number of evaluations), got {budget!r} "
                        f"of type {type(budget).__name__}")
    if budget < 1:
        raise ValueError(f"minimize: budget must be >= 1, got {budget}")
    return int(budget)


def _keep_history(error: BaseException, session: AskTellSession, evaluation: int, budget: int) -> None:
    """Attach what was evaluated before ``error`` to it: ``error.result`` (an ``OptimizeResult``
    of the evaluations told, None if there were none) and ``error.session`` (to go on), and say so
    in a note."""
    told = session.num_told
    result = None
    if told:
        result = session.result()
        result.success = False
        result.message = f"stopped at evaluation {evaluation} of {budget} by {type(error).__name__}: {error}"
    try:
        error.result, error.session = result, session  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__: the note still says what happened
        pass
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(f"minimize: stopped at evaluation {evaluation} of {budget}; the {told} evaluations before it "
                       "are in this exception's .result (a scipy.optimize.OptimizeResult) and .session (the "
                       "AskTellSession; the point that failed is still pending there)")


def minimize(fun: Callable[[np.ndarray], float], bounds: Any, budget: int, proposer: Any,
             nonfinite: str = "raise", seed: int | None = None, noisy: bool = False) -> OptimizeResult:
    """Minimise ``fun`` (a float64 array in the box → a number) over ``bounds`` with ``budget``
    evaluations proposed by ``proposer``.

    Args:
        fun: the black-box objective.
        bounds: the box (``as_bounds``): ``[(lower, upper), ...]`` per dimension or
            ``scipy.optimize.Bounds``.
        budget: the number of evaluations (an integer >= 1). A budget below the proposer's
            training horizon runs, with a warning: the proposer would still be exploring when
            the budget ends.
        proposer: an ``RNNProposer`` or the path of its checkpoint.
        nonfinite: ``"raise"`` on a NaN or infinite observation, or ``"worst"``: record it as
            the worst value seen (``AskTellSession``).
        seed: None: the proposer's own frame; an integer: a random symmetry of the box and the
            exploration draws (``AskTellSession``), so different seeds are independent restarts.
        noisy: report the best point by a GP fitted to the observations rather than the lowest
            observation (``AskTellSession.result``).

    Returns:
        ``scipy.optimize.OptimizeResult`` with ``x`` and ``fun`` (the best point and value), the
        history ``xs`` ``[budget, D]`` and ``ys`` ``[budget]``, ``nfev`` and
        ``time_per_proposal`` (seconds).

    Raises:
        TypeError: ``budget`` is not an integer, or ``proposer`` is not a black-box proposer (a
            learned optimizer's checkpoint, say).
        Exception: whatever ``fun`` raises, or the ``ValueError`` of a refused observation,
            carrying the evaluations before it in ``.result`` and ``.session``.
    """
    budget = _check_budget(budget)
    source = None
    if isinstance(proposer, (str, bytes)) or hasattr(proposer, "__fspath__"):
        from learnopt.checkpoint import load

        source = proposer
        proposer = load(proposer)
    check_proposer(proposer, source)
    horizon = training_horizon(proposer)
    if horizon is not None and budget < horizon:
        warnings.warn(f"minimize: this proposer was meta-trained for {horizon} evaluations and is given {budget}; "
                      "a proposer explores for most of its training horizon and refines at its end, so a shorter "
                      "budget stops it early (checkpoints/README.md: use one trained for about this budget)",
                      stacklevel=2)
    session = AskTellSession(proposer, bounds, nonfinite=nonfinite, seed=seed)
    for evaluation in range(1, budget + 1):
        try:
            x = session.ask()
            session.tell(x, fun(x))
        except BaseException as e:  # noqa: BLE001 (re-raised; KeyboardInterrupt keeps the history too)
            _keep_history(e, session, evaluation, budget)
            raise
    return session.result(noisy)
