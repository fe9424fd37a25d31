"""Meta-gradients by backpropagation through time: truncated (Andrychowicz et al. 2016, §2)
and over the whole horizon."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from learnopt.meta.base import (
    GradientEstimate,
    GradientEstimator,
    UnrollState,
    guarded_meta_grads,
    meta_weights,
    start_unroll,
)
from learnopt.meta.schedules import TruncationSchedule
from learnopt.meta.truncation import InnerStep, run_truncation
from learnopt.meta.unroll import inner_step
from learnopt.optim.base import GradientTransformation, Params, detach_state
from learnopt.task import Task, TaskFamily

__all__ = ["FullBPTT", "GradientEstimate", "TruncatedBPTT", "UnrollState", "checkpointed_inner_step"]


def checkpointed_inner_step(tx: nn.Module | GradientTransformation, task: Task, params: Params, opt_state: Any,
                            batch: Any = None, second_order: bool = False) -> tuple[Tensor, Params, Any]:
    """``inner_step`` under activation checkpointing (``torch.utils.checkpoint``, non-reentrant):
    the step keeps only its inputs and outputs for the backward pass and recomputes its
    intermediates (the task's forward pass, the learned optimizer's gates) when the
    meta-gradient needs them. Same values and gradients; memory per unrolled step drops to
    the carried state, at the price of running each step's forward twice.

    Args:
        tx, task, params, opt_state, batch, second_order: as ``inner_step``'s.

    Returns:
        ``(loss, new_params, new_opt_state)``, as ``inner_step``'s.
    """
    names = list(params)
    leaves, spec = pytree.tree_flatten(opt_state)

    def step(*tensors: Any) -> tuple:
        p = dict(zip(names, tensors[: len(names)]))
        s = pytree.tree_unflatten(list(tensors[len(names):]), spec)
        loss, p, s = inner_step(tx, task, p, s, batch, second_order=second_order)
        return (loss, *(p[k] for k in names), *pytree.tree_leaves(s))

    out = checkpoint(step, *(params[k] for k in names), *leaves, use_reentrant=False)
    new_params = dict(zip(names, out[1: 1 + len(names)]))
    return out[0], new_params, pytree.tree_unflatten(list(out[1 + len(names):]), spec)


class TruncatedBPTT(GradientEstimator):
    """Unroll ``unroll_length`` (K) inner steps inside a horizon of ``horizon`` (T) steps.

    Each call to ``estimate`` continues the carried inner runs by K steps and returns the
    gradient of the truncation's meta-loss::

        L = (1/K) Σ_{t=t0+1}^{t0+K} w_t · mean_instances loss_transform(f(θ_t)),   w_t = 1

    (the paper's Σ w_t f(θ_t) with w_t = 1, divided by K so the meta learning rate does not
    depend on K). The optimizee parameters and the optimizer state are carried across
    truncations and detached at each boundary; after T steps new task instances are drawn.
    ``loss_transform="log"`` uses log f instead of f, which weighs late (small) losses as
    much as early ones. A truncation whose meta-loss or meta-gradient is not finite is
    reported with ``finite=False`` and zero gradients, and its tasks are replaced, so one
    divergent inner run never reaches the meta-parameters.

    ``schedule`` (a ``learnopt.meta.schedules`` schedule; default ``ConstantSchedule(K)``)
    draws each truncation's length instead; a truncation never crosses the horizon. The
    estimate is biased with respect to the whole-horizon meta-loss: the influence of φ on the
    carried state (θ_{t0}, optimizer state) is cut at every boundary ("truncation bias", Wu et
    al. 2018, arXiv 1803.02021; Vicol et al. 2021, arXiv 2112.13835). ``FullBPTT`` and ``PES``
    do not have it.

    ``activation_checkpointing=True`` runs each inner step under ``torch.utils.checkpoint``
    (``checkpointed_inner_step``): the same meta-gradient with memory per unrolled step cut to
    the carried state, for about one more forward pass per step. ``compile_unroll=True`` runs
    the inner steps — task loss, gradient, learned update — as compiled regions of
    ``compile_chunk`` steps each (``learnopt.meta.compiled``; the same values and meta-gradients,
    compiled on first use, from seconds to about a minute; ``docs/benchmarks`` section 7 measures
    where it pays).

    Args:
        task_family: the task family; ``None`` when the estimator is given to
            ``MetaTrainModule``, which binds its own (``bind``).
        num_tasks: task instances trained side by side in each truncation.
        unroll_length: K, the length of every truncation when ``schedule`` is ``None``.
        horizon: T, the length of an inner run.
        second_order: differentiate through the gradients fed to the learned optimizer
            (the paper drops ∇²f: ``False``).
        loss_transform: ``"identity"`` or ``"log"``, applied to each loss in the meta-loss.
        seed: the seed of the task and truncation streams (``None``: the run's seed, else 0).
        split: the name of the task stream (``"train"``).
        schedule: a truncation schedule (``learnopt.meta.schedules``) drawing each
            truncation's length.
        activation_checkpointing: recompute each step's intermediates in the backward pass.
        compile_unroll: run the inner steps through ``torch.compile`` (not together with
            ``activation_checkpointing``).
        compile_chunk: the inner steps per compiled region (1: one step per graph).

    References:
        Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent",
        arXiv 1606.04474.
    """

    def __init__(
        self,
        task_family: TaskFamily | None = None,
        num_tasks: int = 128,
        unroll_length: int = 20,
        horizon: int = 100,
        second_order: bool = False,
        loss_transform: Literal["identity", "log"] = "identity",
        seed: int | None = None,
        split: str = "train",
        schedule: TruncationSchedule | None = None,
        activation_checkpointing: bool = False,
        compile_unroll: bool = False,
        compile_chunk: int = 4,
    ) -> None:
        if activation_checkpointing and compile_unroll:
            raise ValueError(f"{type(self).__name__}: activation_checkpointing and compile_unroll do not combine "
                             "(the compiled region would be recomputed eagerly); choose one")
        self._configure(task_family, num_tasks, unroll_length, horizon, loss_transform, seed, split, schedule,
                        compile_unroll, compile_chunk)
        self.second_order = second_order
        self.activation_checkpointing = activation_checkpointing

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> UnrollState:
        """Draw episode ``episode``'s tasks and their initial state (``start_unroll``), from this
        rank's seed stream.

        Args:
            lopt: the learned optimizer (its device is the state's).
            episode: the episode's index in the seed stream.

        Returns:
            The carried state at inner step 0.
        """
        return start_unroll(lopt, self._bound_family(), self.num_tasks, self.split, self.seed, episode, self.rank)

    def step_function(self) -> InnerStep:
        """The inner step the truncations run: ``inner_step``, or ``checkpointed_inner_step``
        with ``activation_checkpointing`` (which takes precedence over ``compile_unroll``).

        Returns:
            A function with ``inner_step``'s signature.
        """
        return checkpointed_inner_step if self.activation_checkpointing else super().step_function()

    def unroll(self, lopt: nn.Module, state: UnrollState) -> tuple[Tensor, UnrollState, dict[str, float]]:
        """Run one truncation (``run_truncation`` with the graph kept).

        Args:
            lopt: the learned optimizer.
            state: the carried inner run (a new episode starts when it reached the horizon).

        Returns:
            The meta-loss (with its graph), the next carried state (detached) and metrics.
        """
        if state.step >= self.horizon:
            state = self.init_unroll(lopt, state.episode + 1)
        k = self.truncation_length(state)
        run = run_truncation(self.step_function(), lopt, state.task, state.params, state.opt_state,
                             state.generator, k, self._transform, keep_graph=True, second_order=self.second_order,
                             chunk_steps=self.chunk_function(), chunk=self.compile_chunk)
        new_state = UnrollState(
            state.task, {n: p.detach() for n, p in run.params.items()}, detach_state(run.opt_state),
            state.step + k, state.episode, state.generator,
        )
        last = run.last_loss.detach()
        metrics = {
            "inner_step": float(new_state.step),
            "inner_loss_first": float(run.first_loss.mean()),
            "inner_loss_last": float(last.mean()),
            "inner_log10_loss_last": float(torch.log10(last.clamp_min(1e-30)).mean()),
        }
        return run.meta_loss, new_state, metrics

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        """Gradient of one truncation's meta-loss with respect to ``lopt``'s parameters.

        Args:
            lopt: the learned optimizer; its parameters that require grad are φ.
            state: the carried state (``None``: ``init_unroll(lopt)``).

        Returns:
            A ``GradientEstimate``; when it is not finite, the gradients are zeros and the next
            state starts a new episode.
        """
        if state is None:
            state = self.init_unroll(lopt)
        names, weights = meta_weights(lopt)
        meta_loss, new_state, metrics = self.unroll(lopt, state)
        grads, finite = guarded_meta_grads(meta_loss, weights)
        if not finite:
            new_state = self.init_unroll(lopt, new_state.episode + 1)
        metrics["nonfinite"] = float(not finite)
        return GradientEstimate(meta_loss.detach(), dict(zip(names, grads)), new_state, metrics, finite)


class FullBPTT(TruncatedBPTT):
    """Exact meta-gradients: backpropagation through the whole inner run of ``horizon`` (T) steps.

    One ``estimate`` unrolls all T steps in a single truncation and differentiates::

        L = (1/T) Σ_{t=1}^{T} mean_instances loss_transform(f(θ_t))

    so nothing is cut and there is no truncation bias; each call starts a new episode. This is
    ``TruncatedBPTT`` with ``unroll_length = horizon`` (Andrychowicz et al. 2016 before
    truncation; learned_optimization's ``FullGrad``). Memory grows linearly in T.

    Args:
        task_family, num_tasks, horizon, second_order, loss_transform, seed, split,
            activation_checkpointing, compile_unroll, compile_chunk: as ``TruncatedBPTT``'s (there is
            no ``unroll_length`` or ``schedule``).
    """

    def __init__(
        self,
        task_family: TaskFamily | None = None,
        num_tasks: int = 128,
        horizon: int = 100,
        second_order: bool = False,
        loss_transform: Literal["identity", "log"] = "identity",
        seed: int | None = None,
        split: str = "train",
        activation_checkpointing: bool = False,
        compile_unroll: bool = False,
        compile_chunk: int = 4,
    ) -> None:
        super().__init__(task_family, num_tasks, horizon, horizon, second_order, loss_transform, seed, split,
                         activation_checkpointing=activation_checkpointing, compile_unroll=compile_unroll,
                         compile_chunk=compile_chunk)
