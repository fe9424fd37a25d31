"""The truncated-unroll core that truncated BPTT, ES and PES share.

One truncation runs K inner steps from a carried ``(params, opt_state)`` on batches drawn from
the task's data generator, and scores them with the meta-loss of Andrychowicz et al. (2016,
§2) averaged over the truncation::

    L = (1/K) Σ_{t=t0+1}^{t0+K} mean_instances transform(f(θ_t))

where f(θ_t) for t < t0 + K is the loss the step t+1 evaluates (on its own batch) and
f(θ_{t0+K}) is evaluated on one more, fresh batch. The draws from the generator are always
the same (one batch per step, then one for the last loss), so estimators that run the same
truncation see the same data.

Backpropagation estimators keep the graph through all K steps (``keep_graph=True``);
evolution strategies need only the value, so each step is detached from the previous one
and memory does not grow with K (``keep_graph=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from learnopt.optim.base import GradientTransformation, Params, detach_state
from learnopt.task import Task


class InnerStep(Protocol):
    """The signature of ``learnopt.meta.unroll.inner_step`` (and of its drop-in variants such
    as ``checkpointed_inner_step``): one loss evaluation and one optimizer step."""

    def __call__(self, tx: nn.Module | GradientTransformation, task: Task, params: Params, opt_state: Any,
                 batch: Any = None, second_order: bool = False) -> tuple[Tensor, Params, Any]: ...


class ChunkSteps(Protocol):
    """The signature of ``learnopt.meta.compiled.compiled_steps``: ``len(batches)`` inner steps at
    once, returning the stacked per-step losses ``[len(batches), num_instances]``."""

    def __call__(self, tx: nn.Module | GradientTransformation, task: Task, params: Params, opt_state: Any,
                 batches: list[Any], second_order: bool = False) -> tuple[Tensor, Params, Any]: ...


class Truncation(NamedTuple):
    """The outcome of one truncation.

    Attributes:
        meta_loss: the truncation meta-loss L (a scalar; with its graph when ``keep_graph``).
        params: the inner parameters after K steps.
        opt_state: the optimizer state after K steps.
        first_loss: per-instance loss of the first step, detached.
        last_loss: per-instance loss after the last step, on a fresh batch.
    """

    meta_loss: Tensor
    params: Params
    opt_state: Any
    first_loss: Tensor
    last_loss: Tensor


def run_truncation(
    step: InnerStep,
    tx: nn.Module | GradientTransformation,
    task: Task,
    params: Params,
    opt_state: Any,
    generator: torch.Generator,
    k: int,
    transform: Callable[[Tensor], Tensor],
    keep_graph: bool,
    second_order: bool = False,
    chunk_steps: ChunkSteps | None = None,
    chunk: int = 4,
) -> Truncation:
    """Run K inner steps from ``(params, opt_state)`` and return the truncation meta-loss.

    Args:
        step: the inner step, called as ``step(tx, task, params, opt_state, batch,
            second_order=second_order)`` (``inner_step``, ``checkpointed_inner_step``, or any
            function with that signature).
        tx: what the step calls ``update`` on (a learned optimizer or a transformation).
        task: the task instances being trained.
        params: their parameters at the start of the truncation (detached here: the
            truncation's graph starts at ``params``).
        opt_state: the optimizer state at the start (detached here as well).
        generator: the data generator; K + 1 batches are drawn from it.
        k: the number of inner steps K (≥ 1).
        transform: the per-instance meta-loss transform (identity or log).
        keep_graph: keep the graph through all K steps, so that ``meta_loss`` can be
            differentiated with respect to the learned optimizer (truncated BPTT); with
            ``False`` every step is detached from the previous one and the last loss is
            computed without a graph (ES and PES need only values).
        second_order: differentiate through the gradients fed to the optimizer as well
            (only meaningful with ``keep_graph``).
        chunk_steps: runs ``chunk`` consecutive steps at once (``learnopt.meta.compiled.compiled_steps``:
            one compiled region for all of them), called as ``chunk_steps(tx, task, params,
            opt_state, batches, second_order)``; the steps left over when K is not a multiple of
            ``chunk`` run through ``step``. The batches are drawn in the same order either way.
        chunk: the number of steps per ``chunk_steps`` call.

    Returns:
        A ``Truncation`` (meta-loss, parameters and optimizer state after K steps, first and
        last per-instance losses).
    """
    if keep_graph:
        params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        opt_state = detach_state(opt_state)
    first, terms = None, []
    with torch.enable_grad() if keep_graph else nullcontext():
        done = 0
        while done < k:
            n = chunk if chunk_steps is not None and chunk > 1 and k - done >= chunk else 1
            batches = [task.sample_batch(generator) for _ in range(n)]
            if n > 1 and keep_graph:
                rows, params, opt_state = chunk_steps(tx, task, params, opt_state, batches, second_order)
                losses = list(rows.unbind(0))
            elif n > 1:
                with torch.no_grad():
                    rows, params, opt_state = chunk_steps(tx, task, {m: v.detach() for m, v in params.items()},
                                                          detach_state(opt_state), batches, second_order)
                losses = list(rows.unbind(0))
            elif keep_graph:
                loss, params, opt_state = step(tx, task, params, opt_state, batches[0], second_order=second_order)
                losses = [loss]
            else:
                with torch.enable_grad():
                    p = {m: v.detach().requires_grad_(True) for m, v in params.items()}
                    loss, params, opt_state = step(tx, task, p, opt_state, batches[0], second_order=second_order)
                params = {m: v.detach() for m, v in params.items()}
                opt_state = detach_state(opt_state)
                losses = [loss.detach()]
            for loss in losses:
                if done == 0:
                    first = loss.detach()
                else:
                    terms.append(transform(loss).mean())
                done += 1
        with nullcontext() if keep_graph else torch.no_grad():
            last = task.loss(params, task.sample_batch(generator))
        terms.append(transform(last).mean())
        meta_loss = torch.stack(terms).mean()
    return Truncation(meta_loss, params, opt_state, first, last)
