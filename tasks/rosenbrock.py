"""Shifted and scaled Rosenbrock functions (Rosenbrock 1960, "An automatic method for finding
the greatest or least value of a function", The Computer Journal 3(3)), in the chained
d-dimensional form of scipy.optimize.rosen::

    R(z) = sum_{i<d} b (z_{i+1} - z_i^2)^2 + (1 - z_i)^2,     minimum R(1) = 0.

Instance k is ``f_k(θ) = s_k R(θ - c_k + 1)``: its minimiser is ``θ* = c_k`` with ``f_k(θ*) = 0``.
The curved, narrow valley makes it a standard hard case for first-order methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learnopt.task import Params, Task, generator_device, seeded_generator

_NORMALISER_DRAWS = 4096


def rosenbrock(z: Tensor, b: float = 100.0) -> Tensor:
    """The chained Rosenbrock function over the last dimension of ``z``.

    Args:
        z: ``[..., d]`` points, ``d >= 2``.
        b: the valley coefficient.
    Returns:
        ``[...]``.
    """
    head, tail = z[..., :-1], z[..., 1:]
    return (b * (tail - head * head) ** 2 + (1 - head) ** 2).sum(-1)


@dataclass
class RosenbrockTask:
    """``num_instances`` Rosenbrock functions; parameter ``theta``: [n, d], initialised
    N(0, ``init_std``²) independently of the shift.

    Args:
        shift: ``[n, d]``, the minimisers.
        scale: ``[n]``, the output scales.
        b: the valley coefficient.
        init_std: standard deviation of the initial ``theta``.
        loss_scale: what ``normalize`` divides by.
    """

    shift: Tensor
    scale: Tensor
    b: float = 100.0
    init_std: float = 1.0
    loss_scale: float = 1.0

    @property
    def num_instances(self) -> int:
        """Number of functions ``n``."""
        return self.shift.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``d`` of ``theta``."""
        return self.shift.shape[-1]

    def init(self, generator: torch.Generator | None = None) -> Params:
        """``theta`` drawn from N(0, ``init_std``²).

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``{"theta": [n, d]}``.
        """
        theta = torch.randn(self.shift.shape, generator=generator, device=generator_device(generator),
                            dtype=torch.float32)
        return {"theta": (self.init_std * theta).to(self.shift)}

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """``scale · R(theta − shift + 1)`` per instance.

        Args:
            params: the parameters, as ``init`` returns them.
            batch: unused.
        Returns:
            ``[num_instances]`` losses.
        """
        return self.scale * rosenbrock(params["theta"] - self.shift + 1, self.b)

    def sample_batch(self, generator: torch.Generator | None = None) -> None:
        """None: the loss is deterministic.

        Args:
            generator: unused.
        """
        return None

    def optimum(self) -> Tensor:
        """The closed-form minimiser ``θ* = shift`` ([n, d]); the minimum is 0.

        Returns:
            ``[n, d]``.
        """
        return self.shift.clone()

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RosenbrockTask:
        """The same functions on ``device`` / in ``dtype``.

        Args:
            device: the device of the data (None: unchanged).
            dtype: the dtype of the floating data (None: unchanged).
        Returns:
            A ``RosenbrockTask`` with the same instances.
        """
        return RosenbrockTask(self.shift.to(device=device, dtype=dtype), self.scale.to(device=device, dtype=dtype),
                              self.b, self.init_std, self.loss_scale)


class RosenbrockFamily:
    """Rosenbrock functions in ``dim`` dimensions with valley coefficient ``b`` (100 is the
    classic one). Each instance draws a minimiser ``c ~ N(0, shift_std² I)`` and an output scale
    ``s`` log-uniform in ``scale_range``; ``θ₀ ~ N(0, init_std² I)``.

    ``normalize`` divides by ``loss_scale``, the median initial loss of 4,096 instances drawn
    from a fixed seed (the median because the quartic makes the mean heavy-tailed).

    Args:
        dim: ``d >= 2``.
        b: the valley coefficient.
        shift_std: standard deviation of the minimisers.
        scale_range: ``(low, high)`` of the log-uniform output scale.
        init_std: standard deviation of θ₀.
        dtype: dtype of the tasks' data.
    Raises:
        ValueError: ``dim < 2``, ``b <= 0``, a negative standard deviation or a bad ``scale_range``.
    """

    def __init__(
        self,
        dim: int = 2,
        b: float = 100.0,
        shift_std: float = 1.0,
        scale_range: tuple[float, float] = (0.1, 10.0),
        init_std: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dim < 2:
            raise ValueError(f"RosenbrockFamily: dim must be >= 2 (the function couples neighbours), got {dim}")
        if b <= 0:
            raise ValueError(f"RosenbrockFamily: b must be > 0, got {b}")
        if shift_std < 0 or init_std < 0:
            raise ValueError(f"RosenbrockFamily: shift_std and init_std must be >= 0, got {shift_std}, {init_std}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"RosenbrockFamily: scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.dim, self.b, self.shift_std, self.init_std, self.dtype = dim, float(b), shift_std, init_std, dtype
        self.scale_range = (lo, hi)
        self.name = f"rosenbrock{dim}"
        self.loss_scale = self._median_initial_loss()

    def _draw(self, num_instances: int, generator: torch.Generator | None, dtype: torch.dtype) -> RosenbrockTask:
        where = generator_device(generator)
        shift = self.shift_std * torch.randn(num_instances, self.dim, generator=generator, device=where,
                                             dtype=torch.float32)
        lo, hi = torch.log(torch.tensor(self.scale_range))
        scale = torch.exp(lo + (hi - lo) * torch.rand(num_instances, generator=generator, device=where,
                                                      dtype=torch.float32))
        return RosenbrockTask(shift.to(dtype), scale.to(dtype), self.b, self.init_std)

    def _median_initial_loss(self) -> float:
        g = seeded_generator("rosenbrock-normaliser", self.dim)
        task = self._draw(_NORMALISER_DRAWS, g, torch.float64)
        return float(task.loss(task.init(g)).median())

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A ``RosenbrockTask`` of ``num_instances`` instances.

        Args:
            num_instances: ``n``.
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            A ``RosenbrockTask`` of ``n`` instances.
        Raises:
            ValueError: ``num_instances < 1``.
        """
        if num_instances < 1:
            raise ValueError(f"RosenbrockFamily.sample: num_instances must be >= 1, got {num_instances}")
        task = self._draw(num_instances, generator, self.dtype)
        task.loss_scale = self.loss_scale
        return task
