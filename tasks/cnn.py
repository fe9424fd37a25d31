"""A small 1-d convolutional classifier on mnist1d (Greydanus 2020, "Scaling down deep
learning", arXiv 2011.14439, whose CNN baseline is three stride-2 convolutions and a linear
layer; this one defaults to two).

Many instances in one call: the instances' filters are stacked along the output channels and
applied with one grouped convolution (``groups = num_instances``), so instance ``k`` sees
only its own channels, exactly as ``n`` separate ``Conv1d`` layers would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from learnopt.task import Params, Task, generator_device
from tasks.datasets import HeldOutClassifier, cross_entropy_per_instance, load_dataset, sample_minibatches

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def conv_output_length(length: int, kernel_size: int, stride: int) -> int:
    """Length after a ``Conv1d`` with padding ``kernel_size // 2``.

    Args:
        length: input length.
        kernel_size: the kernel size.
        stride: the stride.
    Returns:
        The output length.
    """
    return (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1


@dataclass
class CNNTask(HeldOutClassifier):
    """``num_instances`` CNNs of one architecture on signals ``x``: [N, L] (one input channel).

    Parameters: ``conv{i}_w`` [n, c_out, c_in, k], ``conv{i}_b`` [n, c_out] (stride ``stride``,
    padding ``k // 2``, then the activation), ``fc_w`` [n, c_last * L_last, C], ``fc_b`` [n, C]
    on the flattened (channel-major) feature map. Loss: mean cross-entropy.

    Args:
        channels: output channels of each convolution.
        kernel_size: the kernel size.
        stride: the stride.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        num_classes: ``C``.
        x: ``[N, L]`` training signals.
        y: ``[N]`` labels.
        batch_size: ``B``.
        n: number of instances.
        x_test: ``[M, L]`` held-out signals (None: no test split).
        y_test: ``[M]`` held-out labels.
    """

    channels: tuple[int, ...]
    kernel_size: int
    stride: int
    activation: str
    num_classes: int
    x: Tensor
    y: Tensor
    batch_size: int
    n: int
    x_test: Tensor | None = None
    y_test: Tensor | None = None

    @property
    def num_instances(self) -> int:
        """Number of CNNs ``n``."""
        return self.n

    @property
    def loss_scale(self) -> float:
        """log C: the cross-entropy of a uniform prediction."""
        return math.log(self.num_classes)

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """Each parameter's per-instance shape and its fan-in."""
        shapes, c_in, length = {}, 1, self.x.shape[-1]
        for i, c_out in enumerate(self.channels):
            fan_in = c_in * self.kernel_size
            shapes[f"conv{i}_w"] = ((c_out, c_in, self.kernel_size), fan_in)
            shapes[f"conv{i}_b"] = ((c_out,), fan_in)
            c_in, length = c_out, conv_output_length(length, self.kernel_size, self.stride)
        shapes["fc_w"] = ((c_in * length, self.num_classes), c_in * length)
        shapes["fc_b"] = ((self.num_classes,), c_in * length)
        return shapes

    def init(self, generator: torch.Generator | None = None) -> Params:
        """PyTorch's default initialisation of ``Conv1d`` and ``Linear``: U(±1/√fan_in).

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``{name: [n, ...]}`` (the class docstring's shapes).
        """
        params = {}
        for name, (shape, fan_in) in self._shapes().items():
            bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Conv1d's and Linear's default range
            u = torch.rand((self.n, *shape), generator=generator, device=generator_device(generator),
                           dtype=torch.float32)
            params[name] = ((u * 2 - 1) * bound).to(self.x)
        return params

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """The logits of every instance.

        Args:
            params: the parameters.
            x: ``[n, B, L]`` per-instance batches or ``[B, L]`` shared.
        Returns:
            ``[n, B, C]``.
        """
        n = self.n
        h = x.transpose(0, 1) if x.dim() == 3 else x[:, None, :].expand(-1, n, -1)  # [B, n * 1, L]
        act = ACTIVATIONS[self.activation]
        for i in range(len(self.channels)):
            w, b = params[f"conv{i}_w"], params[f"conv{i}_b"]
            # instance k's filters are output channels k*c_out .. (k+1)*c_out - 1 of group k
            h = F.conv1d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), stride=self.stride,
                         padding=self.kernel_size // 2, groups=n)
            h = act(h)
        B = h.shape[0]
        features = h.reshape(B, n, -1).transpose(0, 1)  # [n, B, c_last * L_last]
        return torch.bmm(features, params["fc_w"]) + params["fc_b"][:, None, :]

    def sample_batch(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One minibatch per instance.

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``(x [n, B, L], y [n, B])``.
        """
        return sample_minibatches(self.x, self.y, self.n, self.batch_size, generator)

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """Mean cross-entropy per instance.

        Args:
            params: the parameters, as ``init`` returns them.
            batch: ``(x, y)`` from ``sample_batch``; None: the whole training set.
        Returns:
            ``[num_instances]`` losses.
        """
        x, y = batch if batch is not None else (self.x, self.y)
        return cross_entropy_per_instance(self.logits(params, x), y)

    def full_loss(self, params: Params) -> Tensor:
        """Mean cross-entropy of each instance over the whole training set.

        Args:
            params: the parameters.
        Returns:
            ``[num_instances]`` losses on the whole training set.
        """
        return self.loss(params, None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CNNTask:
        """The same instances with their data on ``device`` / in ``dtype``.

        Args:
            device: the device of the data (None: unchanged).
            dtype: the dtype of the floating data (None: unchanged).
        Returns:
            A ``CNNTask`` with the same instances.
        """
        x = self.x.to(device=device, dtype=dtype)
        return CNNTask(self.channels, self.kernel_size, self.stride, self.activation, self.num_classes, x,
                       self.y.to(x.device), self.batch_size, self.n, **self._test_to(x))


class CNNFamily:
    """1-d CNN classifiers on ``dataset`` (``mnist1d``: 4,000 training signals of length 40, 10
    classes): ``len(channels)`` convolutions of ``kernel_size`` with ``stride``, the activation,
    and a linear layer. Instances differ in initial weights and minibatches. ``normalize``
    divides by log C.

    Args:
        dataset: ``"mnist1d"``.
        channels: output channels of each convolution.
        kernel_size: the kernel size.
        stride: the stride.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        batch_size: minibatch size.
        data_seed: seed of the generated dataset.
    Raises:
        ValueError: another dataset or activation, or a size below 1.
    References:
        Greydanus 2020, "Scaling down deep learning", arXiv 2011.14439.
    """

    def __init__(
        self,
        dataset: str = "mnist1d",
        channels: Sequence[int] = (8, 16),
        kernel_size: int = 5,
        stride: int = 2,
        activation: str = "relu",
        batch_size: int = 128,
        data_seed: int = 0,
    ) -> None:
        if dataset != "mnist1d":
            raise ValueError(f"CNNFamily: dataset must be 'mnist1d' (1-d signals), got {dataset!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"CNNFamily: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"CNNFamily: channels must be a non-empty list of positive ints, got {channels!r}")
        if kernel_size < 1 or stride < 1 or batch_size < 1:
            raise ValueError(f"CNNFamily: kernel_size, stride and batch_size must be >= 1, "
                             f"got {kernel_size}, {stride}, {batch_size}")
        self.dataset, self.kernel_size, self.stride, self.activation = dataset, kernel_size, stride, activation
        self.batch_size, self.data_seed = batch_size, data_seed
        x, y, x_test, y_test = load_dataset(dataset, data_seed)
        self._x, self._y, self._x_test, self._y_test = x, y, x_test, y_test
        self.num_classes = int(y.max()) + 1
        self.loss_scale = math.log(self.num_classes)
        self.name = f"cnn_{dataset}_{'x'.join(map(str, self.channels))}_k{kernel_size}_{activation}"

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A ``CNNTask`` of ``num_instances`` instances.

        Args:
            num_instances: ``n``.
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            A ``CNNTask`` of ``n`` instances.
        Raises:
            ValueError: ``num_instances < 1``.
        """
        if num_instances < 1:
            raise ValueError(f"CNNFamily.sample: num_instances must be >= 1, got {num_instances}")
        return CNNTask(self.channels, self.kernel_size, self.stride, self.activation, self.num_classes,
                       self._x, self._y, self.batch_size, num_instances, self._x_test, self._y_test)
