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
    antithetic evolution strategies: ``num_pairs`` pairs ``φ ± σε`` evaluated on the *same*
    episodes (common random numbers), ``g = Σ (L⁺ − L⁻) ε / (2σ·num_pairs)``, which needs no
    derivatives through the episode (Salimans et al. 2017; the estimator VSML's paper uses).

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
    guarded_meta_grads,
    meta_weights,
    task_stream,
)
from learnopt.task import seeded_generator


@runtime_checkable
class EpisodeFamily(Protocol):
    """A distribution of episodes with a meta-loss differentiable in the learned model."""

    def meta_loss(self, model: nn.Module, num_episodes: int,
                  generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Mean meta-loss over ``num_episodes`` episodes drawn from ``generator``, and metrics."""


def is_episodic(family: Any) -> bool:
    return callable(getattr(family, "meta_loss", None))


class _EpisodicEstimator(GradientEstimator):
    def __init__(self, family: EpisodeFamily, num_episodes: int, seed: int = 0, split: str = "train") -> None:
        if not is_episodic(family):
            raise TypeError(f"{type(self).__name__} needs an episode family with meta_loss(model, n, generator); "
                            f"got {type(family).__name__}")
        if num_episodes < 1:
            raise ValueError(f"{type(self).__name__}: num_episodes must be >= 1, got {num_episodes}")
        self.task_family = family
        self.num_tasks = num_episodes
        self.seed = seed
        self.split = split
        self.horizon = int(getattr(family, "horizon", 1))

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> UnrollState:
        # Under DDP each rank draws its own episodes (rank 0: the single-process stream).
        generator = task_stream(self.split, self.seed, episode, self.rank)
        return UnrollState(task=None, params={}, opt_state=(), step=0, episode=episode, generator=generator)

    def _next(self, state: UnrollState) -> UnrollState:
        return self.init_unroll(None, state.episode + 1)

    def save_unroll(self, state: UnrollState) -> dict[str, Any]:
        return {"episode": state.episode}

    def restore_unroll(self, lopt: nn.Module, saved: dict[str, Any]) -> UnrollState:
        return self.init_unroll(lopt, int(saved["episode"]))


class EpisodicBPTT(_EpisodicEstimator):
    """Exact meta-gradient of the mean episode meta-loss by backpropagation through the episodes."""

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        state = state if state is not None else self.init_unroll(lopt, 0)
        names, weights = meta_weights(lopt)
        loss, metrics = self.task_family.meta_loss(lopt, self.num_tasks, state.generator)
        grads, finite = guarded_meta_grads(loss, weights)
        metrics = dict(metrics)
        metrics["nonfinite"] = 0.0 if finite else 1.0
        return GradientEstimate(loss.detach(), dict(zip(names, grads)), self._next(state), metrics, finite)


class EpisodicES(_EpisodicEstimator):
    """Antithetic ES on the episode meta-loss: ``num_pairs`` pairs of perturbations of scale
    ``sigma``, both members of a pair (and all pairs) scored on the same episodes."""

    def __init__(self, family: EpisodeFamily, num_episodes: int, seed: int = 0, split: str = "train",
                 sigma: float = 0.05, num_pairs: int = 8) -> None:
        super().__init__(family, num_episodes, seed, split)
        if sigma <= 0 or num_pairs < 1:
            raise ValueError(f"EpisodicES: sigma must be > 0 and num_pairs >= 1, got {sigma}, {num_pairs}")
        self.sigma = sigma
        self.num_pairs = num_pairs

    def _score(self, lopt: nn.Module, weights: list[Tensor], shifts: list[Tensor], state: UnrollState) -> Tensor:
        generator = torch.Generator(device=state.generator.device)
        generator.set_state(state.generator.get_state())  # common random numbers for every member
        with torch.no_grad():
            saved = [w.detach().clone() for w in weights]
            for w, s in zip(weights, shifts):
                w.add_(s)
            try:
                loss, _ = self.task_family.meta_loss(lopt, self.num_tasks, generator)
            finally:  # copy back (w + s − s need not round to w)
                for w, s in zip(weights, saved):
                    w.copy_(s)
        return loss.detach()

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        state = state if state is not None else self.init_unroll(lopt, 0)
        names, weights = meta_weights(lopt)
        keys = ("es-noise", self.split, self.seed, state.episode) + (("rank", self.rank) if self.rank else ())
        noise = seeded_generator(*keys)  # ranks > 0 of a DDP run: their own episodes and perturbations
        grads = [torch.zeros_like(w) for w in weights]
        losses = []
        for _ in range(self.num_pairs):
            eps = [torch.randn(w.shape, generator=noise, dtype=w.dtype).to(w.device) for w in weights]
            plus = self._score(lopt, weights, [self.sigma * e for e in eps], state)
            minus = self._score(lopt, weights, [-self.sigma * e for e in eps], state)
            losses += [plus, minus]
            diff = plus - minus
            if torch.isfinite(diff):
                for g, e in zip(grads, eps):
                    g.add_(diff / (2 * self.sigma * self.num_pairs) * e)
        stacked = torch.stack(losses)
        finite = bool(torch.isfinite(stacked).all())
        if not finite:
            grads = [torch.zeros_like(w) for w in weights]
        metrics = {"nonfinite": 0.0 if finite else 1.0}
        return GradientEstimate(stacked.mean(), dict(zip(names, grads)), self._next(state), metrics, finite)
