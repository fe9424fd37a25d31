"""The RNN proposer of Chen et al. 2017, "Learning to Learn without Gradient Descent by Gradient
Descent" (ICML, arXiv 1611.03824): a learned optimizer for black-box functions.

At step t an LSTM reads the previous queries and their observations and emits the next
queries::

    h_t, x_t = RNN_θ(h_{t−1}, x_{t−1}, y_{t−1}),   y_t = f(x_t)

The query is a deterministic function of the state, squashed into the unit box by a sigmoid.
Meta-training differentiates the meta-loss through the queries on differentiable GP-prior
samples (``tasks.blackbox_episodes``); at test time ``f`` is a black box.

Two choices make one trained proposer usable on any box and any scale of ``f``:

* **inputs mapped into the training box**: callers map their box ``[lo, hi]`` to ``[0, 1]^D``
  (``learnopt.blackbox.session``), and the proposer only ever sees unit-box points;
* **outputs standardised**: every observation is fed as ``(y_t − mean_t) / std_t``, where
  ``mean_t`` and ``std_t`` are the mean and standard deviation of all observations up to and
  including ``t`` (the first observation is fed as 0). The same running standardisation is
  used in meta-training, so the proposer is invariant to ``f ↦ a·f + b`` (``a > 0``).

Beside ``(x, y)`` the proposer reads the standardised best value so far and the query that
found it (our addition: refining around the incumbent is then a short step for the network).
Our extensions (``docs/blackbox/training.md`` has the runs behind them):

* ``explore=True``: each query is ``x = g·u + (1 − g)·m``, ``u ~ U[0, 1]^D`` drawn fresh from a
  generator (``rollout(..., generator=)``, the session's ``seed``), ``m`` the network's proposal,
  ``g = σ(·)`` a gate from the state: random search is one setting of the weights.
* ``local=True``: queries relative to the incumbent, ``x = r·σ(logit(x_best) + δ) + (1 − r)·a``
  with ``a = σ(W h)`` the absolute query, ``δ`` an offset and ``r = σ(·)`` a gate that starts
  nearly closed (``r ≈ 0.02``): a step of any size is a small output of the network.
* ``trend=True``: after each observation, the minimiser in the box and the standardised value
  there of a separable quadratic fitted by ridge regression to all observations
  (``QuadraticTrend``, a ``(2D + 1)²`` solve): a summary of every observation, which GP-EI has in
  its posterior and a small recurrent state keeps poorly.
* ``refine=True``: the query ``x = r·s + (1 − r)·a`` mixes in the suggestion ``s`` of a local
  quadratic model (``learnopt.blackbox.refine``: the minimiser, in an adaptive trust region
  around the incumbent, of a full quadratic fitted to the nearest observations), for refining
  inside a basin. The gate ``r = σ(·)`` reads the state and a clock ``tanh(t/τ)`` of the
  observations so far; it starts nearly closed, or with ``refine_schedule=(t0, t1)`` as a
  schedule of the clock that opens between ``t0`` and ``t1`` observations. There is no
  suggestion before ``(D + 1)(D + 2)/2 + 1`` observations; the model has no gradient.
* ``stretch=s``: ``x = clamp((1 + s)·σ(·) − s/2, 0, 1)`` with ``s`` learned, so queries can lie
  exactly on the box's faces, where minima of GP samples often lie.

``num_queries`` (q) > 1 gives the parallel proposer: each step emits q queries, evaluated
together, and reads the q results at the next step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from learnopt.blackbox.numpy_stepper import NumpyStepper
from learnopt.blackbox.refine import CLOCK_SCALES, LocalQuadraticModel, clock
from learnopt.blackbox.standardizer import RunningStandardizer
from learnopt.blackbox.trend import QuadraticTrend

Objective = Callable[[Tensor], Tensor]  # unit-box queries [n, q, D] -> observations [n, q]


class RNNProposer(nn.Module):
    """LSTM proposer for functions on ``[0, 1]^dim``; its parameters are the meta-parameters.

    Args:
        dim: ``D``, the dimension of the unit box.
        hidden_size: units per LSTM layer (stacked ``nn.LSTMCell``s).
        num_layers: LSTM layers.
        num_queries: ``q``, queries per step (1: sequential).
        explore, local, trend, refine: the extensions of the module docstring.
        refine_schedule: ``(t0, t1)``, the refine gate starts as a schedule opening between
            ``t0`` and ``t1`` observations (needs ``refine``).
        stretch: initial stretch ``s`` of the head's sigmoid (0: none, the paper's squash).
    Raises:
        ValueError: a size below 1, or a ``refine_schedule`` without ``refine`` or not ``t0 < t1``.
    References:
        Chen et al. 2017, "Learning to Learn without Gradient Descent by Gradient Descent",
        arXiv 1611.03824.
    """

    kind = "blackbox_proposer"

    def __init__(self, dim: int = 2, hidden_size: int = 64, num_layers: int = 2, num_queries: int = 1,
                 explore: bool = False, local: bool = False, trend: bool = False, refine: bool = False,
                 refine_schedule: tuple[int, int] | None = None, stretch: float = 0.0) -> None:
        super().__init__()
        if dim < 1 or hidden_size < 1 or num_layers < 1 or num_queries < 1:
            raise ValueError(f"RNNProposer: dim, hidden_size, num_layers and num_queries must be >= 1, got "
                             f"{dim}, {hidden_size}, {num_layers}, {num_queries}")
        self.dim, self.hidden_size, self.num_layers, self.num_queries = dim, hidden_size, num_layers, num_queries
        self.incumbent_at = num_queries * (dim + 2)  # where best x starts in the input (see observation_input)
        self.trend = bool(trend)
        self.trend_at = self.incumbent_at + dim  # where the trend features start (trend=True)
        # per query x, y, best y; best x; the trend's minimiser and value (trend=True); start flag
        self.input_size = self.trend_at + (dim + 1 if self.trend else 0) + 1
        sizes = [self.input_size] + [hidden_size] * num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(sizes[i], hidden_size) for i in range(num_layers))
        self.explore = bool(explore)
        self.head = nn.Linear(hidden_size, num_queries * dim)
        self.gate = nn.Linear(hidden_size, num_queries) if self.explore else None
        self.local = bool(local)
        # offsets (in logit space) from the incumbent, and the gate between them and the head
        self.local_head = nn.Linear(hidden_size, num_queries * dim) if self.local else None
        self.local_gate = nn.Linear(hidden_size, num_queries) if self.local else None
        self.refine = bool(refine)  # the gate towards the local quadratic model's suggestion
        # it reads the state and a clock of the observations so far (refine.clock)
        self.refine_gate = nn.Linear(hidden_size + len(CLOCK_SCALES), num_queries) if self.refine else None
        with torch.no_grad():
            # Start queries spread over the box rather than all at its centre.
            self.head.weight.mul_(3.0)
            if self.local:  # start as the paper's proposer (r ≈ 0.02); the network learns when to use it
                self.local_gate.bias.fill_(-4.0)
            if self.refine:  # likewise
                self.refine_gate.bias.fill_(-4.0)
                self.refine_gate.weight[:, hidden_size:] = 0.0
        # stretch > 0: the head's sigmoid is stretched past the box and clipped, so queries can lie
        # on its faces; the stretch is learned, starting at this value (0: the paper's squash)
        self.stretch = nn.Parameter(torch.tensor(float(stretch))) if stretch > 0 else None
        self.stretch_init = float(stretch)
        self.refine_schedule = None
        if refine_schedule is not None:
            self._init_refine_schedule(*refine_schedule)

    def _init_refine_schedule(self, closed: int, opened: int) -> None:
        """Start the refine gate as a schedule of the observation count alone: r = σ(−4) ≈ 0.02 at
        ``closed`` observations and σ(3) ≈ 0.95 at ``opened``, linear in the clock feature
        ``tanh(t/τ)`` with τ the smallest clock scale >= ``opened`` (the largest if none is)."""
        if not self.refine:
            raise ValueError("RNNProposer: refine_schedule needs refine=True")
        if not 0 <= closed < opened:
            raise ValueError(f"RNNProposer: refine_schedule must be (closed, opened) with 0 <= closed < opened, "
                             f"got {(closed, opened)}")
        k = next((i for i, tau in enumerate(CLOCK_SCALES) if tau >= opened), len(CLOCK_SCALES) - 1)
        lo, hi = clock(closed)[k], clock(opened)[k]
        slope = 7.0 / (hi - lo)
        with torch.no_grad():
            self.refine_gate.weight.zero_()
            self.refine_gate.weight[:, self.hidden_size + k] = slope
            self.refine_gate.bias.fill_(-4.0 - slope * lo)
        self.refine_schedule = (int(closed), int(opened))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able), what a checkpoint stores.

        Returns:
            ``{argument: value}``.
        """
        config = {"dim": self.dim, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                  "num_queries": self.num_queries, "explore": self.explore, "local": self.local, "trend": self.trend,
                  "refine": self.refine}
        if self.refine_schedule is not None:
            config["refine_schedule"] = list(self.refine_schedule)
        if self.stretch is not None:
            config["stretch"] = self.stretch_init
        return config

    def weights_from(self, source: RNNProposer) -> dict[str, Tensor]:
        """A state dict for this proposer that starts as ``source`` does, where the two differ
        only in ``trend``, ``local``, ``refine`` or ``stretch`` (``init_from`` uses it to add an
        extension to a trained proposer). Turning ``trend`` on adds input columns with zero
        weights, so the grown proposer computes exactly what ``source`` computes until training
        moves them; a ``local`` or ``refine`` head that ``source`` lacks keeps its fresh
        initialisation (gate nearly closed), and a new stretch starts at its initial value; one
        this proposer lacks is dropped. Other differences raise ``ValueError``.

        Args:
            source: a trained proposer.
        Returns:
            A state dict for this proposer.
        Raises:
            ValueError: ``source`` is not an ``RNNProposer`` or differs in other options.
        """
        if not isinstance(source, RNNProposer):
            raise ValueError(f"RNNProposer.weights_from: the source is a {type(source).__name__}")
        mine, theirs = self.config(), source.config()
        other = {k: (theirs.get(k), mine.get(k)) for k in mine.keys() | theirs.keys()
                 if k not in ("trend", "local", "refine", "refine_schedule", "stretch")
                 and theirs.get(k) != mine.get(k)}
        if other:
            raise ValueError(f"RNNProposer.weights_from: only trend, local, refine and stretch may differ, not {other}")
        state, src = self.state_dict(), source.state_dict()
        for key in state:
            if key == "cells.0.weight_ih" and src[key].shape != state[key].shape:
                w = torch.zeros_like(state[key])
                cut = source.trend_at  # per-query inputs and the incumbent: the same columns in both
                w[:, :cut] = src[key][:, :cut]
                w[:, -1] = src[key][:, -1]  # the start flag, last in both
                state[key] = w  # (turning trend off drops its columns)
            elif key in src:
                state[key] = src[key].clone()
        return state

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""
        return self.head.weight.dtype

    # -- one step ------------------------------------------------------------------------------
    def initial_state(self, num_instances: int) -> list[tuple[Tensor, Tensor]]:
        """Zero LSTM state.

        Args:
            num_instances: ``n``.
        Returns:
            Per layer ``(h, c)``, each ``[n, hidden_size]``.
        """
        zeros = torch.zeros(num_instances, self.hidden_size, dtype=self.dtype, device=self.device)
        return [(zeros, zeros) for _ in range(self.num_layers)]

    def start_input(self, num_instances: int) -> Tensor:
        """The first step's input: zeros and the start flag.

        Args:
            num_instances: ``n``.
        Returns:
            ``[n, input_size]``.
        """
        inp = torch.zeros(num_instances, self.input_size, dtype=self.dtype, device=self.device)
        inp[:, -1] = 1.0
        return inp

    def observation_input(self, x: Tensor, y_std: Tensor, best_std: Tensor, best_x: Tensor,
                          trend: Tensor | None = None) -> Tensor:
        """The input after a step's observations.

        Args:
            x: ``[n, q, D]`` queries in the unit box.
            y_std: ``[n, q]`` their standardised observations.
            best_std: ``[n]`` the standardised best value so far.
            best_x: ``[n, D]`` the query that found it.
            trend: ``[n, D + 1]`` ``QuadraticTrend`` features (required with ``trend``).
        Returns:
            ``[n, input_size]`` in the proposer's dtype.
        Raises:
            ValueError: ``trend`` is on and no trend features are given.
        """
        n, q, _ = x.shape
        per_query = torch.cat([2 * x - 1, y_std[..., None], best_std[:, None, None].expand(n, q, 1)], dim=-1)
        parts = [per_query.reshape(n, -1), 2 * best_x.to(x.dtype) - 1]
        if self.trend:
            if trend is None:
                raise ValueError("RNNProposer.observation_input: a proposer with trend=True needs the trend features")
            parts.append(trend.to(x.dtype))
        parts.append(x.new_zeros(n, 1))
        return torch.cat(parts, dim=-1).to(self.dtype)

    def trend_features(self, fit: QuadraticTrend | None, stats: RunningStandardizer) -> Tensor | None:
        """The trend input after the latest observations (None unless ``trend``; zeros until
        there are two observations, like the standardised values).

        Args:
            fit: the run's ``QuadraticTrend`` (None without ``trend``).
            stats: the run's ``RunningStandardizer``.
        Returns:
            ``[n, D + 1]`` float64, or None.
        """
        if fit is None:
            return None
        if stats.std is None:
            return torch.zeros(stats.shift.shape[0], self.dim + 1, dtype=torch.float64, device=stats.shift.device)
        return fit.features(stats.mean, stats.std, stats.shift, stats.scale)

    def refine_weight(self, state: list[tuple[Tensor, Tensor]], count: int) -> Tensor:
        """The gate ``r`` ``[n, q]`` towards the model's suggestion, of the step that produced
        ``state`` after ``count`` observations (``refine`` only).

        Args:
            state: per layer ``(h, c)``, each ``[n, hidden_size]``.
            count: observations so far.
        Returns:
            ``[n, q]``.
        """
        h = state[-1][0]
        t = torch.as_tensor(clock(count), dtype=h.dtype, device=h.device).expand(h.shape[0], -1)
        return torch.sigmoid(self.refine_gate(torch.cat([h, t], 1)))

    def step(self, inp: Tensor, state: list[tuple[Tensor, Tensor]], noise: Tensor | None = None,
             suggestion: Tensor | None = None, count: int = 0) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The next queries in the unit box, and the new state.

        Args:
            inp: ``[n, input_size]`` from ``start_input`` or ``observation_input``.
            state: per layer ``(h, c)``, each ``[n, hidden_size]``.
            noise: ``[n, q, D]`` uniform draws (required with ``explore``).
            suggestion: ``[n, D]`` the local model's suggestion (``refine``; None: none yet).
            count: observations so far (the refine gate's clock).
        Returns:
            ``(x, state)``: queries ``[n, q, D]`` and the new state.
        Raises:
            ValueError: ``explore`` is on and ``noise`` is None.
        """
        new_state, h = [], inp
        for cell, (h_prev, c_prev) in zip(self.cells, state):
            h, c = cell(h, (h_prev, c_prev))
            new_state.append((h, c))
        x = torch.sigmoid(self.head(h)).view(inp.shape[0], self.num_queries, self.dim)
        if self.stretch is not None:
            s = self.stretch.clamp_min(0.0).to(x)
            x = ((1 + s) * x - s / 2).clamp(0.0, 1.0)
        if self.local:
            at = self.incumbent_at  # the input holds the incumbent as 2·x_best − 1
            best = ((inp[:, at:at + self.dim] + 1) / 2).clamp(1e-4, 1 - 1e-4)
            offset = self.local_head(h).view_as(x)
            near = torch.sigmoid(torch.logit(best)[:, None, :] + offset)
            r = torch.sigmoid(self.local_gate(h))[..., None]
            x = r * near + (1 - r) * x
        if self.refine and suggestion is not None:
            r = self.refine_weight(new_state, count)[..., None]
            x = r * suggestion.detach().to(x)[:, None, :] + (1 - r) * x
        if self.explore:
            if noise is None:
                raise ValueError("RNNProposer.step: an exploring proposer needs noise [n, q, D]")
            g = torch.sigmoid(self.gate(h))[..., None]
            x = g * noise.to(x) + (1 - g) * x
        return x, new_state

    def draw_noise(self, num_instances: int, generator: torch.Generator | None) -> Tensor | None:
        """The uniform draws of one step (None unless ``explore``), from ``generator``.

        Args:
            num_instances: ``n``.
            generator: the source of the draws (None: the global generator, on the CPU).
        Returns:
            ``[n, q, D]`` on the proposer's device and dtype, or None.
        """
        if not self.explore:
            return None
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((num_instances, self.num_queries, self.dim), generator=generator, device=dev)
        return u.to(device=self.device, dtype=self.dtype)

    # -- a whole run ----------------------------------------------------------------------------
    def rollout(self, objective: Objective, num_instances: int, budget: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Run the proposer for ``budget`` evaluations on ``num_instances`` functions at once.

        The run is differentiable in the proposer's parameters wherever ``objective`` is
        differentiable in ``x`` (meta-training); under ``torch.no_grad`` it is a plain run.

        Args:
            objective: ``objective(x) -> y``, unit-box queries ``[n, q, D]`` to observations ``[n, q]``.
            num_instances: ``n``, functions minimised side by side.
            budget: evaluations per function.
            generator: draws the exploration noise (``explore``; None: the global generator).
        Returns:
            ``(xs, ys)``: every query ``[n, budget, D]`` and observation ``[n, budget]``, in order.
        Raises:
            ValueError: ``budget < 1`` or ``objective`` returns the wrong shape.
        """
        if budget < 1:
            raise ValueError(f"RNNProposer.rollout: budget must be >= 1, got {budget}")
        state = self.initial_state(num_instances)
        inp = self.start_input(num_instances)
        stats: RunningStandardizer | None = None
        fit = QuadraticTrend(num_instances, self.dim, self.device) if self.trend else None
        model = LocalQuadraticModel(num_instances, self.dim, self.device) if self.refine else None
        xs, ys, done = [], [], 0
        while done < budget:
            suggestion = model.suggestion() if model is not None else None
            x, state = self.step(inp, state, self.draw_noise(num_instances, generator), suggestion, done)
            take = min(self.num_queries, budget - done)
            y = objective(x[:, :take])
            if y.shape != (num_instances, take):
                raise ValueError(f"objective returned shape {tuple(y.shape)}, expected {(num_instances, take)}")
            if stats is None:
                stats = RunningStandardizer(num_instances, y.dtype, y.device)
            y_std, best_std = stats.update(y, x[:, :take])
            if fit is not None:
                fit.update(x[:, :take], y, stats.shift, stats.scale)
            if model is not None:
                weight = None if suggestion is None else self.refine_weight(state, done)[:, :take].mean(1)
                model.update(x[:, :take], y, weight)
            xs.append(x[:, :take])
            ys.append(y)
            done += take
            if done < budget:  # (only the last step can be partial)
                inp = self.observation_input(x, y_std.to(self.dtype), best_std.to(self.dtype), stats.best_x,
                                             self.trend_features(fit, stats))
        return torch.cat(xs, 1), torch.cat(ys, 1)

    # -- user-facing ----------------------------------------------------------------------------
    def minimize(self, fun: Callable[[Any], float], bounds: Any, budget: int, **options: Any):
        """Minimise the black-box ``fun`` over the box ``bounds`` with ``budget`` evaluations;
        see ``learnopt.blackbox.minimize``.

        Args:
            fun: ``fun(x) -> float`` for ``x`` a float64 array in the box.
            bounds: the box, ``[(lo, hi), ...]`` per dimension.
            budget: evaluations.
            **options: ``minimize``'s options.
        Returns:
            ``scipy.optimize.OptimizeResult`` (see ``learnopt.blackbox.minimize``).
        """
        from learnopt.blackbox.session import minimize

        return minimize(fun, bounds, budget, proposer=self, **options)

    def ask_tell(self, bounds: Any, **options: Any):
        """An ask/tell session over the box ``bounds``; see ``learnopt.blackbox.AskTellSession``.

        Args:
            bounds: the box, ``[(lo, hi), ...]`` per dimension.
            **options: ``AskTellSession``'s options (``nonfinite``, ``seed``).
        Returns:
            An ``AskTellSession``.
        """
        from learnopt.blackbox.session import AskTellSession

        return AskTellSession(self, bounds, **options)

    def numpy_stepper(self) -> NumpyStepper:
        """A snapshot of the current weights that runs ``step`` for one instance in numpy (what
        the ask/tell session uses).

        Returns:
            A ``NumpyStepper``.
        """
        return NumpyStepper(self)
