"""Meta-gradient estimators for *episodic* meta-objectives: families whose meta-loss is one
differentiable function of the learned model over a batch of sampled episodes.

The gradient-based learned optimizers unroll an inner training run, carried across
truncations (``TruncatedBPTT``, ``PES``). Two other families of the project have no inner
optimizer to unroll:

* a black-box proposer (Chen et al. 2017) is scored on the queries it makes on sampled
  GP functions — an episode is one optimisation run of ``horizon`` queries;
* a VSML learner (Kirsch & Schmidhuber 2021) is scored on the online predictions it makes on
  a stream of labelled examples — an episode is one learning run.

Each of them is an ``EpisodeFamily``: ``meta_loss(model, num_episodes, generator)`` samples
``num_episodes`` episodes from ``generator`` and returns their mean meta-loss as a tensor
differentiable in the model's parameters (and a dict of float metrics). The two estimators
here turn that into the same ``GradientEstimate`` record every estimator returns, so the
Lightning shell (``MetaTrainModule``) trains them with the same options, logging and
checkpointing:

``EpisodicBPTT``
    backpropagation through whole episodes (``autograd.grad`` of the meta-loss);
``EpisodicES``
    antithetic evolution strategies: ``num_pairs`` pairs ``φ ± σz`` evaluated on the *same*
    episodes (common random numbers), ``g = Σ (L⁺ − L⁻) z / (2σ·num_pairs)``, which needs no
    derivatives through the episode (Salimans et al. 2017; the estimator VSML's paper uses);
    the members run through ``functional_call`` with the perturbation code of ``ES``.

Episode ``k`` of a run draws from the seed stream ``("train", seed, k)``, so a resumed run
draws exactly what the interrupted one would have. A family may also provide
``validation_score(model, generator) -> float`` (lower is better) for model selection.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from learnopt.meta.base import (
    GradientEstimate,
    GradientEstimator,
    UnrollState,
    check_count,
    guarded_meta_grads,
    is_episodic,
    meta_weights,
    task_stream,
)
from learnopt.meta.es import antithetic_scale, call_with_weights, check_perturbations, copy_generator, perturbation
from learnopt.task import seeded_generator

__all__ = ["EpisodeFamily", "EpisodicBPTT", "EpisodicES", "is_episodic"]


@runtime_checkable
class EpisodeFamily(Protocol):
    """A distribution of episodes with a meta-loss differentiable in the learned model."""

    def meta_loss(self, model: nn.Module, num_episodes: int,
                  generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Mean meta-loss over ``num_episodes`` episodes drawn from ``generator``, and metrics.

        Args:
            model: the learned model being meta-trained.
            num_episodes: the number of episodes to draw.
            generator: the source of the episodes.

        Returns:
            ``(meta_loss, metrics)``: a scalar differentiable in ``model``'s parameters, and scalars to log.
        """


class _EpisodicEstimator(GradientEstimator):
    episodic = True

    def __init__(self, task_family: EpisodeFamily | None = None, num_episodes: int = 16, seed: int | None = None,
                 split: str = "train") -> None:
        check_count(type(self).__name__, "num_episodes", num_episodes, "each meta-step scores num_episodes episodes")
        self.num_episodes = num_episodes
        self._set_seed(seed)
        self.split = split
        self.horizon = 1
        if task_family is not None:
            self.bind(task_family)

    @property
    def num_tasks(self) -> int:
        """The number of episodes per estimate (the name every estimator shares)."""
        return self.num_episodes

    def bind(self, task_family: EpisodeFamily, seed: int | None = None) -> GradientEstimator:
        super().bind(task_family, seed)
        self.horizon = int(getattr(task_family, "horizon", 1))
        return self

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> UnrollState:
        # Under DDP each rank draws its own episodes (rank 0: the single-process stream).
        generator = task_stream(self.split, self.seed, episode, self.rank)
        return UnrollState(task=None, params={}, opt_state=(), step=0, episode=episode, generator=generator)

    def _next(self, state: UnrollState) -> UnrollState:
        return self.init_unroll(None, state.episode + 1)

    def save_unroll(self, state: UnrollState) -> dict[str, Any]:
        """The episode index: nothing else is carried between estimates.

        Args:
            state: the carried state.

        Returns:
            ``{"episode": ...}``.
        """
        return {"episode": state.episode}

    def restore_unroll(self, lopt: nn.Module, saved: dict[str, Any]) -> UnrollState:
        """The state of the saved episode, its generator re-seeded (``init_unroll``).

        Args:
            lopt: the learned model (unused).
            saved: what ``save_unroll`` returned.

        Returns:
            The carried state.
        """
        return self.init_unroll(lopt, int(saved["episode"]))


