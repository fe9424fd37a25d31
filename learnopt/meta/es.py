"""Antithetic evolution strategies on truncated unrolls (Salimans et al. 2017, arXiv 1703.03864;
as an estimator of meta-gradients: Metz et al. 2019, arXiv 1810.10180; Vicol et al. 2021,
arXiv 2112.13835, §2), and the machinery ES and PES share.

The learned optimizer is run with perturbed weights through ``torch.func.functional_call``,
so the module itself is never modified, and without any graph with respect to its weights:
evolution strategies need only meta-loss values, so memory does not grow with the unroll
and non-differentiable inner steps are fine. Each member runs the truncation of truncated
BPTT (``learnopt.meta.truncation.run_truncation``) with the graph dropped between steps.
``perturbation`` and ``antithetic_scale`` are the antithetic draws and weights that ES, PES
and the episodic ES (``learnopt.meta.episodic.EpisodicES``) share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from learnopt.meta.base import (
    GradientEstimate,
    GradientEstimator,
    UnrollState,
    meta_weights,
    start_unroll,
)
from learnopt.meta.schedules import TruncationSchedule
from learnopt.meta.truncation import ChunkSteps, InnerStep, Truncation, run_truncation
from learnopt.optim.base import Params
from learnopt.task import Task, TaskFamily, seeded_generator


class _BoundOptimizer(nn.Module):
    """Lets ``functional_call`` run an arbitrary function of the learned optimizer: its
    ``forward(fn, *args)`` is ``fn(lopt, *args)``."""

    def __init__(self, lopt: nn.Module) -> None:
        super().__init__()
        self.lopt = lopt

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.lopt, *args)


def call_with_weights(lopt: nn.Module, weights: dict[str, Tensor], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(lopt, *args)`` with ``lopt``'s parameters replaced by ``weights`` for the duration
    of the call (``torch.func.functional_call``; ``lopt`` itself is not modified).

    Args:
        lopt: the module whose parameters are replaced.
        weights: replacement tensors by parameter name (a subset of ``named_parameters``).
        fn: called as ``fn(lopt, *args)`` while the replacement holds.
        *args: passed on to ``fn``.

    Returns:
        What ``fn`` returns.
    """
    return torch.func.functional_call(
        _BoundOptimizer(lopt), {f"lopt.{n}": w for n, w in weights.items()}, (fn, *args)
    )


