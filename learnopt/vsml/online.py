"""Online learning episodes: one example per step, the prediction made before the label is seen,
the label (and error) fed back afterwards.

Any *online learner* works here: an object with ``init_state(episodes, num_features,
num_classes, generator, device)``, ``predict(state, x_t) -> (state, logits)`` and
``feedback(state, logits, y_t) -> state``. ``VSMLNetwork``, the black-box LSTM baseline and
the online SGD / Adam baselines all are.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class OnlineLearner(Protocol):
    """What ``online_episode`` runs: a learner that predicts before it sees each label."""

    def init_state(self, episodes: int, num_features: int, num_classes: int,
                   generator: torch.Generator | None = None, device: Any = None) -> Any:
        """The learner's state at the start of ``episodes`` parallel episodes.

        Args:
            episodes: ``E``.
            num_features: ``A``, input features.
            num_classes: ``C``.
            generator: for random initial states, if any.
            device: where the state lives.
        Returns:
            The state.
        """
        ...

    def predict(self, state: Any, x: Tensor) -> tuple[Any, Tensor]:
        """Predict the step's labels.

        Args:
            state: the current state.
            x: ``[E, A]`` the step's inputs.
        Returns:
            ``(state, logits [E, C])``.
        """
        ...

    def feedback(self, state: Any, logits: Tensor, y: Tensor) -> Any:
        """Learn from the step's labels.

        Args:
            state: the state after ``predict``.
            logits: ``[E, C]`` what ``predict`` returned.
            y: ``[E]`` the labels.
        Returns:
            The new state.
        """
        ...


def check_stream(x: Tensor, y: Tensor, num_classes: int) -> None:
    """Clear errors for streams that do not fit: ``x`` [E, T, A], ``y`` [E, T] in [0, C).

    Args:
        x: ``[E, T, A]`` inputs.
        y: ``[E, T]`` labels.
        num_classes: ``C``.
    Raises:
        ValueError: wrong shapes, non-integer or out-of-range labels, fewer than 2 classes, or
            a non-finite ``x``.
    """
    if x.dim() != 3 or y.dim() != 2 or x.shape[:2] != y.shape:
        raise ValueError(f"online episode: x must be [episodes, steps, features] and y [episodes, steps], "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"online episode: y must hold integer class indices, got dtype {y.dtype}")
    if num_classes < 2:
        raise ValueError(f"online episode: need at least 2 classes, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"online episode: labels must lie in [0, {num_classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(x).all():
        raise ValueError("online episode: x contains NaN or inf")


def online_episode(learner: OnlineLearner, x: Tensor, y: Tensor, num_classes: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """Run ``learner`` through episodes; step ``t``'s logits are computed before ``y[:, t]`` is fed back.

    Args:
        learner: an ``OnlineLearner``.
        x: ``[E, T, A]`` inputs.
        y: ``[E, T]`` labels.
        num_classes: ``C``.
        generator: passed to ``learner.init_state``.
    Returns:
        ``[E, T, C]`` logits.
    Raises:
        ValueError: a stream that does not fit (``check_stream``).
    """
    check_stream(x, y, num_classes)
    E, T, A = x.shape
    state = learner.init_state(E, A, num_classes, generator, x.device)
    outputs = []
    for t in range(T):
        state, logits = learner.predict(state, x[:, t])
        outputs.append(logits)
        state = learner.feedback(state, logits, y[:, t])
    return torch.stack(outputs, 1)


def online_metrics(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean online cross-entropy (differentiable) and online accuracy of episodes.

    Args:
        logits: ``[E, T, C]`` from ``online_episode``.
        y: ``[E, T]`` labels.
    Returns:
        ``(cross_entropy, accuracy)``, scalars.
    """
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean()
    return ce, accuracy


def online_predictions(learner: OnlineLearner, x: Any, y: Any, num_classes: int | None = None,
                       seed: int = 0) -> Tensor:
    """The user-facing ``learner.online(x, y)``: the class predicted for each example of one stream
    (arrays or tensors) before its label was seen.

    Args:
        learner: an ``OnlineLearner`` (an ``nn.Module``'s parameters give device and dtype).
        x: ``[N, F]`` inputs.
        y: ``[N]`` class indices.
        num_classes: ``C`` (None: ``max(y) + 1``, at least 2).
        seed: seeds the generator passed to ``init_state``.
    Returns:
        ``[N]`` predicted classes, on the CPU.
    Raises:
        ValueError: wrong shapes or non-integer labels.
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(f"online: x must be [examples, features] and y [examples] of the same length, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("online: y must hold class indices (integers)")
        y = y.long()
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    num_classes = max(num_classes, 2)
    params = [p for p in getattr(learner, "parameters", lambda: [])()]
    device, dtype = (params[0].device, params[0].dtype) if params else (torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = online_episode(learner, x.to(device, dtype)[None], y.to(device).long()[None], num_classes, generator)
    return logits[0].argmax(-1).cpu()
