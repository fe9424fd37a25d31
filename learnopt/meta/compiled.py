"""The inner step of meta-training — task loss, gradient, learned update — as one compiled region.

``inner_step`` (``learnopt.meta.unroll``) runs a few dozen small tensor operations per inner
step, each paying Python and dispatch overhead, and takes the task gradient with
``torch.autograd.grad``, which ``torch.compile`` cannot trace (a graph break). Here the same
step is written for the compiler: the per-instance loss and its gradient come from
``torch.func.grad`` (which dynamo traces), the gradient is detached for first-order
meta-gradients, and the learned update follows, so loss, gradient and update are one graph. For
truncated BPTT the meta-backward runs through AOTAutograd's compiled backward; ES and PES,
which run the learned optimizer under ``torch.func.functional_call`` with perturbed weights,
get the same graph, because the weights are graph inputs (guarded on shape and dtype, not
on their values)::

    step = compiled_inner_step                      # drop-in for inner_step
    loss, params, opt_state = step(lopt, task, params, opt_state, batch, second_order)
    step = compiled_forward_step                    # the same, values only (ES, PES)

    losses, params, opt_state = compiled_steps(lopt, task, params, opt_state, batches)

``compiled_steps`` compiles several consecutive steps as one region (one graph for
``len(batches)`` steps): less overhead per step, a compile time that grows with the number of
steps (``docs/benchmarks``, section 7, measures both).

Compiled graphs are cached by ``torch.compile`` per (optimizer class, task class, parameter
names, shapes, dtypes and device, ``second_order``, number of steps, backend) — each such key
gets its own code object, hence its own cache of graphs, so keys do not use up each other's
recompile limit — and within a key by dynamo's guards (the task's tensors, the optimizer's
weights and state, which inputs require grad; the weights are graph inputs, not constants).
A truncation therefore compiles at most twice (its first step, whose carried state does not
require grad, and the others) and never again as the unroll advances: step counters are
tensors in the optimizer state, not Python integers. ``compile_report()`` gives the graphs compiled and the seconds
spent per key.

The step is compiled with ``fullgraph=True``: a graph break is an error, not a silent split.
Where compilation fails (no C++ compiler for inductor on the CPU, a graph break, more graphs
than dynamo's recompile limit) the key falls back to the eager ``inner_step`` with a
``RuntimeWarning``, so meta-training still runs, at eager speed.
"""

from __future__ import annotations

import math
import shutil
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learnopt.meta.unroll import inner_step
from learnopt.optim.base import GradientTransformation, Params, apply_updates, detach_state
from learnopt.task import Task

__all__ = ["CompileRecord", "compile_report", "compiled_forward_step", "compiled_inner_step", "compiled_steps",
           "compiler_available", "reset_compiled"]


def functional_step(tx: GradientTransformation, task: Task, params: Params, opt_state: Any, batch: Any = None,
                    second_order: bool = False) -> tuple[Tensor, Params, Any]:
    """``inner_step`` written without ``torch.autograd.grad``, so that ``torch.compile`` traces it
    whole: the gradient of the summed per-instance loss by ``torch.func.grad``. Same arguments,
    returns and derivatives as ``inner_step`` (the loss keeps its graph to ``params``; with
    ``second_order=False`` the gradient is a constant)."""

    def total(p: Params) -> tuple[Tensor, Tensor]:
        loss = task.loss(p, batch)
        return loss.sum(), loss

    grads, loss = torch.func.grad(total, has_aux=True)(params)
    if not second_order:
        grads = {k: g.detach() for k, g in grads.items()}
    extra = task.extra_args(batch) if hasattr(task, "extra_args") else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return loss, apply_updates(params, updates), opt_state


def functional_steps(tx: GradientTransformation, task: Task, params: Params, opt_state: Any,
                     batches: Sequence[Any], second_order: bool = False) -> tuple[Tensor, Params, Any]:
    """``len(batches)`` consecutive ``functional_step``s; returns the stacked losses
    ``[len(batches), num_instances]`` (loss ``i`` at the parameters before step ``i``), the
    parameters and the optimizer state after the last step."""
    losses = []
    for batch in batches:
        loss, params, opt_state = functional_step(tx, task, params, opt_state, batch, second_order)
        losses.append(loss)
    return torch.stack(losses), params, opt_state


