"""MLP classifiers on offline datasets (Andrychowicz et al. 2016, §3.2, on digits).

Many instances train at once: each instance has its own weights (leading dimension ``n``)
and its own minibatches, and all share one architecture, so the forward pass is a batched
matmul. Data never downloads (``tasks.datasets``): scikit-learn's bundled 8×8 digits,
``mnist1d`` generated offline, or MNIST / Fashion-MNIST / CIFAR-10 read from the standard
files in ``data_dir``.

Out-of-distribution tests (the paper's §3.2 generalisation study) are families too:
``MLPFamily.out_of_distribution()`` gives the wider, deeper and other-activation variants of
a family. The paper's fourth test, a longer horizon (200 steps after meta-training on 100),
is not a family but an evaluation setting: evaluate the same family for more steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learnopt.task import Params, Task, generator_device
from tasks.datasets import HeldOutClassifier, cross_entropy_per_instance, load_dataset, sample_minibatches

__all__ = ["ACTIVATIONS", "MLPFamily", "MLPTask", "load_dataset"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh,
               "gelu": torch.nn.functional.gelu}


@dataclass
class MLPTask(HeldOutClassifier):
    """``num_instances`` MLPs of one architecture. Parameters ``w{i}``: [n, fan_in, fan_out],
    ``b{i}``: [n, fan_out]; ``loss`` is the mean cross-entropy of each instance on its batch.

    Args:
        sizes: layer widths, inputs first, classes last.
        activation: a key of ``ACTIVATIONS``.
        x: ``[N, d]`` training inputs.
        y: ``[N]`` labels.
        batch_size: ``B``.
        n: number of instances.
        x_test: ``[M, d]`` held-out inputs (None: no test split).
        y_test: ``[M]`` held-out labels.
    """

    sizes: tuple[int, ...]
    activation: str
    x: Tensor
    y: Tensor
    batch_size: int
    n: int
    x_test: Tensor | None = None
    y_test: Tensor | None = None

    @property
    def num_instances(self) -> int:
        """Number of MLPs ``n``."""
        return self.n

    @property
    def loss_scale(self) -> float:
        """log C: the cross-entropy of a uniform prediction, about where training starts."""
        return math.log(self.sizes[-1])

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def init(self, generator: torch.Generator | None = None) -> Params:
        """PyTorch's default ``Linear`` initialisation, U(±1/√fan_in), drawn in float32.

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``{"w{i}": [n, fan_in, fan_out], "b{i}": [n, fan_out]}``.
        """
        params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default range
            where = generator_device(generator)
            params[f"w{i}"] = (torch.rand(self.n, fan_in, fan_out, generator=generator, device=where) * 2 - 1) * bound
            params[f"b{i}"] = (torch.rand(self.n, fan_out, generator=generator, device=where) * 2 - 1) * bound
        # drawn in float32 on the CPU whatever the data's dtype, so a float64 copy starts from
        # the same weights
        return {k: v.to(device=self.x.device, dtype=self.x.dtype) for k, v in params.items()}

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """The logits of every instance.

        Args:
            params: the parameters.
            x: ``[n, B, d]`` per-instance batches or ``[B, d]`` shared.
        Returns:
            ``[n, B, C]``.
        """
        act = ACTIVATIONS[self.activation]
        h = x
        layers = len(self.sizes) - 1
        for i in range(layers):
            w, b = params[f"w{i}"], params[f"b{i}"]
            h = (torch.einsum("bd,ndh->nbh", h, w) if h.dim() == 2 else torch.bmm(h, w)) + b[:, None, :]
            if i < layers - 1:
                h = act(h)
        return h

    def sample_batch(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One minibatch per instance.

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``(x [n, B, d], y [n, B])``.
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
        return cross_entropy_per_instance(self.logits(params, self.x), self.y)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MLPTask:
        """The same instances with their data on ``device`` / in ``dtype``.

        Args:
            device: the device of the data (None: unchanged).
            dtype: the dtype of the floating data (None: unchanged).
        Returns:
            A ``MLPTask`` with the same instances.
        """
        x = self.x.to(device=device, dtype=dtype)
        return MLPTask(self.sizes, self.activation, x, self.y.to(x.device), self.batch_size, self.n, **self._test_to(x))


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"MLPFamily: activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def _check_count(what: str, minimum: int) -> Callable[[int], None]:
    def check(v: int) -> None:
        if int(v) != v or v < minimum:
            raise ValueError(f"MLPFamily: every {what} must be an integer >= {minimum}, got {v!r}")

    return check


def _choices(values: Sequence | None, what: str, check: Callable[[Any], None]) -> tuple | None:
    """``values`` as a validated tuple; ``None`` (nothing sampled) stays ``None``."""
    if values is None:
        return None
    values = tuple(values)
    if not values:
        raise ValueError(f"MLPFamily: {what} must not be empty (use None for a fixed architecture)")
    for v in values:
        check(v)
    return values


def _draw(choices: tuple, generator: torch.Generator | None):
    return choices[int(torch.randint(len(choices), (1,), generator=generator, device=generator_device(generator)))]


class MLPFamily:
    """MLP classifiers on ``dataset`` with ``hidden_sizes`` and ``activation``.

    The paper's base task: digits, one hidden layer of 20 sigmoid units, batch 128. Its
    generalisation tests are other families: ``hidden_sizes=(40,)``, ``(20, 20)``,
    ``activation="relu"`` (``out_of_distribution()`` builds them). Instances differ in initial
    weights and minibatch sequence.

    Sampled architectures: with ``width_choices``, ``depth_choices`` or ``activation_choices``
    each call to ``sample`` draws (from its generator, in that order) a width ``w``, a depth
    ``d`` and an activation, and its instances get ``d`` hidden layers of ``w`` units; all
    instances of one call share that shape, so they still train as one batch. A choice left
    ``None`` is fixed at the constructor's value (width ``hidden_sizes[0]``, depth
    ``len(hidden_sizes)``, ``activation``). Without choices nothing is drawn.

    ``normalize`` divides by log C (the loss of a uniform prediction).

    Args:
        dataset: ``digits``, ``mnist1d``, or ``mnist`` / ``fashion_mnist`` / ``cifar10`` read from the
            standard files in ``data_dir`` (``tasks.datasets``; nothing downloads).
        hidden_sizes: widths of the hidden layers.
        activation: a key of ``ACTIVATIONS``.
        batch_size: minibatch size.
        data_seed: seed of generated or split datasets.
        width_choices: widths ``sample`` draws from (None: fixed).
        depth_choices: depths ``sample`` draws from (None: fixed).
        activation_choices: activations ``sample`` draws from (None: fixed).
        data_dir: the directory of MNIST / Fashion-MNIST / CIFAR-10 files.
    Raises:
        ValueError: an unknown activation or dataset, a size below its minimum, an empty choice
            list, or depth choices without a width.
    References:
        Andrychowicz et al. 2016, arXiv 1606.04474, §3.2.
    """

    def __init__(
        self,
        dataset: str = "digits",
        hidden_sizes: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
        data_seed: int = 0,
        width_choices: Sequence[int] | None = None,
        depth_choices: Sequence[int] | None = None,
        activation_choices: Sequence[str] | None = None,
        data_dir: str | None = None,
    ) -> None:
        _check_activation(activation)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        for h in self.hidden_sizes:
            _check_count("hidden size", 1)(h)
        if batch_size < 1:
            raise ValueError(f"MLPFamily: batch_size must be >= 1, got {batch_size}")
        self.width_choices = _choices(width_choices, "width_choices", _check_count("width", 1))
        self.depth_choices = _choices(depth_choices, "depth_choices", _check_count("depth", 0))
        self.activation_choices = _choices(activation_choices, "activation_choices", _check_activation)
        if self.sampled and self.width_choices is None and not self.hidden_sizes and any(self.depth_choices or ()):
            raise ValueError("MLPFamily: depth_choices without width_choices needs hidden_sizes to fix the width")
        self.dataset = dataset
        self.activation = activation
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.data_dir = None if data_dir is None else str(data_dir)
        x, y, x_test, y_test = load_dataset(dataset, data_seed, self.data_dir)
        self._x, self._y, self._x_test, self._y_test = x, y, x_test, y_test
        self.num_classes = int(y.max()) + 1
        self.loss_scale = math.log(self.num_classes)
        self.name = self._name()

    @property
    def sampled(self) -> bool:
        """Whether ``sample`` draws the architecture."""
        return any(c is not None for c in (self.width_choices, self.depth_choices, self.activation_choices))

    def _name(self) -> str:
        if not self.sampled:
            return f"mlp_{self.dataset}_{'x'.join(map(str, self.hidden_sizes)) or 'linear'}_{self.activation}"
        widths = self.width_choices or self.hidden_sizes[:1]
        depths = self.depth_choices or (len(self.hidden_sizes),)
        acts = self.activation_choices or (self.activation,)
        return f"mlp_{self.dataset}_w{'-'.join(map(str, widths))}_d{'-'.join(map(str, depths))}_{'-'.join(acts)}"

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """An ``MLPTask`` of ``num_instances`` instances.

        Args:
            num_instances: ``n``.
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            A ``MLPTask`` of ``n`` instances.
        Raises:
            ValueError: ``num_instances < 1``.
        """
        if num_instances < 1:
            raise ValueError(f"MLPFamily.sample: num_instances must be >= 1, got {num_instances}")
        hidden, activation = self.hidden_sizes, self.activation
        if self.sampled:
            width = _draw(self.width_choices, generator) if self.width_choices else (hidden[0] if hidden else 0)
            depth = _draw(self.depth_choices, generator) if self.depth_choices else len(hidden)
            if self.activation_choices:
                activation = _draw(self.activation_choices, generator)
            hidden = (int(width),) * int(depth)
        sizes = (self._x.shape[1], *hidden, self.num_classes)
        return MLPTask(sizes, activation, self._x, self._y, self.batch_size, num_instances, self._x_test, self._y_test)

    def _variant(self, **changes: Any) -> MLPFamily:
        kwargs = {"dataset": self.dataset, "hidden_sizes": self.hidden_sizes, "activation": self.activation,
                  "batch_size": self.batch_size, "data_seed": self.data_seed, "width_choices": self.width_choices,
                  "depth_choices": self.depth_choices, "activation_choices": self.activation_choices,
                  "data_dir": self.data_dir, **changes}
        return MLPFamily(**kwargs)

    def out_of_distribution(self) -> dict[str, MLPFamily]:
        """Families outside this one's architectures, for generalisation tests (Andrychowicz et
        al. 2016, §3.2): ``"wider"`` (twice the widest width: 20 → 40 units), ``"deeper"`` (one
        more hidden layer: 20 → 20-20) and ``"activation"`` (activations this family never uses;
        sigmoid → ReLU first, as in the paper). The longer-horizon test is an evaluation setting
        (more steps on this family), not a family.

        Returns:
            ``{"wider", "deeper"[, "activation"]: MLPFamily}``.
        Raises:
            ValueError: the family has no hidden layer.
        """
        others = [a for a in ("relu", "sigmoid", "tanh") if a not in (self.activation_choices or (self.activation,))]
        if not self.sampled:
            if not self.hidden_sizes:
                raise ValueError("out_of_distribution: a linear model has no hidden layer to widen or deepen")
            out = {"wider": self._variant(hidden_sizes=tuple(2 * h for h in self.hidden_sizes)),
                   "deeper": self._variant(hidden_sizes=self.hidden_sizes + self.hidden_sizes[-1:])}
            if others:
                out["activation"] = self._variant(activation=others[0])
            return out
        widths = self.width_choices or self.hidden_sizes[:1]
        depths = self.depth_choices or (len(self.hidden_sizes),)
        if not widths or max(depths) == 0:
            raise ValueError("out_of_distribution: the family has no hidden layer to widen or deepen")
        out = {"wider": self._variant(width_choices=(2 * max(widths),)),
               "deeper": self._variant(depth_choices=(max(depths) + 1,))}
        if others:
            out["activation"] = self._variant(activation_choices=tuple(others), activation=others[0])
        return out
