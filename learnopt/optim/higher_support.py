"""learnopt's torch optimizers inside ``higher``'s differentiable inner loops.

Importing this module registers ``TransformOptimizer`` (what ``lo.as_torch_optimizer`` and
``learnopt.load_optimizer`` return) with ``higher`` (Grefenstette et al. 2019, arXiv
1910.01727). ``import learnopt.optim`` does so too whenever ``higher`` is installed, so::

    opt = lo.as_torch_optimizer(lo.adam(lr=lr), model.parameters())   # lr may be a tensor
    # or: opt = learnopt.load_optimizer("checkpoints/lstm_quadratic.pt", model.parameters())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss = loss_fn(fmodel(xq), yq)
    meta_loss.backward()   # reaches the model's initial weights, a tensor lr, a learned optimizer's weights

``DifferentiableTransformOptimizer._update`` runs the transform functionally: its state is
copied from the torch optimizer when the loop starts and then replaced (never modified) at
every step, and nothing is detached, so the meta-gradient flows through the gradients, the
state, tensor hyperparameters captured by the transform, and the weights of a learned
optimizer (its ``update`` is a method of the ``nn.Module`` that holds them).

Hyperparameters: learnopt transforms take them when built, so a meta-learnable one is a
tensor that requires grad passed to the factory. ``higher``'s ``override`` works for
transforms wrapped in ``inject_hyperparams`` (the names it injected); other transforms have
nothing to override and refuse it. Extra ``update`` arguments (``loss_fn``, ``hvp_fn``, ...;
``learnopt.optim.extra``) can be passed as keywords of ``diffopt.step(loss, **extra)``; when
the gradients carry a graph (``track_higher_grads=True``) and no ``hvp_fn`` is given, one
built by double backward through those gradients is passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import higher
import higher.optim
import torch
from torch import Tensor

from learnopt.optim.base import detach_state, tree_map
from learnopt.optim.torch_optimizer import TransformOptimizer


def _hyperparam_state(state: Any) -> Any:
    """The ``InjectHyperparamsState`` at the top of ``state``, or ``None``."""
    try:
        from learnopt.optim.hyperparams import InjectHyperparamsState
    except ImportError:
        return None
    return state if isinstance(state, InjectHyperparamsState) else None


class DifferentiableTransformOptimizer(higher.optim.DifferentiableOptimizer):
    """``higher``'s differentiable counterpart of ``TransformOptimizer`` (see the module docstring)."""

    def __init__(self, other: TransformOptimizer, reference_params, fmodel=None, device=None, override=None,
                 grad_callback=None, track_higher_grads: bool = True, **kwargs: Any) -> None:
        if not isinstance(other, TransformOptimizer):
            raise TypeError(f"DifferentiableTransformOptimizer wraps a TransformOptimizer, got {type(other).__name__}")
        self.tx = other.tx
        self._names = list(other._names)
        self._extra: dict[str, Any] = {}
        # Copy (not alias) the state: the torch optimizer keeps its own, and casting to ``device``
        # mirrors what higher does for torch.optim states.
        self.tx_state = tree_map(
            lambda x: x.detach().clone().to(device) if isinstance(x, Tensor) and device is not None
            else (x.detach().clone() if isinstance(x, Tensor) else x),
            other.tx_state,
        )
        self._hyper_keys = set(other.param_groups[0]) - {"params"}
        super().__init__(other, reference_params, fmodel=fmodel, device=device, override=override,
                         grad_callback=grad_callback, track_higher_grads=track_higher_grads, **kwargs)
        self._check_override(override)

    def _check_override(self, override: dict | None) -> None:
        if not override:
            return
        injected = _hyperparam_state(self.tx_state)
        names = set() if injected is None else set(injected.hyperparams)
        unknown = set(override) - names - self._hyper_keys
        if unknown:
            raise ValueError(
                f"higher override {sorted(unknown)}: a learnopt transform takes its hyperparameters when it is "
                "built; pass a tensor that requires grad to the factory (e.g. lo.adam(lr=lr_tensor)), or wrap "
                f"the factory in inject_hyperparams to override injected ones (here: {sorted(names) or 'none'})"
            )

    def step(self, loss: Tensor, params=None, override=None, grad_callback=None, **extra: Any):
        """``higher``'s ``step``; keyword ``extra`` arguments reach the transform's ``update``."""
        self._check_override(override)
        self._extra = extra
        try:
            return super().step(loss, params=params, override=override, grad_callback=grad_callback)
        finally:
            self._extra = {}

    def _update(self, grouped_grads, **kwargs: Any) -> None:
        group = self.param_groups[0]
        params = dict(zip(self._names, group["params"]))
        grads = {
            n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grouped_grads[0])
        }
        state = self.tx_state
        injected = _hyperparam_state(state)
        overrides = {k: v for k, v in group.items() if k != "params" and k not in self._hyper_keys}
        if overrides and injected is not None:
            from learnopt.optim.hyperparams import set_hyperparams

            state = set_hyperparams(state, **overrides)
        extra = dict(self._extra)
        if "hvp_fn" not in extra and all(g.requires_grad for g in grads.values()):
            extra["hvp_fn"] = _hvp_through(grads, params)
        updates, state = self.tx.update(grads, state, params, **extra)
        if not self._track_higher_grads:
            # "test mode": no graph may grow across steps through the state either.
            state = detach_state(state)
        self.tx_state = state
        group["params"] = [p + updates[n].to(p.dtype) for n, p in params.items()]


def _hvp_through(grads: dict[str, Tensor], params: dict[str, Tensor]) -> Callable[[dict], dict]:
    """H v by differentiating ``<grads, v>`` once more (grads were built with ``create_graph``)."""
    names = list(params)

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        dot = sum((grads[k] * v[k]).sum() for k in names)
        hv = torch.autograd.grad(dot, [params[k] for k in names], create_graph=True, retain_graph=True,
                                 allow_unused=True)
        return {k: torch.zeros_like(params[k]) if h is None else h for k, h in zip(names, hv)}

    return hvp


higher.register_optim(TransformOptimizer, DifferentiableTransformOptimizer)

__all__ = ["DifferentiableTransformOptimizer"]
