"""Named hand-designed optimizers, chained from ``transforms``.

Hyperparameters are named as in ``torch.optim`` and have its defaults, and each factory
computes the same trajectory as its ``torch.optim`` namesake (tested).
"""

from __future__ import annotations

from learnopt.optim.base import GradientTransformation, Hyper, chain
from learnopt.optim.transforms import (
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)


def _l2(weight_decay: Hyper) -> list[GradientTransformation]:
    # torch.optim adds weight_decay * p to the gradient before anything else (L2, not AdamW).
    return [add_decayed_weights(weight_decay)] if _nonzero(weight_decay) else []


def _nonzero(x: Hyper) -> bool:
    return not (isinstance(x, (int, float)) and x == 0)


def sgd(
    lr: Hyper = 1e-3,
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent (Robbins & Monro 1951), ``torch.optim.SGD``::

        g <- g + weight_decay * p;  b <- momentum * b + (1 - dampening) * g  (if momentum)
        p <- p - lr * (g + momentum * b  if nesterov else  b)
    """
    parts = _l2(weight_decay)
    if _nonzero(momentum) or nesterov:
        parts.append(trace(momentum, dampening, nesterov))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def momentum(lr: Hyper = 1e-3, momentum: Hyper = 0.9, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """SGD with heavy-ball momentum (Polyak 1964): ``torch.optim.SGD(momentum=0.9)``."""
    return sgd(lr=lr, momentum=momentum, weight_decay=weight_decay)


def nesterov(lr: Hyper = 1e-3, momentum: Hyper = 0.9, weight_decay: Hyper = 0.0) -> GradientTransformation:
    """Nesterov accelerated gradient in Sutskever et al.'s (2013) form: ``torch.optim.SGD(nesterov=True)``."""
    return sgd(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def rmsprop(
    lr: Hyper = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """RMSprop (Hinton, Coursera lecture 6e), ``torch.optim.RMSprop``::

        s <- alpha s + (1 - alpha) g^2;   u = g / (sqrt(s) + eps)
        b <- momentum b + u  (if momentum);   p <- p - lr * (b or u)
    """
    parts = _l2(weight_decay) + [scale_by_rms(alpha, eps, centered)]
    if _nonzero(momentum):
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
) -> GradientTransformation:
    """Adam (Kingma & Ba 2014, arXiv 1412.6980), ``torch.optim.Adam``::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    return chain(*_l2(weight_decay), scale_by_adam(betas[0], betas[1], eps), scale_by_learning_rate(lr))
