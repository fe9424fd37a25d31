"""Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein 2021, "Unbiased Gradient
Estimation in Unrolled Computation Graphs with Persistent Evolution Strategies", ICML,
arXiv 2112.13835)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from learnopt.meta.base import GradientEstimate, cpu_leaves, meta_weights, restore_leaves
from learnopt.meta.es import ESState, PerturbationEstimator, copy_generator
from learnopt.optim.base import Params


@dataclass
class PESState(ESState):
    """``ESState`` plus, for every particle, its own inner state, and for every antithetic
    pair the accumulated perturbation ξ of its positive member (the negative member's is −ξ).

    ``particles[2i]`` / ``particles[2i + 1]``: ``(params, opt_state)`` of pair i's members
    with weights φ + ε and φ − ε; ``accum[i]``: ξ_i, a dict like the meta-parameters.
    ``params`` / ``opt_state`` are the reference run with the unperturbed φ (for metrics).

    Attributes:
        particles: ``(params, opt_state)`` of every member, 2N of them.
        accum: ξ_i of every pair, N of them.
    """

    particles: list[tuple[Params, Any]]
    accum: list[dict[str, Tensor]]


class PES(PerturbationEstimator):
    """Persistent evolution strategies: an unbiased estimate of the gradient of the meta-loss
    summed over all truncations of an episode, at the cost of truncated ES.

    Truncated ES and truncated BPTT both differentiate each truncation's meta-loss L_j with
    the carried state held fixed, and so miss how φ shaped that state ("truncation bias").
    PES gives each particle its own inner run that persists across truncations, and keeps
    the sum ξ of all perturbations that run has seen in the current episode. Per truncation
    j (antithetic pairs i = 1 … N; ``sigma`` = σ)::

        ε_i ~ N(0, σ² I)
        ξ_i ← ξ_i + ε_i                              (ξ_i = 0 at the start of an episode)
        L_i^± = L_j(run of particle i^± from its own state, weights φ ± ε_i)
        ĝ_j = (1/(2N σ²)) Σ_i ξ_i (L_i^+ − L_i^−)

    (the paper's PES update with antithetic sampling: the mean over the 2N particles of
    ξ L / σ², with ξ of the negative member = −ξ_i). For a fixed φ,
    E[Σ_j ĝ_j] = ∇_φ E_ε[Σ_j L_j(φ + ε_1, …, φ + ε_j)], where L_j depends on the weights
    used in truncations 1 … j: the gradient of the Gaussian-smoothed whole-episode meta-loss,
    unbiased with respect to the whole horizon whatever the truncation lengths (the
    unbiasedness result of Vicol et al. 2021). Its variance grows with the number of
    truncations in an episode (ξ accumulates) and shrinks as 1/N.

    In meta-training φ changes between truncations and the particles continue with the new
    φ; the estimate is then unbiased only up to that drift, as in the paper. All particles
    share the episode's tasks and, in each truncation, its batches; they are all on the same
    schedule, so they reach the horizon together, and then every particle restarts from the
    new episode's initial state with ξ = 0. The initial inner state θ_0 and optimizer state
    are taken to be independent of φ (true for every learned optimizer here). A reference
    run with the unperturbed φ is carried beside the particles: it gives ``meta_loss`` and
    the inner-loss metrics, comparable with the other estimators'. One estimate costs
    2N + 1 forward truncations; the particles' states take 2N times the memory of one run.
    Distributed, each rank holds the particles of its own pairs only (``PerturbationEstimator``).
    A non-finite loss in any particle drops the estimate (``finite=False``, zero gradients)
    and restarts every particle in a new episode.

    Args: as ``PerturbationEstimator``'s, e.g. ``PES(num_pairs=4, sigma=0.01, horizon=500,
    schedule=UniformSchedule(25, 75))``.

    References:
        Vicol, Metz & Sohl-Dickstein 2021, arXiv 2112.13835.
    """

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> PESState:
        base, noise = self._start(lopt, episode)
        pairs = len(self.local_pairs())
        particles = [(base.params, base.opt_state)] * (2 * pairs)  # out-of-place updates: sharing is safe
        names, weights = meta_weights(lopt)
        accum = [{n: torch.zeros_like(w.detach()) for n, w in zip(names, weights)} for _ in range(pairs)]
        return PESState(base.task, base.params, base.opt_state, base.step, base.episode, base.generator, noise,
                        particles, accum)

    def estimate(self, lopt: nn.Module, state: PESState | None = None) -> GradientEstimate:
        state, k, names, phi, noise, data, ref = self._begin(lopt, state)
        grads = {n: torch.zeros_like(w) for n, w in phi.items()}
        losses, particles, accum = [], [], []
        local = {pair: j for j, pair in enumerate(self.local_pairs())}  # pair index -> slot in this rank's state
        for i in range(self.num_pairs):
            eps = self._perturbation(phi, noise)  # drawn for every pair, so all ranks share the stream
            if i not in local:
                continue
            j = local[i]
            xi = {n: state.accum[j][n] + eps[n] for n in phi}
            pair = []
            for sign, (params, opt_state) in zip((1.0, -1.0), state.particles[2 * j: 2 * j + 2]):
                member = {n: phi[n] + sign * eps[n] for n in phi}
                run = self._run(lopt, member, state.task, params, opt_state, copy_generator(state.generator), k)
                pair.append(run.meta_loss)
                particles.append((run.params, run.opt_state))
            losses.extend(pair)
            accum.append(xi)
            scale = self._pair_scale(pair)
            for n in phi:
                grads[n] = grads[n] + scale.to(xi[n].dtype) * xi[n]
        new_state = PESState(state.task, ref.params, ref.opt_state, state.step + k, state.episode, data, noise,
                             particles, accum)
        metrics = {"pes_xi_norm": float(torch.stack([
            torch.sqrt(sum((x * x).sum() for x in xi.values())) for xi in accum
        ]).mean())}
        return self._finish(lopt, names, list(grads.values()), losses, ref, new_state, metrics)

    def save_unroll(self, state: PESState) -> dict[str, Any]:
        saved = super().save_unroll(state)
        saved["particles"] = [
            {"params": {k: v.detach().cpu() for k, v in params.items()}, "opt_state": cpu_leaves(opt_state)}
            for params, opt_state in state.particles
        ]
        saved["accum"] = [{n: x.detach().cpu() for n, x in xi.items()} for xi in state.accum]
        return saved

    def restore_unroll(self, lopt: nn.Module, saved: dict[str, Any]) -> PESState:
        state = super().restore_unroll(lopt, saved)
        device = lopt.device
        pairs = len(self.local_pairs())
        if len(saved["particles"]) != 2 * pairs:
            raise ValueError(
                f"PES: the saved state has {len(saved['particles'])} particles, this estimator has "
                f"{2 * pairs} (num_pairs={self.num_pairs}, rank {self.rank} of {self.world_size})"
            )
        state.particles = [
            ({k: v.to(device) for k, v in p["params"].items()}, restore_leaves(state.opt_state, p["opt_state"], device))
            for p in saved["particles"]
        ]
        state.accum = [{n: x.to(device) for n, x in xi.items()} for xi in saved["accum"]]
        return state
