"""The interface every meta-gradient estimator implements, and the record it returns.

An estimator turns a learned optimizer ``lopt`` (an ``nn.Module`` whose parameters are the
meta-parameters φ) and a carried inner run into one estimate of ∂(meta-loss)/∂φ::

    estimator = PES(num_pairs=4, sigma=0.01, horizon=100)   # settings only
    estimator.bind(task_family, seed=0)                # what MetaTrainModule does
    state = estimator.init_unroll(lopt, episode=0)     # tasks, θ_0, optimizer state
    est = estimator.estimate(lopt, state)              # GradientEstimate
    est.meta_loss, est.meta_grads, est.finite, est.metrics
    state = est.unroll_state                           # carried to the next call

This is the shape of ``learned_optimization``'s gradient estimators (Metz et al. 2022,
arXiv 2203.11860, ``outer_trainers/``): truncated BPTT, full BPTT, ES and PES all return the
same record, so the training shell does not care which one runs. An estimator is built from
its own settings alone (so that a config can give it as ``class_path`` + ``init_args``) and is
bound to the task family by ``bind``; ``spec`` gives its class path and settings back, for
checkpoint metadata. ``save_unroll`` /
``restore_unroll`` turn the carried state into plain tensors and back, for resuming.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from learnopt.meta.compiled import compiled_forward_step, compiled_inner_step, compiled_steps
from learnopt.meta.schedules import ConstantSchedule, truncation_length
from learnopt.meta.unroll import inner_step
from learnopt.optim.base import Params, tree_leaves
from learnopt.task import Task, TaskFamily, seeded_generator


@dataclass
class UnrollState:
    """What is carried from one truncation to the next: the tasks being trained, their
    parameters, the learned optimizer's state, and the position in the inner run.

    Attributes:
        task: the sampled tasks (a batch of ``num_tasks`` instances).
        params: their current parameters θ_t, by name.
        opt_state: the learned optimizer's state for ``params``.
        step: the inner step t the next truncation starts at.
        episode: the episode's index in the seed stream.
        generator: the episode's data generator (batches, and any later draws).
    """

    task: Task
    params: Params
    opt_state: Any
    step: int
    episode: int
    generator: torch.Generator


@dataclass
class GradientEstimate:
    """The record every gradient estimator returns.

    Attributes:
        meta_loss: the (transformed) meta-loss the estimate is of.
        meta_grads: ∂(meta-loss)/∂φ by parameter name (zeros when not ``finite``).
        unroll_state: the state to carry to the next estimate.
        metrics: scalars to log.
        finite: whether the meta-loss and every gradient were finite.
    """

    meta_loss: Tensor
    meta_grads: dict[str, Tensor]
    unroll_state: UnrollState
    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True


def is_episodic(family: Any) -> bool:
    """Whether ``family`` is an episode family (``learnopt.meta.episodic``): one scored as a
    whole by ``meta_loss(model, num_episodes, generator)``, with no inner run to truncate.

    Args:
        family: a task family or an episode family.

    Returns:
        True when ``family`` has a callable ``meta_loss``.
    """
    return callable(getattr(family, "meta_loss", None))


_PLAIN = (int, float, str, bool, tuple, list, type(None))
_ABSENT = object()


def init_spec(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of ``obj``, the form a config gives objects in.

    The init args are the constructor's parameters that ``obj`` keeps under their own name as
    plain values (numbers, strings, tuples, None) or as dataclasses, which are described the
    same way (a truncation schedule); derived attributes are left out.

    Args:
        obj: the object to describe.
        skip: constructor parameters to leave out.

    Returns:
        A JSON-able dict, e.g. ``{"class_path": "learnopt.meta.pes.PES", "init_args":
        {"num_pairs": 4, ...}}``.
    """
    cls = type(obj)
    params = inspect.signature(cls.__init__).parameters.values()
    names = [p.name for p in params if p.name != "self" and p.name not in skip
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    init_args = {}
    for name in names:
        value = getattr(obj, name, _ABSENT)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            init_args[name] = init_spec(value)
        elif isinstance(value, _PLAIN):
            init_args[name] = value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def check_count(owner: str, name: str, value: Any, why: str) -> None:
    """Refuse a count that is not an integer ≥ 1, saying what it is for.

    Args:
        owner: who asks (the class name), for the message.
        name: the setting's name.
        value: the value given.
        why: what the count is for, for the message.

    Raises:
        ValueError: ``value`` is a bool, not an int, or < 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r} ({why})")


def task_stream(split: str, seed: int, episode: int, rank: int = 0) -> torch.Generator:
    """The seed stream of episode ``episode``'s tasks: ``(split, seed, episode)`` for rank 0 (and
    a single process, so single-process runs and their checkpoints stay reproducible), and
    ``(split, seed, "rank", rank, episode)`` for the other ranks of a distributed run, so every
    rank trains its own task instances.

    Args:
        split: the task split (``"train"``, ``"valid"``, ...).
        seed: the run's seed.
        episode: the episode's index.
        rank: this process's rank in a distributed run.

    Returns:
        A seeded ``torch.Generator``.
    """
    if rank == 0:
        return seeded_generator(split, seed, episode)
    return seeded_generator(split, seed, "rank", rank, episode)


def start_unroll(
    lopt: nn.Module, task_family: TaskFamily, num_tasks: int, split: str, seed: int, episode: int, rank: int = 0
) -> UnrollState:
    """Sample episode ``episode``'s tasks from the seed stream ``task_stream(split, seed,
    episode, rank)`` and their initial parameters and optimizer state, on ``lopt``'s device.

    Args:
        lopt: the learned optimizer (gives the device and ``init`` of the optimizer state).
        task_family: the family the tasks are sampled from.
        num_tasks: how many task instances to sample.
        split: the task split of the seed stream.
        seed: the run's seed.
        episode: the episode's index.
        rank: this process's rank in a distributed run.

    Returns:
        The ``UnrollState`` at inner step 0.
    """
    generator = task_stream(split, seed, episode, rank)
    task = task_family.sample(num_tasks, generator)
    if hasattr(task, "to"):
        task = task.to(lopt.device)
    params = {k: p.to(lopt.device) for k, p in task.init(generator).items()}
    with torch.no_grad():
        opt_state = lopt.init(params)
    return UnrollState(task, params, opt_state, 0, episode, generator)


def meta_weights(lopt: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the meta-parameters (those that require grad).

    Args:
        lopt: the learned optimizer.

    Returns:
        ``(names, tensors)``, in ``named_parameters`` order.
    """
    named = [(n, p) for n, p in lopt.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def guarded_meta_grads(meta_loss: Tensor, weights: list[Tensor]) -> tuple[list[Tensor], bool]:
    """``∂ meta_loss / ∂ weights`` (zeros for weights the loss does not reach) and whether the
    loss and every gradient are finite; when not, the gradients are all zeros, so a caller can
    skip the update without NaNs reaching the meta-parameters.

    Args:
        meta_loss: the scalar meta-loss.
        weights: the meta-parameters to differentiate by.

    Returns:
        ``(grads, finite)``: one gradient per weight, and whether all were finite.
    """
    finite = bool(torch.isfinite(meta_loss))
    if finite:
        grads = torch.autograd.grad(meta_loss, weights, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
    if not finite:
        grads = [torch.zeros_like(w) for w in weights]
    return grads, finite


def cpu_leaves(tree: Any) -> list[Tensor]:
    """The tensor leaves of a pytree, detached and on the CPU (for saving).

    Args:
        tree: a pytree of tensors (an optimizer state).

    Returns:
        Its leaves, in ``tree_leaves`` order.
    """
    return [x.detach().cpu() for x in tree_leaves(tree)]


def restore_leaves(like: Any, leaves: list[Tensor], device: torch.device) -> Any:
    """The pytree ``like`` with its leaves replaced by ``leaves`` (moved to ``device``).

    Args:
        like: a pytree of the saved structure.
        leaves: the saved leaves, in its flattening order (``cpu_leaves``).
        device: where to put them.

    Returns:
        The rebuilt pytree.
    """
    _, spec = pytree.tree_flatten(like)
    return pytree.tree_unflatten([x.to(device) for x in leaves], spec)


class GradientEstimator:
    """Base of the meta-gradient estimators (``TruncatedBPTT``, ``FullBPTT``, ``ES``, ``PES``).

    Subclasses implement ``init_unroll(lopt, episode)`` and ``estimate(lopt, state)``; a
    subclass whose carried state holds more than ``UnrollState`` extends ``save_unroll`` and
    ``restore_unroll``. ``horizon`` is the length T of an inner run.

    An estimator is constructed from its settings, with or without its task family
    (``TruncatedBPTT(num_tasks=8)`` or ``TruncatedBPTT(family, num_tasks=8)``); ``bind`` gives
    it the family and the run's seed before the first ``init_unroll``.
    """

    horizon: int
    task_family: Any = None
    _own_seed: bool = False
    #: Whether the estimator needs an episode family (``is_episodic``) rather than a task family.
    episodic: bool = False
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

        Args:
            rank: this replica's rank, ``0 <= rank < world_size``.
            world_size: the number of replicas.

        Raises:
            ValueError: the rank or world size is out of range.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}.distribute: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)

    def bind(self, task_family: Any, seed: int | None = None) -> GradientEstimator:
        """Give the estimator the family it meta-trains on and the run's seed.

        Args:
            task_family: a ``TaskFamily`` (truncated-unroll estimators) or an episode family
                (``EpisodicBPTT``, ``EpisodicES``).
            seed: the run's seed; used unless the estimator was constructed with a seed of
                its own.

        Returns:
            The estimator itself.

        Raises:
            ValueError: the family is of the wrong kind for this estimator, or the estimator
                was constructed with another family.
        """
        name = type(self).__name__
        if self.task_family is not None and self.task_family is not task_family:
            raise ValueError(f"{name}: already bound to another task family ({type(self.task_family).__name__}); "
                             "give the family once, to MetaTrainModule (model.task_family)")
        if is_episodic(task_family) != self.episodic:
            family = type(task_family).__name__
            if self.episodic:
                raise TypeError(f"{name} needs an episode family with meta_loss(model, n, generator); got {family}")
            raise ValueError(f"{family} is an episode family: its estimator must be "
                             "learnopt.meta.EpisodicBPTT (backpropagation through whole episodes) or "
                             f"learnopt.meta.EpisodicES, got {name}")
        self.task_family = task_family
        if seed is not None and not self._own_seed:
            self.seed = int(seed)
        return self

    def _bound_family(self) -> Any:
        if self.task_family is None:
            raise ValueError(f"{type(self).__name__}: no task family; pass one to the constructor or call "
                             "bind(task_family) (MetaTrainModule does)")
        return self.task_family

    def spec(self) -> dict[str, Any]:
        """The estimator's class path and settings (``init_spec``), for checkpoint metadata.

        Returns:
            ``{"class_path": ..., "init_args": {...}}``, JSON-able, with the seed in use.
        """
        return init_spec(self, skip=("task_family",))

    def _set_seed(self, seed: int | None) -> None:
        self._own_seed = seed is not None
        self.seed = 0 if seed is None else int(seed)

    def _configure(self, task_family: TaskFamily | None, num_tasks: int, unroll_length: int, horizon: int,
                   loss_transform: str, seed: int | None, split: str, schedule: Any,
                   compile_unroll: bool = False, compile_chunk: int = 4) -> None:
        """Validate and store the settings every truncated-unroll estimator shares."""
        name = type(self).__name__
        check_count(name, "compile_chunk", compile_chunk, "the inner steps compiled as one region")
        self.compile_unroll = bool(compile_unroll)
        self.compile_chunk = int(compile_chunk)
        check_count(name, "num_tasks", num_tasks, "each meta-step estimates on num_tasks task instances")
        if unroll_length < 1 or horizon < 1:
            raise ValueError(f"{name}: unroll_length and horizon must be >= 1")
        if loss_transform not in ("identity", "log"):
            raise ValueError(f"{name}: loss_transform must be 'identity' or 'log', got {loss_transform!r}")
        self.task_family = None
        self.num_tasks = num_tasks
        self.unroll_length = unroll_length
        self.horizon = horizon
        self.loss_transform = loss_transform
        self._set_seed(seed)
        self.split = split
        self.schedule = ConstantSchedule(unroll_length) if schedule is None else schedule
        if task_family is not None:
            self.bind(task_family)

    # Whether the truncations need only values (ES, PES): the compiled path then builds no graph.
    forward_only = False
    # Estimators that run truncations set these in _configure; the episodic ones keep the defaults.
    compile_unroll = False
    compile_chunk = 1

    def step_function(self) -> Callable[..., tuple[Tensor, Params, Any]]:
        """The inner step the truncations run (``run_truncation``'s ``step``): ``inner_step``, or
        with ``compile_unroll`` its compiled twin (``learnopt.meta.compiled``); an estimator may
        plug in another function of the same signature.

        Returns:
            A function ``(tx, task, params, opt_state, batch, second_order) -> (loss, params, opt_state)``.
        """
        if self.compile_unroll:
            return compiled_forward_step if self.forward_only else compiled_inner_step
        return inner_step

    def chunk_function(self) -> Callable[..., tuple[Tensor, Params, Any]] | None:
        """With ``compile_unroll``, ``compiled_steps``: ``compile_chunk`` inner steps as one
        compiled region (``run_truncation``'s ``chunk_steps``); else ``None``.

        Returns:
            ``compiled_steps`` or ``None``.
        """
        return compiled_steps if self.compile_unroll and self.compile_chunk > 1 else None

    def truncation_length(self, state: UnrollState) -> int:
        """Length of the truncation that starts at ``state.step`` (clipped to the horizon).

        Args:
            state: the carried state.

        Returns:
            The number of inner steps to run, drawn from the schedule (≥ 1 before the horizon).
        """
        return truncation_length(self.schedule, state.step, self.horizon, self.split, self.seed, state.episode)

    def _transform(self, loss: Tensor) -> Tensor:
        """The meta-loss transform: ``log`` weighs late, small losses like early ones."""
        if self.loss_transform == "log":
            return torch.log(loss + 1e-12)
        return loss

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> UnrollState:
        """Start episode ``episode``: draw its tasks and their initial state.

        Args:
            lopt: the learned optimizer (its device is the state's).
            episode: the episode's index in the seed stream.

        Returns:
            The carried state at inner step 0.
        """
        raise NotImplementedError

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        """One meta-gradient estimate, continuing ``state``.

        Args:
            lopt: the learned optimizer; its parameters that require grad are φ.
            state: the carried state (``None``: ``init_unroll(lopt)``).

        Returns:
            A ``GradientEstimate``: meta-loss, ∂L/∂φ by parameter name, the next carried state,
            metrics, and whether the estimate is finite (zero gradients when not).
        """
        raise NotImplementedError

    def save_unroll(self, state: UnrollState) -> dict[str, Any]:
        """The carried state as CPU tensors and plain values (the tasks are not saved: they are
        re-drawn from their seed stream).

        Args:
            state: the carried state.

        Returns:
            A dict of the episode, step, parameters, optimizer-state leaves and generator state.
        """
        return {
            "episode": state.episode,
            "step": state.step,
            "params": {k: v.detach().cpu() for k, v in state.params.items()},
            "opt_state": cpu_leaves(state.opt_state),
            "generator": state.generator.get_state(),
        }

    def restore_unroll(self, lopt: nn.Module, saved: dict[str, Any]) -> UnrollState:
        """Inverse of ``save_unroll``: re-draws the episode's tasks, then puts back the saved
        parameters, optimizer state and data-generator state.

        Args:
            lopt: the learned optimizer (its device is the state's).
            saved: what ``save_unroll`` returned.

        Returns:
            The carried state, as it was saved.
        """
        fresh = self.init_unroll(lopt, episode=saved["episode"])
        device = lopt.device
        fresh.generator.set_state(saved["generator"])
        fresh.params = {k: v.to(device) for k, v in saved["params"].items()}
        fresh.opt_state = restore_leaves(fresh.opt_state, saved["opt_state"], device)
        fresh.step = saved["step"]
        return fresh
