"""``as_torch_optimizer``: any ``GradientTransformation`` as a drop-in ``torch.optim.Optimizer``.

``step(closure=None, **extra)`` supplies the extra ``update`` arguments that a torch training loop
can provide (``learnopt.optim.extra``):

* ``value_and_grad_fn`` when a ``closure`` is given: evaluating at trial parameters copies them
  into the parameters, calls the closure (which, as in torch.optim, zeroes the gradients,
  computes the loss and calls ``backward``), reads ``.grad`` and restores the parameters, the way
  ``torch.optim.LBFGS`` evaluates its line search. The first evaluation, at the current
  parameters, is the closure call that ``step`` makes anyway, so ``lbfgs`` costs the closure
  calls ``torch.optim.LBFGS`` makes. ``step`` returns the loss of that first call, as torch does.
* ``hvp_fn`` when the gradients carry a graph, i.e. ``loss.backward(create_graph=True)`` was used
  (as ``pytorch_optimizer.AdaHessian`` requires): ``H v`` by differentiating ``<grad, v>``.
* any other keyword (``indices``, ``example_grads_fn``, ``probes``, ...) is passed through, and
  passing ``value_and_grad_fn`` / ``hvp_fn`` / ``loss_fn`` explicitly overrides the built ones.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from learnopt.optim.base import GradientTransformation

STATE_FORMAT = "learnopt.transform_optimizer/1"


class TransformOptimizer(torch.optim.Optimizer):
    """Runs ``tx`` on ordinary ``nn.Parameter``s, updating them in place after ``backward()``.

    * ``params``: an iterable of tensors or of ``(name, tensor)`` pairs (``named_parameters()``);
      tensors with ``requires_grad=False`` are left out. The transform sees a
      ``dict[str, Tensor]`` keyed by those names (``"0"``, ``"1"``, ... for bare tensors).
    * A parameter whose ``.grad`` is ``None`` at ``step()`` is given a zero gradient (the
      transform still advances its state), unlike ``torch.optim`` which skips it.
    * ``check_finite`` (default on): a NaN or infinite gradient raises ``FloatingPointError``
      naming the parameter, before anything is changed, instead of silently poisoning the
      parameters and the optimizer state.
    * ``state_dict()`` / ``load_state_dict()`` round-trip the transform state; a state of
      another shape (another model or optimizer) is refused with a message saying what differs.
    * ``step(closure=None, **extra)``: the closure also serves transforms that evaluate the
      objective elsewhere (``lbfgs``), gradients from ``backward(create_graph=True)`` give
      Hessian-vector products (``adahessian``, ``sophia``), and keywords reach ``update`` (e.g.
      ``indices=...`` for the finite-sum methods); see the module docstring.
    * ``inplace_update`` (optional): ``f(grads, state, params) -> updates`` that overwrites
      the state in place, for transforms that have such a fast path (the coordinate-wise LSTM);
      used for steps with no extra ``update`` arguments. The optimizer owns its state, so
      nothing else can observe the overwrite; the functional ``tx.update`` serves all other steps.
    """

    def __init__(
        self,
        tx: GradientTransformation,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        *,
        check_finite: bool = True,
        inplace_update: Callable[..., dict[str, Tensor]] | None = None,
    ) -> None:
        items = list(params)
        if not items:
            raise ValueError("as_torch_optimizer got an empty parameter list")
        if isinstance(items[0], tuple):
            pairs = [(str(n), p) for n, p in items]
        else:
            pairs = [(str(i), p) for i, p in enumerate(items)]
        pairs = [(n, p) for n, p in pairs if p.requires_grad]
        if not pairs:
            raise ValueError("as_torch_optimizer: no parameter requires grad")
        self._names = [n for n, _ in pairs]
        super().__init__([p for _, p in pairs], defaults={})
        self.tx = tx
        self.check_finite = check_finite
        self.inplace_update = inplace_update
        with torch.no_grad():
            self.tx_state = _unaliased(tx.init(self._param_dict()), self._param_dict().values())

    def _param_dict(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self.param_groups[0]["params"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **extra: Any) -> Any:
        """One update. ``closure`` re-evaluates the model and returns the loss (torch.optim's
        protocol); ``extra`` keywords reach the transform's ``update`` (module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._param_dict()
        raw = {n: p.grad for n, p in params.items()}
        grads = {n: (g.detach() if g is not None else torch.zeros_like(params[n])) for n, g in raw.items()}
        if self.check_finite:
            for n, g in grads.items():
                # NaN and ±inf propagate into the sum, so a finite sum (one cheap reduction) means a
                # finite gradient; only a non-finite sum (or an overflowing one) needs the exact check
                if not bool(torch.isfinite(g.sum())) and not bool(torch.isfinite(g).all()):
                    raise FloatingPointError(
                        f"non-finite gradient in parameter '{n}' (shape {tuple(g.shape)}); "
                        "the parameters and optimizer state were left unchanged"
                    )
        if closure is not None and "value_and_grad_fn" not in extra:
            extra["value_and_grad_fn"] = self._value_and_grad_fn(closure, params, loss, grads)
        if "hvp_fn" not in extra and any(g is not None and g.requires_grad for g in raw.values()):
            extra["hvp_fn"] = _hvp_from_graph(raw, params)
        if self.inplace_update is not None and not extra:
            updates = self.inplace_update(grads, self.tx_state, params)
        else:
            updates, state = self.tx.update(grads, self.tx_state, params, **extra)
            # .grad and the parameters change in place after this step; the state must not share them.
            self.tx_state = _unaliased(state, [*params.values(), *grads.values()])
        for n, p in params.items():
            p.add_(updates[n].to(p.dtype))
        return loss

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

    def state_dict(self) -> dict[str, Any]:
        leaves = pytree.tree_leaves(self.tx_state)
        return {
            "format": STATE_FORMAT,
            "names": list(self._names),
            "tx_state": [x.detach().clone() if isinstance(x, Tensor) else x for x in leaves],
            "param_groups": [{"params": list(range(len(self._names)))}],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"load_state_dict: not a learnopt optimizer state (expected format {STATE_FORMAT!r}, "
                f"got {state_dict.get('format') if isinstance(state_dict, dict) else type(state_dict).__name__!r})"
            )
        if list(state_dict["names"]) != self._names:
            raise ValueError(
                f"load_state_dict: state is for parameters {state_dict['names'][:5]}... "
                f"({len(state_dict['names'])}), this optimizer has {self._names[:5]}... ({len(self._names)})"
            )
        leaves, spec = pytree.tree_flatten(self.tx_state)
        new = state_dict["tx_state"]
        if len(new) != len(leaves):
            raise ValueError(f"load_state_dict: state has {len(new)} tensors, this optimizer expects {len(leaves)}")
        out = []
        for i, (old, val) in enumerate(zip(leaves, new)):
            if isinstance(old, Tensor):
                if not isinstance(val, Tensor) or val.shape != old.shape:
                    got = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
                    raise ValueError(f"load_state_dict: state tensor {i} has shape {got}, expected {tuple(old.shape)}")
                val = val.to(device=old.device, dtype=old.dtype, copy=True)  # ours to update in place
            out.append(val)
        self.tx_state = pytree.tree_unflatten(out, spec)


def _unaliased(state: Any, tensors: Iterable[Tensor]) -> Any:
    """``state`` with copies of its tensors that share memory with ``tensors`` (the parameters and
    their gradients). Transforms may keep what they were given (an SVRG snapshot, Lookahead's slow
    weights, a previous gradient): functionally that is safe, but this optimizer then changes the
    parameters, and the training loop the gradients, in place. Only aliased tensors are copied."""
    storages = {t.untyped_storage().data_ptr() for t in tensors}

    def copy_if_aliased(x: Any) -> Any:
        if isinstance(x, Tensor) and x.numel() and x.untyped_storage().data_ptr() in storages:
            return x.clone()
        return x

    return pytree.tree_map(copy_if_aliased, state)


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


def as_torch_optimizer(
    tx: GradientTransformation,
    params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    **options: Any,
) -> TransformOptimizer:
    """Wrap ``tx`` as a ``torch.optim.Optimizer`` over ``params`` (see ``TransformOptimizer``)."""
    return TransformOptimizer(tx, params, **options)
