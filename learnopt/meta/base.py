"""The interface every meta-gradient estimator implements, and the record it returns.

An estimator turns a learned optimizer ``lopt`` (an ``nn.Module`` whose parameters are the
meta-parameters φ) and a carried inner run into one estimate of ∂(meta-loss)/∂φ::

    state = estimator.init_unroll(lopt, episode=0)     # tasks, θ_0, optimizer state
    est = estimator.estimate(lopt, state)              # GradientEstimate
    est.meta_loss, est.meta_grads, est.finite, est.metrics
    state = est.unroll_state                           # carried to the next call

This is the shape of ``learned_optimization``'s gradient estimators (Metz et al. 2022,
arXiv 2203.11860, ``outer_trainers/``): truncated BPTT, full BPTT, ES and PES all return the
same record, so the training shell does not care which one runs. ``save_unroll`` /
``restore_unroll`` turn the carried state into plain tensors and back, for resuming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from learnopt.meta.schedules import ConstantSchedule, truncation_length
from learnopt.optim.base import Params, tree_leaves
from learnopt.task import Task, TaskFamily, seeded_generator


@dataclass
class UnrollState:
    """What is carried from one truncation to the next: the tasks being trained, their
    parameters, the learned optimizer's state, and the position in the inner run."""

    task: Task
    params: Params
    opt_state: Any
    step: int
    episode: int
    generator: torch.Generator


@dataclass
class GradientEstimate:
    """The record every gradient estimator returns."""

    meta_loss: Tensor
    meta_grads: dict[str, Tensor]
    unroll_state: UnrollState
    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True


def task_stream(split: str, seed: int, episode: int, rank: int = 0) -> torch.Generator:
    """The seed stream of episode ``episode``'s tasks: ``(split, seed, episode)`` for rank 0 (and
    a single process, so single-process runs and their checkpoints stay reproducible), and
    ``(split, seed, "rank", rank, episode)`` for the other ranks of a distributed run, so every
    rank trains its own task instances."""
    if rank == 0:
        return seeded_generator(split, seed, episode)
    return seeded_generator(split, seed, "rank", rank, episode)


def start_unroll(
    lopt: nn.Module, task_family: TaskFamily, num_tasks: int, split: str, seed: int, episode: int, rank: int = 0
) -> UnrollState:
    """Sample episode ``episode``'s tasks from the seed stream ``task_stream(split, seed,
    episode, rank)`` and their initial parameters and optimizer state, on ``lopt``'s device."""
    generator = task_stream(split, seed, episode, rank)
    task = task_family.sample(num_tasks, generator)
    if hasattr(task, "to"):
        task = task.to(lopt.device)
    params = {k: p.to(lopt.device) for k, p in task.init(generator).items()}
    with torch.no_grad():
        opt_state = lopt.init(params)
    return UnrollState(task, params, opt_state, 0, episode, generator)


