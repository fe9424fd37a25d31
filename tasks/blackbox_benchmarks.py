"""Standard black-box optimisation test functions, the non-GP test problems of Chen et al. 2017,
"Learning to Learn without Gradient Descent by Gradient Descent" (ICML, arXiv 1611.03824):
Branin, Goldstein–Price, Hartmann3 and Hartmann6.

Definitions, domains and optima follow Surjanovic & Bingham, "Virtual Library of Simulation
Experiments" (sfu.ca/~ssurjano), and Dixon & Szegő 1978, "The global optimization problem: an
introduction" (Towards Global Optimisation 2). Each benchmark is a callable taking ``x``
``[..., dim]`` in its own domain and returning ``[...]``; it carries

``bounds``      ``[2, dim]``: lower row, upper row of the box domain;
``minimum``     the published global minimum value (to published precision);
``minimizers``  ``[k, dim]``: the published global minimisers (to published precision).

``from_unit(u)`` maps ``u`` in ``[0, 1]^dim`` affinely onto the domain, so a proposer trained on
the unit box (``tasks.gp_functions``) can query it; ``unit(u) = f(from_unit(u))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Benchmark:
    """Base: ``bounds``, ``minimum``, ``minimizers``, ``dim``, ``name``; subclasses define ``_f``."""

    name: str = "benchmark"
    minimum: float
    _bounds: tuple[tuple[float, ...], ...]
    _minimizers: tuple[tuple[float, ...], ...]

    @property
    def dim(self) -> int:
        """The dimension of the domain."""
        return len(self._bounds[0])

    @property
    def bounds(self) -> Tensor:
        """``[2, dim]`` float64: lower row, upper row."""
        return torch.tensor(self._bounds, dtype=torch.float64)

    @property
    def minimizers(self) -> Tensor:
        """``[k, dim]`` float64: the published global minimisers."""
        return torch.tensor(self._minimizers, dtype=torch.float64)

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        return self._f(x)

    def from_unit(self, u: Tensor) -> Tensor:
        """``u`` in ``[0, 1]^dim`` mapped affinely onto the domain.

        Args:
            u: ``[..., dim]``.
        Returns:
            ``[..., dim]`` in the domain.
        """
        b = self.bounds.to(dtype=u.dtype, device=u.device)
        return b[0] + u * (b[1] - b[0])

    def unit(self, u: Tensor) -> Tensor:
        """``f(from_unit(u))``.

        Args:
            u: ``[..., dim]`` in the unit box.
        Returns:
            ``[...]``.
        """
        return self(self.from_unit(u))

    def _f(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Branin(Benchmark):
    """Branin–Hoo: ``a (x2 − b x1² + c x1 − r)² + s (1 − t) cos x1 + s`` with a = 1,
    b = 5.1/(4π²), c = 5/π, r = 6, s = 10, t = 1/(8π), on [−5, 10] × [0, 15]; minimum
    0.397887 at (−π, 12.275), (π, 2.275), (9.42478, 2.475)."""

    name = "branin"
    minimum = 0.397887
    _bounds = ((-5.0, 0.0), (10.0, 15.0))
    _minimizers = ((-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475))

    def _f(self, x: Tensor) -> Tensor:
        x1, x2 = x[..., 0], x[..., 1]
        b, c, r, s, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
        return (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * torch.cos(x1) + s


class GoldsteinPrice(Benchmark):
    """Goldstein–Price on [−2, 2]²; minimum 3 at (0, −1)."""

    name = "goldstein_price"
    minimum = 3.0
    _bounds = ((-2.0, -2.0), (2.0, 2.0))
    _minimizers = ((0.0, -1.0),)

    def _f(self, x: Tensor) -> Tensor:
        x1, x2 = x[..., 0], x[..., 1]
        a = 1 + (x1 + x2 + 1) ** 2 * (19 - 14 * x1 + 3 * x1**2 - 14 * x2 + 6 * x1 * x2 + 3 * x2**2)
        b = 30 + (2 * x1 - 3 * x2) ** 2 * (18 - 32 * x1 + 12 * x1**2 + 48 * x2 - 36 * x1 * x2 + 27 * x2**2)
        return a * b


class _Hartmann(Benchmark):
    """``−Σ_i α_i exp(−Σ_j A_ij (x_j − P_ij)²)`` on the unit box."""

    _alpha = (1.0, 1.2, 3.0, 3.2)
    _A: tuple[tuple[float, ...], ...]
    _P: tuple[tuple[float, ...], ...]

    def _f(self, x: Tensor) -> Tensor:
        A = torch.tensor(self._A, dtype=x.dtype, device=x.device)
        P = 1e-4 * torch.tensor(self._P, dtype=x.dtype, device=x.device)
        alpha = torch.tensor(self._alpha, dtype=x.dtype, device=x.device)
        inner = (A * (x[..., None, :] - P) ** 2).sum(-1)  # [..., 4]
        return -(alpha * torch.exp(-inner)).sum(-1)


class Hartmann3(_Hartmann):
    """Hartmann 3-d on [0, 1]³; minimum −3.86278 at (0.114614, 0.555649, 0.852547)."""

    name = "hartmann3"
    minimum = -3.86278
    _bounds = ((0.0,) * 3, (1.0,) * 3)
    _minimizers = ((0.114614, 0.555649, 0.852547),)
    _A = ((3.0, 10, 30), (0.1, 10, 35), (3.0, 10, 30), (0.1, 10, 35))
    _P = ((3689, 1170, 2673), (4699, 4387, 7470), (1091, 8732, 5547), (381, 5743, 8828))


class Hartmann6(_Hartmann):
    """Hartmann 6-d on [0, 1]⁶; minimum −3.32237 at
    (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)."""

    name = "hartmann6"
    minimum = -3.32237
    _bounds = ((0.0,) * 6, (1.0,) * 6)
    _minimizers = ((0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573),)
    _A = ((10, 3, 17, 3.5, 1.7, 8), (0.05, 10, 17, 0.1, 8, 14),
          (3, 3.5, 1.7, 10, 17, 8), (17, 8, 0.05, 10, 0.1, 14))
    _P = ((1312, 1696, 5569, 124, 8283, 5886), (2329, 4135, 8307, 3736, 1004, 9991),
          (2348, 1451, 3522, 2883, 3047, 6650), (4047, 8828, 8732, 5743, 1091, 381))


branin = Branin()
goldstein_price = GoldsteinPrice()
hartmann3 = Hartmann3()
hartmann6 = Hartmann6()
BENCHMARKS: dict(str, Benchmark) = {b.name: b for b in (branin, goldstein_price, hartmann3, hartmann6)}
