"""MLP autoencoders on offline datasets: reconstruct the input through a narrow code layer.

The network of ``tasks.mlp`` (batched over instances, same initialisation) with the input's
own width as output, a linear output layer and the mean squared reconstruction error as the
loss: ``hidden_sizes=(32, 8, 32)`` on digits is 64 → 32 → 8 → 32 → 64. Labels are drawn with
the minibatches (shared sampler) and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learnopt.task import Params, Task
from tasks.mlp import ACTIVATIONS, MLPTask, load_dataset

__all__ = ["AutoencoderFamily", "AutoencoderTask"]


@dataclass
class AutoencoderTask(MLPTask):
    """``num_instances`` autoencoders; ``loss`` is each instance's mean squared error over its
    batch and the input's features. ``loss_scale`` is the data's mean square (the error of
    reconstructing every input as zero)."""

    data_scale: float = 1.0

    @property
    def loss_scale(self) -> float:
        return self.data_scale

    def _error(self, params: Params, x: Tensor) -> Tensor:
        recon = self.logits(params, x)
        target = x if x.dim() == 3 else x.expand(recon.shape[0], *x.shape)
        return ((recon - target) ** 2).mean(dim=(-2, -1))

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        x, _ = batch if batch is not None else (self.x, self.y)
        return self._error(params, x)

    def full_loss(self, params: Params) -> Tensor:
        """Mean squared reconstruction error of each instance over the whole training set."""
        return self._error(params, self.x)

    def test_metrics(self, params: Params) -> dict[str, Tensor]:
        """Mean squared reconstruction error of each instance over the whole test split (no accuracy).

        Args:
            params: the parameters.
        Returns:
            ``{"test_loss": [n]}``; empty without a test split.
        """
        if self.x_test is None:
            return {}
        with torch.no_grad():
            return {"test_loss": self._error(params, self.x_test)}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AutoencoderTask:
        x = self.x.to(device=device, dtype=dtype)
        return AutoencoderTask(self.sizes, self.activation, x, self.y.to(x.device), self.batch_size, self.n,
                               data_scale=self.data_scale, **self._test_to(x))


class AutoencoderFamily:
    """Autoencoders with ``hidden_sizes`` (encoder, code, decoder) and ``activation`` on
    ``dataset`` (``tasks.datasets``: ``digits``, ``mnist1d``, ...; nothing downloads).
    Instances differ in initial weights and minibatches. ``normalize`` divides by the data's
    mean square."""

    def __init__(self, dataset: str = "digits", hidden_sizes: Sequence[int] = (32, 8, 32), activation: str = "tanh",
                 batch_size: int = 128, data_seed: int = 0, data_dir: str | None = None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"AutoencoderFamily: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if not self.hidden_sizes or min(self.hidden_sizes) < 1 or batch_size < 1:
            raise ValueError(f"AutoencoderFamily: need hidden sizes >= 1 (at least one) and batch_size >= 1, "
                             f"got {hidden_sizes}, {batch_size}")
        self.dataset, self.activation, self.batch_size, self.data_seed = dataset, activation, batch_size, data_seed
        self.data_dir = data_dir
        x, y, x_test, y_test = load_dataset(dataset, data_seed, data_dir)
        self._x, self._y, self._x_test, self._y_test = x, y, x_test, y_test
        self.loss_scale = float((x * x).mean())
        self.name = f"autoencoder_{dataset}_{'x'.join(map(str, self.hidden_sizes))}_{activation}"

    def normalize(self, loss: Tensor) -> Tensor:
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """An ``AutoencoderTask`` of ``num_instances`` instances."""
        if num_instances < 1:
            raise ValueError(f"AutoencoderFamily.sample: num_instances must be >= 1, got {num_instances}")
        d = self._x.shape[1]
        return AutoencoderTask((d, *self.hidden_sizes, d), self.activation, self._x, self._y, self.batch_size,
                               num_instances, self._x_test, self._y_test, data_scale=self.loss_scale)