def meta_weights(lopt: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the meta-parameters (those that require grad)."""
    named = [(n, p) for n, p in lopt.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def guarded_meta_grads(meta_loss: Tensor, weights: list[Tensor]) -> tuple[list[Tensor], bool]:
    """``∂ meta_loss / ∂ weights`` (zeros for weights the loss does not reach) and whether the
    loss and every gradient are finite; when not, the gradients are all zeros, so a caller can
    skip the update without NaNs reaching the meta-parameters."""
    finite = bool(torch.isfinite(meta_loss))
    if finite:
        grads = torch.autograd.grad(meta_loss, weights, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
    if not finite:
        grads = [torch.zeros_like(w) for w in weights]
    return grads, finite


def cpu_leaves(tree: Any) -> list[Tensor]:
    return [x.detach().cpu() for x in tree_leaves(tree)]


def restore_leaves(like: Any, leaves: list[Tensor], device: torch.device) -> Any:
    """The pytree ``like`` with its leaves replaced by ``leaves`` (moved to ``device``)."""
    _, spec = pytree.tree_flatten(like)
    return pytree.tree_unflatten([x.to(device) for x in leaves], spec)


class GradientEstimator:
    """Base of the meta-gradient estimators (``TruncatedBPTT``, ``FullBPTT``, ``ES``, ``PES``).

    Subclasses implement ``init_unroll(lopt, episode)`` and ``estimate(lopt, state)``; a
    subclass whose carried state holds more than ``UnrollState`` extends ``save_unroll`` and
    ``restore_unroll``. ``horizon`` is the length T of an inner run.
    """

    horizon: int
    # Distributed meta-training (``distribute``): this process's rank among ``world_size``.
    rank: int = 0
    world_size: int = 1

    def distribute(self, rank: int, world_size: int) -> None:
        """Make this estimator one of ``world_size`` data-parallel replicas, the ``rank``-th.

        What each replica computes is chosen so that the mean of the replicas' meta-gradients
        (the all-reduce of ``MetaTrainModule``) is the estimate a single process would make on
        the union of their work: BPTT estimators draw their tasks from a per-rank seed stream
        (``task_stream``), so W ranks of ``num_tasks`` instances estimate what one process with
        all W · ``num_tasks`` instances would; ES and PES share the tasks and split their
        antithetic pairs across ranks (see ``PerturbationEstimator``). Call before
        ``init_unroll``; rank 0 of any world draws what a single process draws.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}.distribute: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)

    def _configure(self, task_family: TaskFamily, num_tasks: int, unroll_length: int, horizon: int,
                   loss_transform: str, seed: int, split: str, schedule: Any) -> None:
        """Validate and store the settings every estimator shares."""
        name = type(self).__name__
        if unroll_length < 1 or horizon < 1:
            raise ValueError(f"{name}: unroll_length and horizon must be >= 1")
        if loss_transform not in ("identity", "log"):
            raise ValueError(f"{name}: loss_transform must be 'identity' or 'log', got {loss_transform!r}")
        self.task_family = task_family
        self.num_tasks = num_tasks
        self.unroll_length = unroll_length
        self.horizon = horizon
        self.loss_transform = loss_transform
        self.seed = seed
        self.split = split
        self.schedule = ConstantSchedule(unroll_length) if schedule is None else schedule

    def truncation_length(self, state: UnrollState) -> int:
        """Length of the truncation that starts at ``state.step`` (clipped to the horizon)."""
        return truncation_length(self.schedule, state.step, self.horizon, self.split, self.seed, state.episode)

    def _transform(self, loss: Tensor) -> Tensor:
        """The meta-loss transform: ``log`` weighs late, small losses like early ones."""
        if self.loss_transform == "log":
            return torch.log(loss + 1e-12)
        return loss

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> UnrollState:
        raise NotImplementedError

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        raise NotImplementedError

    def save_unroll(self, state: UnrollState) -> dict[str, Any]:
        """The carried state as CPU tensors and plain values (the tasks are not saved: they are
        re-drawn from their seed stream)."""
        return {
            "episode": state.episode,
            "step": state.step,
            "params": {k: v.detach().cpu() for k, v in state.params.items()},
            "opt_state": cpu_leaves(state.opt_state),
            "generator": state.generator.get_state(),
        }

    def restore_unroll(self, lopt: nn.Module, saved: dict[str, Any]) -> UnrollState:
        """Inverse of ``save_unroll``: re-draws the episode's tasks, then puts back the saved
        parameters, optimizer state and data-generator state."""
        fresh = self.init_unroll(lopt, episode=saved["episode"])
        device = lopt.device
        fresh.generator.set_state(saved["generator"])
        fresh.params = {k: v.to(device) for k, v in saved["params"].items()}
        fresh.opt_state = restore_leaves(fresh.opt_state, saved["opt_state"], device)
        fresh.step = saved["step"]
        return fresh
