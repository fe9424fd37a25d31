"""Random quadratics f(θ) = ||Wθ − y||², the first task of Andrychowicz et al. 2016 (arXiv 1606.04474)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from learnopt.task import Params, Task, generator_device


@dataclass
class QuadraticTask:
    """``num_instances`` quadratics; parameter ``theta``: [n, d].

    Args:
        W: ``[n, d, d]``.
        y: ``[n, d]``.
        init_scale: standard deviation of the initial ``theta``.
        loss_scale: what ``normalize`` divides by.
    """

    W: Tensor
    y: Tensor
    init_scale: float = 0.01
    loss_scale: float = 1.0

    @property
    def num_instances(self) -> int:
        """Number of quadratics ``n``."""
        return self.W.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``d`` of ``theta``."""
        return self.W.shape[-1]

    def init(self, generator: torch.Generator | None = None) -> Params:
        """``theta`` drawn from N(0, ``init_scale``²).

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``{"theta": [n, d]}``.
        """
        theta = torch.randn(self.y.shape, generator=generator, dtype=self.y.dtype, device=generator_device(generator))
        return {"theta": self.init_scale * theta.to(self.y.device)}

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """``||W theta − y||²`` per instance.

        Args:
            params: the parameters, as ``init`` returns them.
            batch: unused.
        Returns:
            ``[num_instances]`` losses.
        """
        residual = torch.einsum("nij,nj->ni", self.W, params["theta"]) - self.y
        return (residual * residual).sum(-1)

    def sample_batch(self, generator: torch.Generator | None = None) -> None:
        """None: the loss is deterministic.

        Args:
            generator: unused.
        """
        return None

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> QuadraticTask:
        """The same quadratics on ``device`` / in ``dtype``.

        Args:
            device: the device of the data (None: unchanged).
            dtype: the dtype of the floating data (None: unchanged).
        Returns:
            A ``QuadraticTask`` with the same instances.
        """
        return QuadraticTask(self.W.to(device=device, dtype=dtype), self.y.to(device=device, dtype=dtype),
                             self.init_scale, self.loss_scale)

    def optimum(self) -> Tensor:
        """Closed-form minimiser (least squares), for tests and reporting.

        Returns:
            ``[n, d]``.
        """
        return torch.linalg.lstsq(self.W, self.y.unsqueeze(-1)).solution.squeeze(-1)


class QuadraticFamily:
    """Quadratics with ``dim`` × ``dim`` ``W`` and ``dim``-vector ``y``.

    ``distribution="gaussian"``: W, y i.i.d. N(0, 1), as written in the paper;
    ``distribution="uniform"``: W, y i.i.d. U[0, 1), as in the authors' code (learning-to-learn
    ``problems.quadratic``). θ₀ ~ N(0, ``init_scale``²).

    ``normalize`` divides by ``loss_scale``, the expected initial loss E||Wθ₀ − y||² in closed
    form: with θ₀ independent of zero mean, E(Wθ₀ − y)_i² = E(Wθ₀)_i² + E y_i² =
    d E[W²] s² + E[y²], so ``d (1 + d s²)`` for Gaussian and ``(d / 3)(1 + d s²)`` for uniform
    entries (E[u²] = 1/3), s = ``init_scale``.

    Args:
        dim: ``d``.
        distribution: ``"gaussian"`` or ``"uniform"``.
        init_scale: standard deviation of θ₀.
        dtype: dtype of ``W`` and ``y``.
    Raises:
        ValueError: ``dim < 1`` or an unknown distribution.
    References:
        Andrychowicz et al. 2016, arXiv 1606.04474.
    """

    def __init__(
        self,
        dim: int = 10,
        distribution: Literal["gaussian", "uniform"] = "gaussian",
        init_scale: float = 0.01,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dim < 1:
            raise ValueError(f"QuadraticFamily: dim must be >= 1, got {dim}")
        if distribution not in ("gaussian", "uniform"):
            raise ValueError(f"QuadraticFamily: distribution must be 'gaussian' or 'uniform', got {distribution!r}")
        self.dim = dim
        self.distribution = distribution
        self.init_scale = init_scale
        self.dtype = dtype
        self.name = f"quadratic{dim}_{distribution}"
        second_moment = 1.0 if distribution == "gaussian" else 1.0 / 3.0
        self.loss_scale = dim * second_moment * (1.0 + dim * init_scale**2)

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A ``QuadraticTask`` of ``num_instances`` instances.

        Args:
            num_instances: ``n``.
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            A ``QuadraticTask`` of ``n`` instances.
        """
        draw = torch.randn if self.distribution == "gaussian" else torch.rand
        d = self.dim
        W = draw((num_instances, d, d), generator=generator, device=generator_device(generator), dtype=self.dtype)
        y = draw((num_instances, d), generator=generator, device=generator_device(generator), dtype=self.dtype)
        return QuadraticTask(W, y, self.init_scale, self.loss_scale)
