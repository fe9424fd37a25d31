"""``as_torch_optimizer``: any ``GradientTransformation`` as a drop-in ``torch.optim.Optimizer``.

``step(closure=None, **extra)`` supplies the extra ``update`` arguments that a torch training loop
can provide (``learnopt.optim.extra``):

* ``value_and_grad_fn`` when a ``closure`` is given: it copies trial parameters in, calls the
  closure (which zeroes the gradients, computes the loss and calls ``backward``), reads ``.grad``
  and restores the parameters, as ``torch.optim.LBFGS`` evaluates its line search; the first
  evaluation is ``step``'s own closure call, whose loss ``step`` returns.
* ``hvp_fn`` when the gradients carry a graph, i.e. ``loss.backward(create_graph=True)`` was used
  (as ``pytorch_optimizer.AdaHessian`` requires): ``H v`` by differentiating ``<grad, v>``.
* any other keyword (``indices``, ``probes``, ...) is passed through; an explicit
  ``value_and_grad_fn`` / ``hvp_fn`` / ``loss_fn`` overrides the built ones.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation
from learnopt.optim import foreach_more, foreach_torch  # noqa: F401 (importing them registers the kernels)
from learnopt.optim.foreach import kernel_for
from learnopt.optim.group_hyperparams import GroupHyperparameters, Resolved
from learnopt.optim.param_state import (
    check_splittable, gather, same_state, scatter, shared_keys, split_parameter_state, unaliased)


class TransformOptimizer(torch.optim.Optimizer):
    """Runs ``tx`` on ordinary ``nn.Parameter``s as a ``torch.optim.Optimizer``, updating them in
    place after ``backward()``, with torch.optim's contract:

    * ``param_groups[i]`` shows the transform's hyperparameters under torch.optim's names with the
      values ``tx`` was built with as defaults (``learnopt.optim.group_hyperparams``); they are read
      at every step, so schedulers, ``LearningRateMonitor`` and writing ``group["lr"]`` work. A
      transform without a recipe (a learned optimizer) shows ``lr``, a multiplier of its update.
    * A parameter whose ``.grad`` is ``None`` is skipped (not moved, state untouched). Parameters
      updated together share their step count and one call of ``tx``; a skipped one keeps its own.
    * ``state[p]``: the parameter's state (``learnopt.optim.param_state``), made when the
      parameter is added, or at its first gradient if it did not require grad then.
      ``state_dict()`` has torch's layout and loads by position into an optimizer over a fresh
      copy of the model; a state of another shape is refused, naming the parameter and key.
    * ``step(closure=None, **extra)`` serves transforms that need more than the gradient (module docstring).

    Args:
        tx: the transform.
        params: tensors, ``(name, tensor)`` pairs (``named_parameters()``) or param group dicts;
            ``tx`` sees a dict keyed by the names (``"0"``, ``"1"``, ... for bare tensors).
        check_finite: a NaN or infinite gradient raises ``FloatingPointError`` naming the
            parameter, and a sparse gradient a ``RuntimeError``, before anything changes.
        inplace_update: ``f(grads, state, params) -> updates`` that overwrites the state in place
            (a learned optimizer's fast path), used for steps with no extra ``update`` arguments.
        separable: ``tx`` treats each tensor on its own (the coordinate-wise LSTM) and may run one at
            a time; needed for a state not keyed by parameter name.
        foreach: unless False, steps with no extra arguments run the catalogue factory's
            multi-tensor kernel where one exists (``learnopt.optim.foreach``); False: ``tx.update``.
    """

    def __init__(
        self,
        tx: GradientTransformation,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        *,
        check_finite: bool = True,
        inplace_update: Callable[..., dict[str, Tensor]] | None = None,
        separable: bool = False,
        foreach: bool | None = None,
    ) -> None:
        self.tx = tx
        self.hyperparams = GroupHyperparameters(tx)
        self.check_finite = check_finite
        self.inplace_update = inplace_update
        self.separable = separable
        self.foreach = foreach
        self._names: dict[Tensor, str] = {}
        self._skeletons: dict[Tensor, Any] = {}
        self._cohort: dict[Tensor, int] = {}
        self._next_cohort = 0
        self._layout: dict[int, tuple] = {}  # id(group) -> structure_key of its states
        super().__init__(params, dict(self.hyperparams.defaults))

    # -- param groups ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim's ``add_param_group``): its options are checked against the
        transform's hyperparameters, and its parameters get a fresh state."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        where = f"param group {len(self.param_groups)}"
        if "params" not in param_group:
            raise ValueError(f"{where} has no 'params'")
        items = param_group["params"]
        if isinstance(items, Tensor):
            items = [items]
        elif isinstance(items, set):
            raise TypeError(f"{where}: parameters must be an ordered collection (a list), not a set")
        items = param_group["params"] = list(items)
        if not items:
            raise ValueError(f"{where} has no parameters")
        pairs = [(str(item[0]), item[1]) if isinstance(item, tuple) else (None, item) for item in items]
        self._check_new_params(pairs, where)
        self.hyperparams.check(param_group, where, new=True)
        start = len(self._names)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, (name, p) in enumerate(pairs):
            self._names[p] = name if name is not None else str(start + i)
        self._init_states([p for _, p in pairs if p.requires_grad], group, where)

    def _check_new_params(self, pairs: list[tuple[str | None, Any]], where: str) -> None:
        seen: set[int] = set()
        taken = set(self._names.values())
        for i, (name, p) in enumerate(pairs):
            label = repr(name) if name is not None else f"#{i}"
            if not isinstance(p, Tensor):
                raise TypeError(f"{where}: parameter {label} is a {type(p).__name__}, not a Tensor")
            if id(p) in seen:
                raise ValueError(f"{where}: parameter {label} appears twice in the group")
            if p in self._names:
                raise ValueError(f"{where}: parameter {label} is already in another param group "
                                 f"(as {self._names[p]!r})")
            if name is not None and name in taken:
                raise ValueError(f"{where}: a parameter named {name!r} is already in another param group")
            seen.add(id(p))

    @torch.no_grad()
    def _init_states(self, params: list[Tensor], group: dict[str, Any], where: str, check: bool = True) -> None:
        """Fresh per-parameter states for ``params``, one cohort; with ``check``, first that the
        transform's state splits by parameter (``param_state.check_splittable``)."""
        if not params:
            return
        resolved = self.hyperparams.resolve(group, where)
        tx = resolved.tx
        names = [self._names[p] for p in params]
        flats, skeletons = [], []
        for n, p in zip(names, params):
            flat, skeleton = split_parameter_state(unaliased(tx.init({n: p}), [p]), n)
            flats.append(flat)
            skeletons.append(skeleton)
        if check and not self.separable and len(params) > 1:
            joint = tx.init(dict(zip(names, params)))
            if not check_splittable(joint, skeletons, flats, names):
                raise ValueError(
                    f"{where}: {self.hyperparams.factory_name}'s state is not kept per parameter (dicts keyed "
                    "by parameter name), so parameters cannot be skipped or grouped; pass separable=True "
                    "if it treats each parameter tensor on its own"
                )
        cohort = self._new_cohort()
        self._layout.setdefault(id(group), resolved.layout)
        for p, flat, skeleton in zip(params, flats, skeletons):
            self.state[p] = flat
            self._skeletons[p] = skeleton
            self._cohort[p] = cohort

    def _new_cohort(self) -> int:
        self._next_cohort += 1
        return self._next_cohort

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **extra: Any) -> Any:
        """One update of every parameter that has a gradient; every check runs before anything changes.

        Args:
            closure: re-evaluates the model and returns the loss (torch.optim's protocol).
            **extra: keywords for the transform's ``update`` (module docstring).
        Returns:
            The closure's loss, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for i, group in enumerate(self.param_groups):
            resolved = self.hyperparams.resolve(group, f"param group {i}")
            active = [p for p in group["params"] if p.grad is not None]
            for p in active:
                self._check_dense(p)
            work.append((group, resolved, active))
        if self.check_finite:
            self._check_finite([p for _, _, active in work for p in active])
        for group, resolved, active in work:
            if active:
                self._step_group(group, resolved, active, closure, loss, extra)
        return loss

    def _check_dense(self, p: Tensor) -> None:
        if p.grad.is_sparse or p.grad.layout != torch.strided:
            raise RuntimeError(
                f"parameter {self._names[p]!r} has a sparse gradient; {self.hyperparams.factory_name} needs "
                "dense gradients (torch.optim.SparseAdam handles sparse ones)"
            )

    def _check_finite(self, params: list[Tensor]) -> None:
        """``FloatingPointError`` naming the first parameter with a NaN or infinite gradient. One finite
        total of the gradients' sums (one synchronisation) clears them all, since NaN and ±inf
        propagate into a sum; only a non-finite total needs the per-parameter check."""
        if not params:
            return
        grads = [p.grad.detach() for p in params]
        device = grads[0].device
        if all(g.device == device and g.dtype == grads[0].dtype and not g.is_complex() for g in grads):
            total = torch.stack([g.sum() for g in grads]).sum()
        else:
            total = torch.stack([g.sum().abs().to(device=device, dtype=torch.float64) for g in grads]).sum()
        if bool(torch.isfinite(total)):
            return
        for p in params:
            g = p.grad
            if not bool(torch.isfinite(g).all()):
                raise FloatingPointError(
                    f"non-finite gradient in parameter {self._names[p]!r} (shape {tuple(g.shape)}); "
                    "the parameters and optimizer state were left unchanged"
                )

    def _step_group(self, group: dict[str, Any], resolved: Resolved, active: list[Tensor], closure, loss,
                    extra: dict) -> None:
        values, tx, layout = resolved
        if self._layout.get(id(group), layout) != layout:
            self._relayout(group, tx)
        self._layout[id(group)] = layout
        missing = [p for p in active if p not in self._skeletons]
        if missing:
            self._init_states(missing, group, "", check=False)
        scale = values["lr"] if self.hyperparams.multiplier else None
        for members in self._cohorts(active):
            for run in self._runs(members):
                self._step_run(tx, run, scale, closure, loss, dict(extra))
            cohort = self._new_cohort()
            for p in members:
                self._cohort[p] = cohort

    def _cohorts(self, params: list[Tensor]) -> list[list[Tensor]]:
        """``params`` (all with a state) by cohort: the parameters updated together so far."""
        cohorts: dict[int, list[Tensor]] = {}
        for p in params:
            cohorts.setdefault(self._cohort[p], []).append(p)
        return list(cohorts.values())

    def _runs(self, members: list[Tensor]) -> list[list[Tensor]]:
        """One call of the transform per cohort, or per parameter for a separable transform."""
        return [[p] for p in members] if self.separable else [members]

    def _step_run(self, tx: GradientTransformation, run: list[Tensor], scale: Any, closure, loss,
                  extra: dict) -> None:
        """Update the parameters ``run`` together, as one call of ``tx`` (or its kernel)."""
        names = [self._names[p] for p in run]
        params = dict(zip(names, run))
        raw = {n: p.grad for n, p in params.items()}
        grads = {n: g.detach() for n, g in raw.items()}
        flats = [self.state[p] for p in run]
        if closure is not None and "value_and_grad_fn" not in extra:
            extra["value_and_grad_fn"] = self._value_and_grad_fn(closure, params, loss, grads)
        if "hvp_fn" not in extra and any(g.requires_grad for g in raw.values()):
            extra["hvp_fn"] = _hvp_from_graph(raw, params)
        if not extra and self.foreach is not False and self._run_kernel(tx, run, list(grads.values()), flats):
            return
        skeletons = [self._skeletons[p] for p in run]
        state = gather(skeletons, flats, names)
        if self.inplace_update is not None and not extra:
            updates = self.inplace_update(grads, state, params)
        else:
            updates, state = tx.update(grads, state, params, **extra)
            # .grad and the parameters change in place after this step; the state must not share them.
            scatter(unaliased(state, [*run, *grads.values()]), skeletons, flats, names)
        if scale is not None and not isinstance(scale, Tensor) and scale == 0:
            return
        for n, p in params.items():
            u = updates[n].to(p.dtype)
            if scale is None or (not isinstance(scale, Tensor) and scale == 1):
                p.add_(u)
            else:
                p.add_(u * scale)

    @torch.no_grad()
    def _relayout(self, group: dict[str, Any], tx: GradientTransformation) -> None:
        """A group value changed the layout of the state (``momentum`` from 0, as OneCycleLR does
        on SGD): every parameter of the group gets the new layout, keeping the entries it shares
        with the old one (as torch.optim creates a momentum buffer when momentum first appears)."""
        for p in group["params"]:
            if p not in self._skeletons:
                continue
            name = self._names[p]
            fresh, skeleton = split_parameter_state(unaliased(tx.init({name: p}), [p]), name)
            old = self.state[p]
            for key, value in fresh.items():
                kept = old.get(key)
                if isinstance(kept, Tensor) and isinstance(value, Tensor) and kept.shape == value.shape:
                    fresh[key] = kept
            self.state[p] = fresh
            self._skeletons[p] = skeleton

    def _run_kernel(self, tx: GradientTransformation, run: list[Tensor], grads: list[Tensor],
                    flats: list[dict[str, Any]]) -> bool:
        kernel = kernel_for(self.hyperparams.factory_of())
        return kernel is not None and kernel(run, grads, flats, tx.recipe.arguments)

    def _value_and_grad_fn(self, closure: Callable[[], Any], params: dict[str, Tensor], first_loss: Any,
                           first_grads: dict[str, Tensor]) -> Callable:
        """``value_and_grad_fn`` from the closure (see the module docstring)."""

        def value_and_grad(trial: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            if all(trial[n] is p for n, p in params.items()):
                return _detached(first_loss), dict(first_grads)
            saved = {n: p.detach().clone() for n, p in params.items()}
            try:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(trial[n])
                with torch.enable_grad():
                    loss = closure()
                grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in params.items()}
            finally:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(saved[n])
            return _detached(loss), grads

        return value_and_grad

    # -- the transform's state -------------------------------------------------------------------
    def transform_states(self, group: int = 0) -> list[tuple[dict[str, Tensor], Any]]:
        """The group's state as the transform keeps it.

        Args:
            group: index of the param group.
        Returns:
            ``[(params, state), ...]``, one entry per set of parameters updated together (one per
            parameter for a separable transform); ``tx.update(grads, state, params)`` continues from it.
        """
        out = []
        for members in self._cohorts([p for p in self.param_groups[group]["params"] if p in self._skeletons]):
            for run in self._runs(members):
                names = [self._names[p] for p in run]
                state = gather([self._skeletons[p] for p in run], [self.state[p] for p in run], names)
                out.append((dict(zip(names, run)), state))
        return out

    @property
    def tx_state(self) -> Any:
        """The transform's state, for an optimizer whose parameters all are one run (one group,
        updated together, not separable): what ``tx.update`` continues from. Assigning a state
        of the same layout (e.g. ``set_hyperparams(opt.tx_state, lr=...)``) replaces it."""
        return self._single_run()[1]

    @tx_state.setter
    def tx_state(self, state: Any) -> None:
        run = list(self._single_run()[0].values())
        scatter(unaliased(state, run), [self._skeletons[p] for p in run], [self.state[p] for p in run],
                [self._names[p] for p in run])

    def _single_run(self) -> tuple[dict[str, Tensor], Any]:
        runs = [r for g in range(len(self.param_groups)) for r in self.transform_states(g)]
        if len(runs) != 1:
            raise ValueError(f"tx_state: this optimizer's parameters are updated in {len(runs)} separate runs "
                             "(param groups, skipped parameters or a separable transform); use state[p] "
                             "or transform_states(group)")
        return runs[0]

    def param_name(self, p: Tensor) -> str:
        """The name under which the transform sees ``p``.

        Args:
            p: a parameter of this optimizer.
        Returns:
            Its name.
        """
        return self._names[p]

    # -- state_dict ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: ``{"state": {index: {key: value}}, "param_groups": [...]}`` with
        parameters as indices in group order; the tensors are copies."""
        packed = super().state_dict()
        packed["state"] = {
            i: {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for i, s in packed["state"].items()
        }
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` by position (torch.optim's rule). Every group size, state key
        and tensor shape is checked against this optimizer first; on a mismatch nothing changes."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"load_state_dict: expected torch.optim's layout {{'state', 'param_groups'}}, got {got}")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: the state has {len(saved_groups)} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        new_groups, new_state = [], {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"load_state_dict: param group {gi} has {len(saved['params'])} parameters in "
                                 f"the state, {len(group['params'])} here")
            options = {k: v for k, v in saved.items() if k != "params"}
            self.hyperparams.check({"params": None, **options}, f"load_state_dict: param group {gi}", new=True)
            new_groups.append({**group, **options, "params": group["params"]})
            for index, p in zip(saved["params"], group["params"]):
                if index in state_dict["state"]:
                    new_state[p] = self._loaded_state(p, state_dict["state"][index], new_groups[-1])
        for group, new in zip(self.param_groups, new_groups):
            group.clear()
            group.update(new)
        self.state.clear()
        for p, (flat, skeleton) in new_state.items():
            self.state[p] = flat
            self._skeletons[p] = skeleton
        for p in list(self._skeletons):
            if p not in new_state:
                del self._skeletons[p]
        self._regroup_cohorts()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @torch.no_grad()
    def _loaded_state(self, p: Tensor, saved: Any, group: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        name = self._names[p]
        if p in self._skeletons:
            template, skeleton = self.state[p], self._skeletons[p]
        else:
            tx = self.hyperparams.resolve(group, "load_state_dict").tx
            template, skeleton = split_parameter_state(tx.init({name: p}), name)
        if not isinstance(saved, dict) or set(saved) != set(template):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"load_state_dict: parameter {name!r} has state keys {got}, "
                             f"this optimizer keeps {sorted(template)}")
        flat = {}
        for key, old in template.items():
            value = saved[key]
            if isinstance(old, Tensor):
                if not isinstance(value, Tensor) or value.shape != old.shape:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"load_state_dict: parameter {name!r}, state {key!r} has shape {got}, "
                                     f"expected {tuple(old.shape)}")
                value = value.to(device=old.device, dtype=old.dtype, copy=True)  # ours to update in place
            flat[key] = value
        return flat, skeleton

    def _regroup_cohorts(self) -> None:
        """After a load: parameters of a group whose shared leaves (step counts) are equal were
        updated together, and are again."""
        for group in self.param_groups:
            representatives: list[tuple[list[Any], int]] = []
            for p in group["params"]:
                if p not in self._skeletons:
                    continue
                shared = [self.state[p][k] for k in shared_keys(self._skeletons[p])]
                for values, cohort in representatives:
                    if same_state(values, shared):
                        self._cohort[p] = cohort
                        break
                else:
                    self._cohort[p] = self._new_cohort()
                    representatives.append((shared, self._cohort[p]))


def _detached(loss: Any) -> Tensor:
    return loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(loss)


def _hvp_from_graph(grads: dict[str, Tensor | None], params: dict[str, Tensor]) -> Callable:
    """``H v`` as the vector-Jacobian product of the ``backward(create_graph=True)`` gradients with
    ``v``; gradients without a graph contribute nothing, parameters they miss get zeros."""
    names = [n for n, g in grads.items() if g is not None and g.requires_grad]

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.enable_grad():
            hv = torch.autograd.grad([grads[n] for n in names], [params[n] for n in params],
                                     grad_outputs=[v[n] for n in names], retain_graph=True, allow_unused=True)
        return {n: torch.zeros_like(p) if h is None else h.detach() for (n, p), h in zip(params.items(), hv)}

    return hvp


def as_torch_optimizer(tx: GradientTransformation, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
                       **options: Any) -> TransformOptimizer:
    """Wrap ``tx`` as a ``torch.optim.Optimizer`` over ``params``.

    Args:
        tx: the transform.
        params: tensors, ``(name, tensor)`` pairs or param group dicts.
        **options: ``TransformOptimizer``'s keyword options.
    Returns:
        ``TransformOptimizer(tx, params, **options)``.
    """
    return TransformOptimizer(tx, params, **options)
