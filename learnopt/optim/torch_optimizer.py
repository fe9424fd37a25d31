"""``as_torch_optimizer``: any ``GradientTransformation`` as a drop-in ``torch.optim.Optimizer``."""

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
    """

    def __init__(
        self,
        tx: GradientTransformation,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        *,
        check_finite: bool = True,
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
        with torch.no_grad():
            self.tx_state = tx.init(self._param_dict())

    def _param_dict(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self.param_groups[0]["params"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._param_dict()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
        if self.check_finite:
            for n, g in grads.items():
                if not bool(torch.isfinite(g).all()):
                    raise FloatingPointError(
                        f"non-finite gradient in parameter '{n}' (shape {tuple(g.shape)}); "
                        "the parameters and optimizer state were left unchanged"
                    )
        updates, self.tx_state = self.tx.update(grads, self.tx_state, params)
        for n, p in params.items():
            p.add_(updates[n].to(p.dtype))
        return loss

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
                val = val.to(device=old.device, dtype=old.dtype)
            out.append(val)
        self.tx_state = pytree.tree_unflatten(out, spec)


def as_torch_optimizer(
    tx: GradientTransformation,
    params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    **options: Any,
) -> TransformOptimizer:
    """Wrap ``tx`` as a ``torch.optim.Optimizer`` over ``params`` (see ``TransformOptimizer``)."""
    return TransformOptimizer(tx, params, **options)
