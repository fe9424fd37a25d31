"""Learned optimizers: ``nn.Module``s whose parameters are the meta-parameters.

They follow the same ``init`` / ``update`` protocol as the hand-designed transforms of
``learnopt.optim``, so every consumer (the unroll, ``as_torch_optimizer``) treats both alike::

    state = lopt.init(params)
    updates, state = lopt.update(grads, state, params)

``update`` is differentiable with respect to the module's parameters (that is what
meta-training differentiates). ``config()`` returns the constructor arguments, which is
what a checkpoint stores to rebuild the module without running code from the file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from learnopt.optim.base import GradientTransformation, Params
from learnopt.optim.torch_optimizer import TransformOptimizer


class LearnedOptimizer(nn.Module):
    """Base class of learned optimizers: an ``nn.Module`` with the ``init`` / ``update`` protocol
    (module docstring). Subclasses implement ``init``, ``update`` and ``config``."""

    kind = "learned_optimizer"

    def init(self, params: Params) -> Any:
        """The optimizer state for ``params``.

        Args:
            params: ``{name: tensor}``, possibly with leading task-instance dimensions.
        Returns:
            The state (a ``NamedTuple`` of tensors).
        """
        raise NotImplementedError

    def update(self, grads: Params, state: Any, params: Params | None = None, **extra: Any):
        """One step, differentiable in the module's parameters.

        Args:
            grads: ``{name: gradient}``.
            state: the state from ``init`` or the previous ``update``.
            params: the current parameters.
            **extra: extra arguments (``learnopt.optim.extra``); ignored unless documented.
        Returns:
            ``(updates, state)``: updates to add to the parameters, and the new state.
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor keyword arguments.

        Returns:
            ``{argument: value}``; ``type(self)(**config())`` rebuilds the architecture.
        """
        raise NotImplementedError

    def transform(self) -> GradientTransformation:
        """This optimizer as a ``GradientTransformation`` bound to its current meta-parameters.

        Returns:
            ``GradientTransformation(self.init, self.update)``.
        """
        return GradientTransformation(self.init, self.update)

    # The drop-in runs the transform one parameter tensor at a time (``TransformOptimizer``'s
    # ``separable``): for rules that treat each tensor on its own but keep state spanning all of them.
    separable = False

    def as_torch_optimizer(self, params, **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` running this learned optimizer on ``params``.

        Args:
            params: tensors, ``(name, tensor)`` pairs or param group dicts.
            **options: ``TransformOptimizer``'s keyword options.
        Returns:
            A ``TransformOptimizer``; its param groups' ``lr`` multiplies this optimizer's update.
        """
        return self.drop_in(self.transform(), params, options)

    def drop_in(self, tx: GradientTransformation, params, options: dict[str, Any]) -> TransformOptimizer:
        """``TransformOptimizer(tx, params, **options)``, ``separable`` by default as the class says.

        Args:
            tx: the transformation the drop-in runs.
            params: tensors, ``(name, tensor)`` pairs or param group dicts.
            options: ``TransformOptimizer``'s keyword options.
        Returns:
            A ``TransformOptimizer``.
        """
        return TransformOptimizer(tx, params, **{"separable": self.separable, **options})

    @property
    def device(self) -> torch.device:
        """The device of the meta-parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the meta-parameters."""
        return next(self.parameters()).dtype
