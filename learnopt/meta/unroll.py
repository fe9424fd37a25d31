"""Inner training loops: one differentiable step, and plain rollouts for evaluation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Params, apply_updates, detach_state
from learnopt.task import Task

DIVERGED_LOG10 = 30.0


def log10_losses(losses: Tensor) -> Tensor:
    """log10 of losses, with non-finite or huge values scored as diverged (+30) rather than
    dropped, and losses below 1e-30 floored there.

    Args:
        losses: losses of any shape.

    Returns:
        Their log10, elementwise, in [-30, 30].
    """
    finite = torch.isfinite(losses) & (losses < 10**DIVERGED_LOG10)
    safe = torch.where(finite, losses, torch.ones_like(losses)).clamp_min(1e-30)
    return torch.where(finite, torch.log10(safe), torch.full_like(losses, DIVERGED_LOG10))


def inner_step(
    tx: GradientTransformation,
    task: Task,
    params: Params,
    opt_state: Any,
    batch: Any = None,
    second_order: bool = False,
) -> tuple[Tensor, Params, Any]:
    """Evaluate the per-instance loss at ``params`` and take one optimizer step.

    Returns ``(loss [num_instances], new_params, new_opt_state)``. With ``second_order=False``
    the gradient fed to the optimizer is a constant (Andrychowicz et al. 2016 drop the second
    derivatives ∇²f); with ``True`` the step is differentiated through the gradient as well.
    The loss keeps its graph, so it can enter a meta-loss.

    Args:
        tx: the optimizer (a learned optimizer or a ``GradientTransformation``).
        task: the tasks being trained.
        params: their parameters, requiring grad.
        opt_state: the optimizer's state for ``params``.
        batch: the minibatch (``None``: the task's own).
        second_order: whether to differentiate through the gradient.

    Returns:
        ``(loss, new_params, new_opt_state)``.
    """
    loss = task.loss(params, batch)
    names = list(params)
    grads = torch.autograd.grad(
        loss.sum(), [params[k] for k in names], create_graph=second_order, retain_graph=True
    )
    # Finite-sum tasks hand their optimizers indices and per-example gradients this way.
    extra = task.extra_args(batch) if hasattr(task, "extra_args") else {}
    updates, opt_state = tx.update(dict(zip(names, grads)), opt_state, params, **extra)
    return loss, apply_updates(params, updates), opt_state


def rollout(
    tx: GradientTransformation,
    task: Task,
    steps: int,
    params: Params | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Train ``task`` for ``steps`` steps with ``tx`` without keeping any graph between steps.

    Returns the per-instance losses ``[steps + 1, num_instances]`` (before each step and after
    the last). The entry after the last step is the loss on the whole training set when the task
    has ``full_loss`` (what validation and evaluation score), else on a minibatch. Non-finite
    losses are kept as they are: a divergent optimizer shows as inf/NaN.

    Args:
        tx: the optimizer.
        task: the tasks to train.
        steps: the number of optimizer steps.
        params: the initial parameters (``None``: ``task.init(generator)``).
        generator: the source of the initialization and the minibatches.

    Returns:
        The detached losses ``[steps + 1, num_instances]``.
    """
    if params is None:
        params = task.init(generator)
    losses = []
    with torch.enable_grad():
        params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        state = tx.init(params)
        for _ in range(steps):
            loss, new_params, state = inner_step(tx, task, params, state, task.sample_batch(generator))
            losses.append(loss.detach())
            params = {k: p.detach().requires_grad_(True) for k, p in new_params.items()}
            state = detach_state(state)
        full_loss = getattr(task, "full_loss", None)
        last = full_loss(params) if full_loss is not None else task.loss(params, task.sample_batch(generator))
        losses.append(last.detach())
    return torch.stack(losses)
