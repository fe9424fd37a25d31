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
    kind = "learned_optimizer"

    def init(self, params: Params) -> Any:
        raise NotImplementedError

    def update(self, grads: Params, state: Any, params: Params | None = None, **extra: Any):
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor keyword arguments."""
        raise NotImplementedError

    def transform(self) -> GradientTransformation:
        """This optimizer as a ``GradientTransformation`` bound to its current meta-parameters."""
        return GradientTransformation(self.init, self.update)

    def as_torch_optimizer(self, params, **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` running this learned optimizer on ``params``."""
        return TransformOptimizer(self.transform(), params, **options)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
