"""Baselines for the black-box proposers, all on the unit box ``[0, 1]^D``.

``objective(x)`` takes ``[n, q, D]`` and returns ``[n, q]`` for the batched methods (the same
objective the RNN proposer's ``rollout`` takes); each returns the queries ``[n, T, D]``, the
observations ``[n, T]`` and the seconds spent proposing each query ``[T]`` (for all ``n``
problems at once).

* ``random_search``: uniform queries.
* ``gp_ei``: GP expected improvement (``learnopt.blackbox.gp``), either with fixed
  hyperparameters (e.g. the true ones of a GP-prior sample) on raw observations, or with
  standardised observations and hyperparameters fitted by marginal likelihood at every step.
* ``optuna_minimize``: one problem at a time with one of optuna's samplers (TPE, GP, CMA-ES),
  the widely used peers; optuna is imported only here.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from learnopt.blackbox.gp import GPHyperparameters, GPPosterior, fit_hyperparameters, propose_ei

Objective = Callable[[Tensor], Tensor]


def random_search(objective: Objective, num_problems: int, dim: int, budget: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform random queries.

    Args:
        objective: ``[n, q, D] -> [n, q]`` on the unit box.
        num_problems: ``n``.
        dim: ``D``.
        budget: ``T``, queries per problem.
        generator: the source of the random queries.
    Returns:
        ``(xs [n, T, D], ys [n, T], seconds [T])``.
    """
    xs, ys, times = [], [], []
    for _ in range(budget):
        start = time.perf_counter()
        x = torch.rand((num_problems, 1, dim), generator=generator, dtype=torch.float64)
        times.append(time.perf_counter() - start)
        xs.append(x)
        ys.append(objective(x).detach().to(torch.float64))
    return torch.cat(xs, 1), torch.cat(ys, 1), torch.tensor(times)


@torch.no_grad()
def gp_ei(objective: Objective, num_problems: int, dim: int, budget: int, generator: torch.Generator,
          hyperparameters: GPHyperparameters | None = None, num_initial: int | None = None,
          fit_steps: int = 50, **propose_options) -> tuple[Tensor, Tensor, Tensor]:
    """GP-EI. ``hyperparameters`` given: fixed, on raw observations (the prior mean is 0). None:
    fitted at every step on standardised observations, from ``num_initial`` (default ``D + 1``)
    uniform random queries; the fixed variant starts from one.

    Args:
        objective: ``[n, q, D] -> [n, q]`` on the unit box.
        num_problems: ``n``.
        dim: ``D``.
        budget: ``T``, queries per problem.
        generator: the source of the random queries.
        hyperparameters: fixed GP hyperparameters (None: fitted at every step).
        num_initial: random queries first (None: 1 when fixed, else ``D + 1``).
        fit_steps: Adam steps of each hyperparameter fit.
        **propose_options: ``propose_ei``'s options.
    Returns:
        ``(xs [n, T, D], ys [n, T], seconds [T])``.
    """
    fixed = hyperparameters is not None
    if num_initial is None:
        num_initial = 1 if fixed else dim + 1
    hp = hyperparameters if fixed else GPHyperparameters(
        torch.full((num_problems, dim), 0.3, dtype=torch.float64),
        torch.ones(num_problems, dtype=torch.float64), torch.full((num_problems,), 1e-4, dtype=torch.float64))
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    times = []
    for t in range(budget):
        start = time.perf_counter()
        if t < num_initial:
            x = torch.rand((num_problems, 1, dim), generator=generator, dtype=torch.float64)
        else:
            X, Y = torch.cat(xs, 1), torch.cat(ys, 1)
            if not fixed:
                mean, std = Y.mean(1, keepdim=True), Y.std(1, keepdim=True).clamp_min(1e-9)
                Y = (Y - mean) / std
                hp = fit_hyperparameters(X, Y, hp, steps=fit_steps)
            post = GPPosterior(X, Y, hp)
            x = propose_ei(post, Y.min(1).values, generator, **propose_options)
        times.append(time.perf_counter() - start)
        xs.append(x)
        ys.append(objective(x).detach().to(torch.float64))
    return torch.cat(xs, 1), torch.cat(ys, 1), torch.tensor(times)


OPTUNA_SAMPLERS = ("tpe", "gp", "cmaes")


def optuna_minimize(fun: Callable[[np.ndarray], float], dim: int, budget: int, sampler: str,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise ``fun`` on ``[0, 1]^dim`` with optuna's ``sampler`` (``"tpe"``, ``"gp"`` or
    ``"cmaes"``, default settings, seeded); the seconds are the sampler's own time (``ask`` plus
    ``tell``).

    Args:
        fun: ``fun(x) -> float`` for ``x`` ``[D]`` in the unit box.
        dim: ``D``.
        budget: ``T``.
        sampler: ``"tpe"``, ``"gp"`` or ``"cmaes"``.
        seed: the sampler's seed.
    Returns:
        ``(xs [T, D], ys [T], seconds [T])``.
    Raises:
        ValueError: an unknown sampler.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler == "tpe":
        s = optuna.samplers.TPESampler(seed=seed)
    elif sampler == "gp":
        s = optuna.samplers.GPSampler(seed=seed)
    elif sampler == "cmaes":
        s = optuna.samplers.CmaEsSampler(seed=seed)
    else:
        raise ValueError(f"optuna sampler must be one of {OPTUNA_SAMPLERS}, got {sampler!r}")
    study = optuna.create_study(sampler=s, direction="minimize")
    dists = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(dim)}
    xs, ys, times = [], [], []
    for _ in range(budget):
        start = time.perf_counter()
        trial = study.ask(dists)
        x = np.array([trial.params[f"x{i}"] for i in range(dim)])
        elapsed = time.perf_counter() - start
        y = float(fun(x))
        start = time.perf_counter()
        study.tell(trial, y)
        times.append(elapsed + time.perf_counter() - start)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.array(ys), np.array(times)