@dataclass
class CompileRecord:
    """One cache key's compiled function, the graphs compiled for it so far, the seconds those
    calls took (compilation and their first run), and whether it fell back to eager.

    Attributes:
        fn: the compiled function.
        graphs: the graphs compiled for the key so far.
        seconds: the seconds those compiling calls took.
        eager: whether the key fell back to the eager step.
    """

    fn: Callable[..., Any]
    graphs: int = 0
    seconds: float = 0.0
    eager: bool = False


_CACHE: dict[tuple, CompileRecord] = {}

# torch.compile's backend: "inductor" generates fused kernels (C++ on the CPU); "aot_eager" traces
# the same graphs and runs them op by op (no C++ compiler needed, seconds to compile; for tests).
BACKEND = "inductor"
# torch.compile's mode: None (the default), or e.g. "max-autotune-no-cudagraphs" (inductor's own
# GEMM kernels where they time faster; compiles for much longer).
MODE: str | None = None


def compiler_available() -> bool:
    """Whether inductor can build CPU kernels here: it needs a C++ compiler (``torch._inductor``'s
    configured ``cpp.cxx``, else ``g++``/``clang++`` on the ``PATH``).

    Returns:
        True when one of those compilers is found.
    """
    from torch._inductor import config as inductor_config

    configured = inductor_config.cpp.cxx
    names = [c for c in (configured if isinstance(configured, tuple) else (configured,)) if c]
    return any(shutil.which(c) for c in [*names, "g++", "clang++", "c++"])


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object: dynamo keeps its graphs and its recompile
    count per code object, so each cache key gets its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _key(tx: Any, task: Task, params: Params, second_order: bool, steps: int | None) -> tuple:
    shapes = tuple((k, tuple(p.shape), p.dtype, p.device) for k, p in params.items())
    return (type(tx).__module__, type(tx).__qualname__, type(task).__module__, type(task).__qualname__,
            bool(second_order), steps, BACKEND, shapes, MODE)


def _record(key: tuple, body: Callable[..., Any], device: torch.device) -> CompileRecord:
    record = _CACHE.get(key)
    if record is None:
        record = CompileRecord(torch.compile(_own_code(body), backend=BACKEND, mode=MODE, dynamic=False,
                                             fullgraph=True))
        if BACKEND == "inductor" and device.type == "cpu" and not compiler_available():
            warnings.warn("learnopt.meta.compiled: no C++ compiler found for torch.compile's CPU backend; "
                          "running the eager inner step instead", RuntimeWarning, stacklevel=3)
            record.eager = True
        _CACHE[key] = record
    return record


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _call(record: CompileRecord, key: tuple, fallback: Callable[[], Any], *args: Any) -> Any:
    """Run ``record.fn(*args)``, booking any compilation it triggers; on a compile failure warn
    once, mark the key eager and return ``fallback()``."""
    if record.eager:
        return fallback()
    before = _graphs()
    start = time.perf_counter()
    try:
        out = record.fn(*args)
    except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
        # a graph break, a backend failure, more graphs than dynamo's recompile limit
        warnings.warn(f"learnopt.meta.compiled: compiling the inner step for {key} failed ({error}); "
                      "running it eagerly", RuntimeWarning, stacklevel=3)
        record.eager = True
        return fallback()
    compiled = _graphs() - before
    if compiled:
        record.graphs += compiled
        record.seconds += time.perf_counter() - start
    return out


def _eager_step(tx: GradientTransformation, task: Task, params: Params, opt_state: Any, batch: Any,
                second_order: bool) -> tuple[Tensor, Params, Any]:
    """The fallback: ``inner_step``, also for a forward-only caller whose parameters do not require
    grad (which the compiled step allows and ``torch.autograd.grad`` does not); the results of such
    a call are detached."""
    if torch.is_grad_enabled() and all(p.requires_grad for p in params.values()):
        return inner_step(tx, task, params, opt_state, batch, second_order)
    with torch.enable_grad():
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        loss, new_params, new_state = inner_step(tx, task, leaves, opt_state, batch, second_order)
    return loss.detach(), {k: p.detach() for k, p in new_params.items()}, detach_state(new_state)


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device