def copy_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in the state of ``generator`` (which is left as it is).

    Args:
        generator: the generator to copy.

    Returns:
        The copy, on the same device.
    """
    g = torch.Generator(device=generator.device)
    g.set_state(generator.get_state())
    return g


def perturbation(weights: dict[str, Tensor], sigma: float, noise: torch.Generator) -> dict[str, Tensor]:
    """ε = σ z with z ~ N(0, I): one antithetic pair's perturbation of ``weights``.

    Args:
        weights: the meta-parameters, by name.
        sigma: the perturbation scale σ.
        noise: the generator of z; z is drawn on the CPU tensor by tensor, in the order of
            ``weights`` and in each weight's dtype, so the draws are the same on any device.

    Returns:
        ε, a dict like ``weights`` (on their devices).
    """
    return {n: (sigma * torch.randn(w.shape, generator=noise, dtype=w.dtype)).to(w.device) for n, w in weights.items()}


def antithetic_scale(pair: list[Tensor], sigma: float, num_pairs: float) -> Tensor:
    """(L⁺ − L⁻)/(2σ² N): the weight of one pair's perturbation ε in the ES estimate
    ĝ = Σ_i ε_i (L_i⁺ − L_i⁻)/(2σ² N) = (1/N) Σ_i z_i (L_i⁺ − L_i⁻)/(2σ) (Salimans et al. 2017).

    Args:
        pair: the meta-losses ``[L⁺, L⁻]`` at φ + ε and φ − ε.
        sigma: the perturbation scale σ.
        num_pairs: N, the number of pairs the estimate averages over.

    Returns:
        The scalar weight.
    """
    return (pair[0] - pair[1]) / (2 * sigma**2 * num_pairs)


def check_perturbations(owner: str, sigma: float, num_pairs: int) -> None:
    """Refuse a perturbation scale ≤ 0 or fewer than one antithetic pair.

    Args:
        owner: who asks (the class name), for the message.
        sigma: the perturbation scale σ.
        num_pairs: the number of antithetic pairs.

    Raises:
        ValueError: ``sigma`` is not > 0 or ``num_pairs`` < 1.
    """
    if not sigma > 0:
        raise ValueError(f"{owner}: sigma must be > 0, got {sigma}")
    if num_pairs < 1:
        raise ValueError(f"{owner}: num_pairs must be >= 1, got {num_pairs}")


def _forward(lopt: nn.Module, step: InnerStep, chunk_steps: ChunkSteps | None, chunk: int, task: Task,
             params: Params, opt_state: Any, generator: torch.Generator, k: int,
             transform: Callable[[Tensor], Tensor]) -> Truncation:
    return run_truncation(step, lopt, task, params, opt_state, generator, k, transform, keep_graph=False,
                          chunk_steps=chunk_steps, chunk=chunk)


@dataclass
class ESState(UnrollState):
    """``UnrollState`` plus the generator of the perturbations.

    Attributes:
        noise: the generator of the perturbations z (on the CPU).
    """

    noise: torch.Generator


class PerturbationEstimator(GradientEstimator):
    """What ES and PES share: the reference (unperturbed) run that carries the inner state and
    reports the meta-loss, perturbation draws, perturbed truncations, the non-finite guard.

    Perturbations are ε = σ z with z ~ N(0, I) drawn on the CPU from a generator carried in
    the state (seeded by ``(split, seed, "noise", noise_seed, episode)``; pair by pair, each
    pair's z tensor by tensor in ``named_parameters`` order), so estimates are
    reproducible on any device and resume exactly. ``noise_seed`` changes only the
    perturbations, not the tasks. All members of all pairs, and the reference run, start each
    truncation from the same data-generator state, so they see the same task batches (common
    random numbers: differences between them come from the perturbation alone).

    Distributed (``distribute(rank, world_size)``): every rank draws the same tasks and the
    same perturbations, runs the reference run, and evaluates only its share of the pairs
    (pairs ``rank, rank + W, rank + 2W, …``), scaled by W so that the mean of the ranks'
    estimates is exactly the single-process estimate with ``num_pairs`` pairs. W ranks thus
    cut the time of an estimate by about W (2N/W + 1 truncations each).

    Args:
        task_family, num_tasks, unroll_length, horizon, loss_transform, seed, split, schedule:
            as ``TruncatedBPTT``'s.
        sigma: the perturbation scale σ (in the raw parameters).
        num_pairs: N, the number of antithetic pairs per estimate.
        noise_seed: changes the perturbations only, not the tasks.
        compile_unroll: run every truncation's inner steps through ``torch.compile``
            (``learnopt.meta.compiled``, values only: no autograd graph).
        compile_chunk: the inner steps per compiled region (1: one step per graph).
    """

    kind = "perturbation"
    forward_only = True

    def __init__(
        self,
        task_family: TaskFamily | None = None,
        num_tasks: int = 128,
        unroll_length: int = 20,
        horizon: int = 100,
        loss_transform: Literal["identity", "log"] = "identity",
        seed: int | None = None,
        split: str = "train",
        sigma: float = 0.01,
        num_pairs: int = 8,
        schedule: TruncationSchedule | None = None,
        noise_seed: int = 0,
        compile_unroll: bool = False,
        compile_chunk: int = 4,
    ) -> None:
        check_perturbations(type(self).__name__, sigma, num_pairs)
        self._configure(task_family, num_tasks, unroll_length, horizon, loss_transform, seed, split, schedule,
                        compile_unroll, compile_chunk)
        self.sigma = float(sigma)
        self.num_pairs = num_pairs
        self.noise_seed = noise_seed

    def distribute(self, rank: int, world_size: int) -> None:
        if self.num_pairs < world_size:
            raise ValueError(
                f"{type(self).__name__}: num_pairs ({self.num_pairs}) must be >= the number of processes "
                f"({world_size}); the antithetic pairs are split across them"
            )
        super().distribute(rank, world_size)

    def local_pairs(self) -> range:
        """Indices of the antithetic pairs this rank evaluates.

        Returns:
            ``range(rank, num_pairs, world_size)``.
        """
        return range(self.rank, self.num_pairs, self.world_size)

    def _pair_scale(self, pair: list[Tensor]) -> Tensor:
        """(L+ − L−)/(2σ² N/W): one pair's weight in this rank's estimate (see the class docstring)."""
        return antithetic_scale(pair, self.sigma, self.num_pairs / self.world_size)

    # -- shared pieces ---------------------------------------------------------------------------
    def _start(self, lopt: nn.Module, episode: int) -> tuple[UnrollState, torch.Generator]:
        base = start_unroll(lopt, self._bound_family(), self.num_tasks, self.split, self.seed, episode)
        return base, seeded_generator(self.split, self.seed, "noise", self.noise_seed, episode)

    def _perturbation(self, weights: dict[str, Tensor], noise: torch.Generator) -> dict[str, Tensor]:
        return perturbation(weights, self.sigma, noise)

    def _begin(self, lopt: nn.Module, state: ESState | None) -> tuple:
        """Start an estimate: the state (a new episode past the horizon), the truncation length,
        the unperturbed weights φ, copies of the noise and data generators, and the reference
        run with φ, which advances the carried data stream and supplies the reported metrics."""
        if state is None:
            state = self.init_unroll(lopt)
        if state.step >= self.horizon:
            state = self.init_unroll(lopt, state.episode + 1)
        k = self.truncation_length(state)
        names, weights = meta_weights(lopt)
        phi = {n: w.detach() for n, w in zip(names, weights)}
        noise = copy_generator(state.noise)
        data = copy_generator(state.generator)
        ref = self._run(lopt, phi, state.task, state.params, state.opt_state, data, k)
        return state, k, names, phi, noise, data, ref

    def _run(self, lopt: nn.Module, weights: dict[str, Tensor], task: Task, params: Params, opt_state: Any,
             generator: torch.Generator, k: int) -> Truncation:
        return call_with_weights(lopt, weights, _forward, self.step_function(), self.chunk_function(),
                                 self.compile_chunk, task, params, opt_state, generator, k, self._transform)

    def _finish(self, lopt: nn.Module, names: list[str], grads: list[Tensor], losses: list[Tensor],
                ref: Truncation, new_state: UnrollState, metrics: dict[str, float]) -> GradientEstimate:
        """The non-finite guard of ``TruncatedBPTT``: if the reference meta-loss, any perturbed
        meta-loss or the estimate is not finite, report ``finite=False`` with zero gradients
        and start the next episode."""
        step = new_state.step
        finite = bool(torch.isfinite(torch.stack([ref.meta_loss, *losses])).all())
        finite = finite and all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            grads = [torch.zeros_like(g) for g in grads]
            new_state = self.init_unroll(lopt, new_state.episode + 1)
        last = ref.last_loss
        metrics.update({
            "inner_step": float(step),
            "inner_loss_first": float(ref.first_loss.mean()),
            "inner_loss_last": float(last.mean()),
            "inner_log10_loss_last": float(torch.log10(last.clamp_min(1e-30)).mean()),
            "perturbed_meta_loss": float(torch.stack(losses).mean()),
            "nonfinite": float(not finite),
        })
        return GradientEstimate(ref.meta_loss, dict(zip(names, grads)), new_state, metrics, finite)

    def save_unroll(self, state: UnrollState) -> dict[str, Any]:
        saved = super().save_unroll(state)
        saved["noise"] = state.noise.get_state()
        return saved

    def restore_unroll(self, lopt: nn.Module, saved: dict[str, Any]) -> UnrollState:
        state = super().restore_unroll(lopt, saved)
        state.noise.set_state(saved["noise"])
        return state


class ES(PerturbationEstimator):
    """Antithetic evolution strategies on one truncation's meta-loss.

    With L(φ) the truncation meta-loss of ``TruncatedBPTT`` (same K, same carried state, same
    batches) and the Gaussian smoothing L_σ(φ) = E_z[L(φ + σz)], N = ``num_pairs``::

        z_1 … z_N ~ N(0, I)
        ĝ = (1/N) Σ_i z_i (L(φ + σ z_i) − L(φ − σ z_i)) / (2σ)

    is an unbiased estimate of ∇L_σ(φ), which tends to ∇L(φ) as σ → 0 (the error is
    O(σ²) for smooth L); the antithetic pairs cancel the even terms of L, so the variance
    stays bounded as σ → 0 (Salimans et al. 2017, arXiv 1703.03864). Unlike BPTT it needs no
    derivatives through the unroll, is unaffected by exploding gradients of a chaotic unroll
    (Metz et al. 2019, arXiv 1810.10180) and smooths the meta-loss at scale σ, but like
    truncated BPTT it ignores how φ changed the carried state, so it shares the truncation
    bias (see ``PES``).

    Both members of a pair start from the same carried inner state and see the same task
    batches. The carried state advances with the unperturbed weights φ (a reference run,
    whose meta-loss is reported as ``meta_loss``), so one estimate costs 2N + 1 forward
    truncations. ``sigma`` perturbs the raw parameters (a ``LearnedHyperparameters`` lr is
    perturbed in log space). A non-finite meta-loss of any member, or of the reference run,
    drops the estimate (``finite=False``, zero gradients) and starts a new episode.

    Args: as ``PerturbationEstimator``'s, e.g. ``ES(num_pairs=8, sigma=0.01, unroll_length=20,
    horizon=100)``.

    References:
        Salimans et al. 2017, arXiv 1703.03864; Metz et al. 2019, arXiv 1810.10180.
    """

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> ESState:
        base, noise = self._start(lopt, episode)
        return ESState(base.task, base.params, base.opt_state, base.step, base.episode, base.generator, noise)

    def estimate(self, lopt: nn.Module, state: ESState | None = None) -> GradientEstimate:
        state, k, names, phi, noise, data, ref = self._begin(lopt, state)
        grads = {n: torch.zeros_like(w) for n, w in phi.items()}
        losses = []
        mine = set(self.local_pairs())
        for i in range(self.num_pairs):
            eps = self._perturbation(phi, noise)  # drawn for every pair, so all ranks share the stream
            if i not in mine:
                continue
            pair = []
            for sign in (1.0, -1.0):
                member = {n: phi[n] + sign * eps[n] for n in phi}
                pair.append(self._run(lopt, member, state.task, state.params, state.opt_state,
                                      copy_generator(state.generator), k).meta_loss)
            losses.extend(pair)
            # z (L+ − L−)/(2σ) = ε (L+ − L−)/(2σ²)
            scale = self._pair_scale(pair)
            for n in phi:
                grads[n] = grads[n] + scale.to(eps[n].dtype) * eps[n]
        new_state = ESState(state.task, ref.params, ref.opt_state, state.step + k, state.episode, data, noise)
        return self._finish(lopt, names, list(grads.values()), losses, ref, new_state, {})
