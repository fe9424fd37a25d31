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

``DifferentiableTransformOptimizer._update`` runs the transform functionally, per param group
and per set of parameters the torch optimizer updates together: its state is copied from the
torch optimizer when the loop starts and then replaced (never modified) at every step, and
nothing is detached (a gradient of ``None`` counts as zero here), so the meta-gradient flows
through the gradients, the state, tensor hyperparameters captured by the transform, and the weights of a learned
optimizer (its ``update`` is a method of the ``nn.Module`` that holds them).

Hyperparameters: a meta-learnable one is a tensor that requires grad, passed to the factory
(``lo.adam(lr=t)``) or through ``higher``'s ``override`` of a param-group key (the transform is
rebuilt from the group's values at every step, as in the drop-in). For transforms wrapped in
``inject_hyperparams``, ``override`` sets the injected names in the state; other names are
refused. Extra ``update`` arguments (``loss_fn``, ``hvp_fn``, ...;
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
from learnopt.optim.hyperparams import InjectHyperparamsState, set_hyperparams
from learnopt.optim.torch_optimizer import TransformOptimizer


def _hyperparam_state(state: Any) -> Any:
    """The ``InjectHyperparamsState`` at the top of ``state``, or ``None``."""
    return state if isinstance(state, InjectHyperparamsState) else None


class DifferentiableTransformOptimizer(higher.optim.DifferentiableOptimizer):
    """``higher``'s differentiable counterpart of ``TransformOptimizer`` (see the module docstring).

    Args:
        other: the ``TransformOptimizer`` to copy.
        reference_params, fmodel, device, override, grad_callback, track_higher_grads, **kwargs:
            ``higher.optim.DifferentiableOptimizer``'s.
    Raises:
        TypeError: ``other`` is not a ``TransformOptimizer``.
    """

    def __init__(self, other: TransformOptimizer, reference_params, fmodel=None, device=None, override=None,
                 grad_callback=None, track_higher_grads: bool = True, **kwargs: Any) -> None:
        if not isinstance(other, TransformOptimizer):
            raise TypeError(f"DifferentiableTransformOptimizer wraps a TransformOptimizer, got {type(other).__name__}")
        self.hyperparams = other.hyperparams
        self.separable = other.separable
        self._extra: dict[str, Any] = {}
        # Per group, the runs of parameters updated together: their positions in the group and a
        # copy (not an alias) of their state, cast to ``device`` as higher does for torch.optim.
        self.runs: list[list[tuple[list[int], list[str], Any]]] = []
        for group in other.param_groups:
            position = {id(p): i for i, p in enumerate(group["params"])}
            runs = []
            for params, state in other.transform_states(len(self.runs)):
                copied = tree_map(
                    lambda x: x.detach().clone().to(device) if isinstance(x, Tensor) and device is not None
                    else (x.detach().clone() if isinstance(x, Tensor) else x), state)
                runs.append(([position[id(p)] for p in params.values()], list(params), copied))
            self.runs.append(runs)
        self._overridden: set[str] = set()
        super().__init__(other, reference_params, fmodel=fmodel, device=device, override=override,
                         grad_callback=grad_callback, track_higher_grads=track_higher_grads, **kwargs)
        # higher deep-copies the param groups; a hyperparameter that requires grad (lo.adam(lr=t))
        # must stay the caller's tensor, or its meta-gradient would go to the copy.
        for group, original in zip(self.param_groups, other.param_groups):
            for key in self.hyperparams.paths:
                if key not in (override or {}) and _requires_grad(original[key]):
                    group[key] = original[key]
        self._check_override(override)

    @property
    def tx_states(self) -> list[Any]:
        """The transform states of every run of every group."""
        return [state for runs in self.runs for _, _, state in runs]

    def _check_override(self, override: dict | None) -> None:
        if not override:
            return
        injected = {name for runs in self.runs for _, _, state in runs
                    for name in getattr(_hyperparam_state(state), "hyperparams", {})}
        unknown = set(override) - injected - set(self.hyperparams.paths)
        if unknown:
            raise ValueError(
                f"higher override {sorted(unknown)}: not a hyperparameter of this optimizer's param groups "
                f"({sorted(self.hyperparams.paths)}) nor one injected by inject_hyperparams "
                f"({sorted(injected) or 'none'})"
            )
        self._overridden |= set(override)

    def step(self, loss: Tensor, params=None, override=None, grad_callback=None, **extra: Any):
        """``higher``'s ``step``; keyword ``extra`` arguments reach the transform's ``update``.

        Args:
            loss: the inner loss.
            params: the fast weights (None: the model's).
            override: param-group keys or injected hyperparameters to set, per group.
            grad_callback: ``higher``'s gradient hook.
            **extra: keywords for the transform's ``update``.
        Returns:
            The new fast weights, as ``higher``'s ``step``.
        Raises:
            ValueError: ``override`` names an unknown hyperparameter.
        """
        self._check_override(override)
        self._extra = extra
        try:
            return super().step(loss, params=params, override=override, grad_callback=grad_callback)
        finally:
            self._extra = {}

    def _update(self, grouped_grads, **kwargs: Any) -> None:
        for group, grads, runs in zip(self.param_groups, grouped_grads, self.runs):
            values, tx, _ = self.hyperparams.resolve(group, "higher param group")
            new_params = list(group["params"])
            for i, (positions, names, state) in enumerate(runs):
                params = {n: group["params"][j] for n, j in zip(names, positions)}
                g = {n: torch.zeros_like(params[n]) if grads[j] is None else grads[j] for n, j in zip(names, positions)}
                state, scale = self._injected(state, group, values)
                extra = dict(self._extra)
                if "hvp_fn" not in extra and all(x.requires_grad for x in g.values()):
                    extra["hvp_fn"] = _hvp_through(g, params)
                updates, state = tx.update(g, state, params, **extra)
                if not self._track_higher_grads:
                    # "test mode": no graph may grow across steps through the state either.
                    state = detach_state(state)
                runs[i] = (positions, names, state)
                for n, j in zip(names, positions):
                    u = updates[n].to(params[n].dtype)
                    new_params[j] = params[n] + (u if scale is None else u * scale)
            group["params"] = new_params

    def _injected(self, state: Any, group: dict[str, Any], values: dict[str, Any]) -> tuple[Any, Any]:
        """Overridden hyperparameters that ``inject_hyperparams`` keeps in the state go there; a
        recipe-less transform's ``lr`` multiplies its update unless it was such an override."""
        injected = _hyperparam_state(state)
        names = set() if injected is None else set(injected.hyperparams) & self._overridden
        if names:
            state = set_hyperparams(state, **{k: group[k] for k in names})
        if not self.hyperparams.multiplier or "lr" in names:
            return state, None
        return state, values["lr"]


def _requires_grad(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v) for v in value)
    return isinstance(value, Tensor) and value.requires_grad


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