def compiled_inner_step(
    tx: GradientTransformation,
    task: Task,
    params: Params,
    opt_state: Any,
    batch: Any = None,
    second_order: bool = False,
) -> tuple[Tensor, Params, Any]:
    """``inner_step`` as one compiled region (``torch.compile`` of ``functional_step``): a drop-in
    with the same signature, values and derivatives.

    Args:
        tx: the optimizer (a learned optimizer ``nn.Module`` or a ``GradientTransformation``);
            pass the same object every step, as a new one is a new graph.
        task: the task (``loss(params, batch) -> [num_instances]``).
        params: the parameters, ``dict[str, Tensor]``.
        opt_state: ``tx``'s state.
        batch: the step's batch (``None`` for tasks without data).
        second_order: differentiate through the task gradient too (else it is a constant).

    Returns:
        ``(loss [num_instances], new_params, new_opt_state)``; the loss keeps its graph.

    A forward-only caller (ES, PES) may pass parameters that do not require grad and call it
    under ``torch.no_grad()``: the task gradient comes from ``torch.func.grad``, so the step then
    builds no autograd graph at all (an inference graph, cheaper than ``inner_step``'s).
    """
    key = _key(tx, task, params, second_order, None)
    record = _record(key, functional_step, _device(params))
    return _call(record, key, lambda: _eager_step(tx, task, params, opt_state, batch, second_order),
                 tx, task, params, opt_state, batch, second_order)


def compiled_forward_step(
    tx: GradientTransformation,
    task: Task,
    params: Params,
    opt_state: Any,
    batch: Any = None,
    second_order: bool = False,
) -> tuple[Tensor, Params, Any]:
    """``compiled_inner_step`` for a caller that needs values only (the forward truncations of
    ES and PES): the same signature, run under ``torch.no_grad`` on detached inputs, so the
    compiled graph is an inference graph with no autograd bookkeeping.

    Args:
        tx, task, params, opt_state, batch, second_order: as ``compiled_inner_step``.

    Returns:
        ``(loss [num_instances], new_params, new_opt_state)``, all detached.
    """
    with torch.no_grad():
        return compiled_inner_step(tx, task, {k: p.detach() for k, p in params.items()}, detach_state(opt_state),
                                   batch, second_order)


def compiled_steps(
    tx: GradientTransformation,
    task: Task,
    params: Params,
    opt_state: Any,
    batches: Sequence[Any],
    second_order: bool = False,
) -> tuple[Tensor, Params, Any]:
    """``len(batches)`` consecutive inner steps compiled as one region (one graph, and for BPTT
    one compiled backward, for all of them).

    Args:
        tx, task, params, opt_state, second_order: as ``compiled_inner_step``.
        batches: one batch per step, in order (``[None] * k`` for tasks without data). Each
            distinct ``len(batches)`` is a separate graph, compiled on first use.

    Returns:
        ``(losses [len(batches), num_instances], new_params, new_opt_state)``: row ``i`` is the
        loss before step ``i``, with its graph, as ``inner_step`` returns it.
    """
    batches = list(batches)
    key = _key(tx, task, params, second_order, len(batches))
    record = _record(key, functional_steps, _device(params))

    def eager() -> tuple[Tensor, Params, Any]:
        p, s, losses = params, opt_state, []
        for batch in batches:
            loss, p, s = _eager_step(tx, task, p, s, batch, second_order)
            losses.append(loss)
        return torch.stack(losses), p, s

    return _call(record, key, eager, tx, task, params, opt_state, batches, second_order)


def compile_report() -> dict[str, dict[str, Any]]:
    """Per cache key (``"<optimizer>/<task>/<n> coordinates/<first|second>-order/<steps or
    'step'>/<backend>"``): the graphs compiled, the seconds they took (compilation plus first
    run) and whether the key runs eagerly.

    Returns:
        ``{key name: {"graphs": int, "compile_seconds": float, "eager": bool}}``.
    """
    report = {}
    for key, record in _CACHE.items():
        coordinates = sum(math.prod(shape) for _, shape, _, _ in key[7])
        name = (f"{key[1]}/{key[3]}/{coordinates} coordinates/{'second' if key[4] else 'first'}-order/"
                f"{key[5] or 'step'}/{key[6]}" + (f"/{key[8]}" if key[8] else ""))
        report[name] = {"graphs": record.graphs, "compile_seconds": record.seconds, "eager": record.eager}
    return report


def reset_compiled() -> None:
    """Forget every compiled graph (``torch._dynamo.reset``) and this module's cache."""
    _CACHE.clear()
    torch._dynamo.reset()
