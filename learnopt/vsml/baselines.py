"""Baselines for online learning, under the same online-learner protocol as ``VSMLNetwork``.

``OnlineLinear``: a linear softmax classifier trained by one step of a hand-designed optimizer
(``learnopt.optim``: SGD, Adam, …) per example, batched over episodes. The gradient of the
cross-entropy is written in closed form (``∂L/∂z = softmax(z) − onehot(y)``), which is exact
for a linear model and keeps the baseline as cheap as the learners it is compared with.

``BlackBoxOnlineLSTM``: the paper's black-box meta-learner (Hochreiter et al. 2001; Santoro et
al. 2016 style): one LSTM reading ``[x_t, error_{t−1}, onehot(y_{t−1})]`` and emitting the
logits. Its sizes are fixed, so unlike VSML it cannot take another input size or class count.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnopt import optim as lo


class LinearState(NamedTuple):
    params: dict[str, Tensor]
    opt_state: Any
    x: Tensor


class OnlineLinear:
    """Online linear softmax classifier, one optimizer step per example.

    Args:
        optimizer: a name of ``learnopt.optim`` (``"sgd"``, ``"adam"``, …) called with ``lr``.
        lr: the learning rate.
        bias: learn a bias per class.
        mean_aggregation: logits ``z_b = mean_a w_ab x_a`` instead of ``Σ_a`` (the
            parameterisation a one-layer VSML network has, used to compare with its SGD clone).
        init_std: std of the initial weights in units of ``1/√A`` (0: zeros).
        **hyperparams: the optimizer's other hyperparameters.
    Raises:
        ValueError: an unknown optimizer.
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, bias: bool = True, mean_aggregation: bool = False,
                 init_std: float = 0.0, **hyperparams: Any) -> None:
        factory = getattr(lo, optimizer, None)
        if factory is None or not callable(factory):
            raise ValueError(f"OnlineLinear: unknown optimizer {optimizer!r} (a name in learnopt.optim)")
        self.tx = factory(lr=lr, **hyperparams)
        self.optimizer, self.lr, self.bias = optimizer, lr, bias
        self.mean_aggregation, self.init_std = mean_aggregation, init_std

    def init_state(self, episodes: int, num_features: int, num_classes: int,
                   generator: torch.Generator | None = None, device: Any = None) -> LinearState:
        """Weights (zeros, or random with ``init_std``), zero bias, the optimizer's state.

        Args:
            episodes: ``E``.
            num_features: ``A``.
            num_classes: ``C``.
            generator: draws the initial weights (``init_std``).
            device: where the state lives.
        Returns:
            A ``LinearState``.
        """
        w = torch.zeros(episodes, num_features, num_classes, device=device)
        if self.init_std:
            noise = torch.randn(w.shape, generator=generator, device=generator.device if generator else "cpu")
            w = noise.to(w.device) * self.init_std / math.sqrt(num_features)
        params = {"weight": w}
        if self.bias:
            params["bias"] = torch.zeros(episodes, num_classes, device=device)
        return LinearState(params, self.tx.init(params), torch.zeros(episodes, num_features, device=device))

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The linear logits of ``x``.

        Args:
            params: ``{"weight": [E, A, C], "bias": [E, C]}``.
            x: ``[E, A]`` inputs.
        Returns:
            ``[E, C]``.
        """
        z = torch.einsum("ea,eab->eb", x, params["weight"])
        if self.mean_aggregation:
            z = z / x.shape[-1]
        return z + params["bias"] if self.bias else z

    def predict(self, state: LinearState, x: Tensor) -> tuple[LinearState, Tensor]:
        """Logits of the step's inputs (kept for ``feedback``).

        Args:
            state: the current state.
            x: ``[E, A]`` the step's inputs.
        Returns:
            ``(state, logits [E, C])``.
        """
        return state._replace(x=x), self.logits(state.params, x)

    def feedback(self, state: LinearState, logits: Tensor, y: Tensor) -> LinearState:
        """One optimizer step on the cross-entropy of the step's example.

        Args:
            state: the state after ``predict``.
            logits: ``[E, C]`` what ``predict`` returned.
            y: ``[E]`` the labels.
        Returns:
            The new state.
        """
        delta = torch.softmax(logits, -1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        gw = state.x.unsqueeze(-1) * delta.unsqueeze(1)
        grads = {"weight": gw / state.x.shape[-1] if self.mean_aggregation else gw}
        if self.bias:
            grads["bias"] = delta
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return LinearState(lo.apply_updates(state.params, updates), opt_state, state.x)


class BBState(NamedTuple):
    h: Tensor
    c: Tensor
    error: Tensor
    label: Tensor
    num_classes: int


class BlackBoxOnlineLSTM(nn.Module):
    """An LSTM meta-learner over the stream ``[x_t, error_{t−1}, onehot(y_{t−1})]`` (the paper's
    black-box baseline, 128 units). Fixed ``num_features`` and ``num_classes``; episodes with
    fewer classes use the first ones (logits of the unused classes are masked).

    Args:
        num_features: input features.
        num_classes: the most classes.
        hidden_size: LSTM units.
    """

    kind = "vsml_learner"

    def __init__(self, num_features: int = 16, num_classes: int = 5, hidden_size: int = 128) -> None:
        super().__init__()
        self.num_features, self.num_classes, self.hidden_size = num_features, num_classes, hidden_size
        self.lstm = nn.LSTMCell(num_features + 2 * num_classes, hidden_size)
        self.head = nn.Linear(hidden_size, num_classes)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, what a checkpoint stores.

        Returns:
            ``{argument: value}``.
        """
        return {"num_features": self.num_features, "num_classes": self.num_classes, "hidden_size": self.hidden_size}

    def init_state(self, episodes: int, num_features: int, num_classes: int,
                   generator: torch.Generator | None = None, device: Any = None) -> BBState:
        """Zero LSTM state, error and label inputs.

        Args:
            episodes: ``E``.
            num_features: ``A``.
            num_classes: ``C``.
            generator: unused (the state starts at zero).
            device: where the state lives.
        Returns:
            A ``BBState``.
        Raises:
            ValueError: other features than built for, or more classes.
        """
        if num_features != self.num_features or num_classes > self.num_classes:
            raise ValueError(f"BlackBoxOnlineLSTM was built for {self.num_features} features and at most "
                             f"{self.num_classes} classes, got {num_features} features, {num_classes} classes "
                             "(a black-box learner cannot change its input or output size)")
        device = device if device is not None else self.head.weight.device
        zeros = lambda n: torch.zeros(episodes, n, device=device)
        return BBState(zeros(self.hidden_size), zeros(self.hidden_size), zeros(self.num_classes),
                       zeros(self.num_classes), num_classes)

    def predict(self, state: BBState, x: Tensor) -> tuple[BBState, Tensor]:
        """One LSTM step on ``[x_t, error_{t−1}, onehot(y_{t−1})]``.

        Args:
            state: the current state.
            x: ``[E, A]`` the step's inputs.
        Returns:
            ``(state, logits [E, C])``.
        """
        h, c = self.lstm(torch.cat([x, state.error, state.label], -1), (state.h, state.c))
        logits = self.head(h)[:, : state.num_classes]
        return state._replace(h=h, c=c), logits

    def feedback(self, state: BBState, logits: Tensor, y: Tensor) -> BBState:
        """Store the step's error and label for the next step's input.

        Args:
            state: the state after ``predict``.
            logits: ``[E, C]`` what ``predict`` returned.
            y: ``[E]`` the labels.
        Returns:
            The new state.
        """
        onehot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        error = torch.softmax(logits, -1) - onehot
        pad = self.num_classes - logits.shape[-1]
        return state._replace(error=F.pad(error, (0, pad)), label=F.pad(onehot, (0, pad)))

    @torch.no_grad()
    def online(self, x: Any, y: Any, num_classes: int | None = None, seed: int = 0) -> Tensor:
        """Predict each example of one stream before its label is seen.

        Args:
            x: ``[N, F]`` inputs.
            y: ``[N]`` class indices.
            num_classes: ``C`` (None: from ``y``).
            seed: the episode's generator seed.
        Returns:
            ``[N]`` predicted classes (``online_predictions``).
        """
        from learnopt.vsml.online import online_predictions

        return online_predictions(self, x, y, num_classes, seed)
