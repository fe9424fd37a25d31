"""Meta-gradients by truncated backpropagation through time (Andrychowicz et al. 2016, §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from learnopt.meta.unroll import inner_step
from learnopt.optim.base import Params, detach_state
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


class TruncatedBPTT:
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
    """

    def __init__(
        self,
        task_family: TaskFamily,
        num_tasks: int = 128,
        unroll_length: int = 20,
        horizon: int = 100,
        second_order: bool = False,
        loss_transform: Literal["identity", "log"] = "identity",
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if unroll_length < 1 or horizon < 1:
            raise ValueError("TruncatedBPTT: unroll_length and horizon must be >= 1")
        if loss_transform not in ("identity", "log"):
            raise ValueError(f"TruncatedBPTT: loss_transform must be 'identity' or 'log', got {loss_transform!r}")
        self.task_family = task_family
        self.num_tasks = num_tasks
        self.unroll_length = unroll_length
        self.horizon = horizon
        self.second_order = second_order
        self.loss_transform = loss_transform
        self.seed = seed
        self.split = split

    def init_unroll(self, lopt: nn.Module, episode: int = 0) -> UnrollState:
        generator = seeded_generator(self.split, self.seed, episode)
        task = self.task_family.sample(self.num_tasks, generator)
        if hasattr(task, "to"):
            task = task.to(lopt.device)
        params = {k: p.to(lopt.device) for k, p in task.init(generator).items()}
        with torch.no_grad():
            opt_state = lopt.init(params)
        return UnrollState(task, params, opt_state, 0, episode, generator)

    def _transform(self, loss: Tensor) -> Tensor:
        if self.loss_transform == "log":
            return torch.log(loss + 1e-12)
        return loss

    def unroll(self, lopt: nn.Module, state: UnrollState) -> tuple[Tensor, UnrollState, dict[str, float]]:
        """Run one truncation; returns the meta-loss (with its graph), the next carried state
        (detached) and metrics."""
        if state.step >= self.horizon:
            state = self.init_unroll(lopt, state.episode + 1)
        k = min(self.unroll_length, self.horizon - state.step)
        params = {name: p.detach().requires_grad_(True) for name, p in state.params.items()}
        opt_state = detach_state(state.opt_state)
        terms = []
        with torch.enable_grad():
            first_loss = None
            for i in range(k):
                batch = state.task.sample_batch(state.generator)
                loss, params, opt_state = inner_step(
                    lopt, state.task, params, opt_state, batch, second_order=self.second_order
                )
                if i == 0:
                    first_loss = loss.detach()
                else:
                    terms.append(self._transform(loss).mean())
            last = state.task.loss(params, state.task.sample_batch(state.generator))
            terms.append(self._transform(last).mean())
            meta_loss = torch.stack(terms).mean()
        new_state = UnrollState(
            state.task, {n: p.detach() for n, p in params.items()}, detach_state(opt_state),
            state.step + k, state.episode, state.generator,
        )
        metrics = {
            "inner_step": float(new_state.step),
            "inner_loss_first": float(first_loss.mean()),
            "inner_loss_last": float(last.detach().mean()),
            "inner_log10_loss_last": float(torch.log10(last.detach().clamp_min(1e-30)).mean()),
        }
        return meta_loss, new_state, metrics

    def estimate(self, lopt: nn.Module, state: UnrollState | None = None) -> GradientEstimate:
        """Gradient of one truncation's meta-loss with respect to ``lopt``'s parameters."""
        if state is None:
            state = self.init_unroll(lopt)
        names = [n for n, p in lopt.named_parameters() if p.requires_grad]
        weights = [p for n, p in lopt.named_parameters() if p.requires_grad]
        meta_loss, new_state, metrics = self.unroll(lopt, state)
        finite = bool(torch.isfinite(meta_loss))
        grads = None
        if finite:
            grads = torch.autograd.grad(meta_loss, weights, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            grads = [torch.zeros_like(w) for w in weights]
            new_state = self.init_unroll(lopt, new_state.episode + 1)
        metrics["nonfinite"] = float(not finite)
        return GradientEstimate(meta_loss.detach(), dict(zip(names, grads)), new_state, metrics, finite)