class EpisodicBPTT(_EpisodicEstimator):
    """Exact meta-gradient of the mean episode meta-loss by backpropagation through the episodes.

    Args:
        task_family: the episode family; ``None`` when given to ``MetaTrainModule``, which
            binds its own.
        num_episodes: episodes scored per estimate.
        seed: the seed of the episode stream (``None``: the run's seed, else 0).
        split: the name of the episode stream.
    """

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        state = state if state is not None else self.init_unroll(lopt, 0)
        names, weights = meta_weights(lopt)
        loss, metrics = self._bound_family().meta_loss(lopt, self.num_episodes, state.generator)
        grads, finite = guarded_meta_grads(loss, weights)
        metrics = dict(metrics)
        metrics["nonfinite"] = 0.0 if finite else 1.0
        return GradientEstimate(loss.detach(), dict(zip(names, grads)), self._next(state), metrics, finite)


class EpisodicES(_EpisodicEstimator):
    """Antithetic ES on the episode meta-loss: ``num_pairs`` pairs of perturbations φ ± ε,
    ε = σ z, both members of a pair (and all pairs) scored on the same episodes::

        ĝ = Σ_i ε_i (L(φ + ε_i) − L(φ − ε_i)) / (2σ² N)

    The members run through ``call_with_weights`` (``torch.func.functional_call``), with the
    draws (``perturbation``) and pair weights (``antithetic_scale``) of ``ES``. The z's come
    from a generator seeded by ``("es-noise", split, seed, episode)`` (ranks > 0 of a DDP run
    add ``("rank", rank)``: they score their own episodes with their own perturbations).

    Args:
        task_family, num_episodes, seed, split: as ``EpisodicBPTT``'s.
        sigma: the perturbation scale σ.
        num_pairs: N, the number of antithetic pairs.

    References:
        Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
        Learning", arXiv 1703.03864.
    """

    def __init__(self, task_family: EpisodeFamily | None = None, num_episodes: int = 16, seed: int | None = None,
                 split: str = "train", sigma: float = 0.05, num_pairs: int = 8) -> None:
        check_perturbations("EpisodicES", sigma, num_pairs)
        super().__init__(task_family, num_episodes, seed, split)
        self.sigma = sigma
        self.num_pairs = num_pairs

    def _score(self, lopt: nn.Module, weights: dict[str, Tensor], state: UnrollState) -> Tensor:
        generator = copy_generator(state.generator)  # common random numbers for every member
        with torch.no_grad():
            loss, _ = call_with_weights(lopt, weights, self._bound_family().meta_loss, self.num_episodes, generator)
        return loss.detach()

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        state = state if state is not None else self.init_unroll(lopt, 0)
        names, weights = meta_weights(lopt)
        phi = {n: w.detach() for n, w in zip(names, weights)}
        keys = ("es-noise", self.split, self.seed, state.episode) + (("rank", self.rank) if self.rank else ())
        noise = seeded_generator(*keys)  # ranks > 0 of a DDP run: their own episodes and perturbations
        grads = {n: torch.zeros_like(w) for n, w in phi.items()}
        losses = []
        for _ in range(self.num_pairs):
            eps = perturbation(phi, self.sigma, noise)
            pair = [self._score(lopt, {n: phi[n] + sign * eps[n] for n in phi}, state) for sign in (1.0, -1.0)]
            losses += pair
            scale = antithetic_scale(pair, self.sigma, self.num_pairs)
            for n in phi:
                grads[n] = grads[n] + scale.to(eps[n].dtype) * eps[n]
        stacked = torch.stack(losses)
        finite = bool(torch.isfinite(stacked).all()) and all(bool(torch.isfinite(g).all()) for g in grads.values())
        if not finite:
            grads = {n: torch.zeros_like(g) for n, g in grads.items()}
        metrics = {"nonfinite": 0.0 if finite else 1.0}
        return GradientEstimate(stacked.mean(), grads, self._next(state), metrics, finite)
