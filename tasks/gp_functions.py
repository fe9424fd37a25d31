"""Functions drawn from a Gaussian-process prior, the meta-training distribution of the
gradient-free learned optimizers of Chen et al. 2017, "Learning to Learn without Gradient
Descent by Gradient Descent" (ICML, arXiv 1611.03824).

Every instance is a function on the box ``[0, 1]^dim`` drawn from a zero-mean GP with the
squared-exponential (SE, "RBF") kernel with per-dimension lengthscales ℓ (ARD)::

    k(x, x') = σ² exp(-½ Σ_i (x_i - x'_i)² / ℓ_i²),

each instance with its own ℓ, drawn i.i.d. per dimension uniformly from ``lengthscale_range``.
Observations are ``y = f(x) + ε`` with ``ε ~ N(0, noise)`` (``noise`` is a variance).

Two samplers of a batch of ``n`` instances:

``LazyGPSample`` (``GPFunctionFamily.lazy``)
    Exact: values are drawn only where they are queried, by the GP chain rule
    ``p(y_{new} | y_{hist})``, reparameterised as ``y = μ + L_c z`` with ``z ~ N(0, I)`` from a
    generator, so ``y`` is differentiable w.r.t. the queried ``x`` (and through the history,
    w.r.t. earlier queries) — what meta-training by BPTT through the queries needs. Cost grows
    with the number of queried points (one block-Cholesky update per query).
``RFFSample`` (``GPFunctionFamily.rff``)
    Approximate: random Fourier features (Rahimi & Recht 2007),
    ``f(x) = sqrt(2σ²/M) Σ_m w_m cos(ω_m·(x/ℓ) + b_m)``, ``ω_m ~ N(0, I)``,
    ``b_m ~ U[0, 2π)``, ``w_m ~ N(0, 1)``; its covariance tends to the SE kernel as M grows.
    Cheap, differentiable and evaluable anywhere, so its minimum can be estimated
    (``min_estimate``) for regret.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from learnopt.blackbox.gp import robust_cholesky, se_kernel
from learnopt.task import generator_device


def _check_x(x: Tensor, n: int, dim: int, who: str) -> None:
    if x.dim() != 3 or x.shape[0] != n or x.shape[2] != dim or x.shape[1] < 1:
        raise ValueError(f"{who}: x must have shape [num_instances={n}, q>=1, dim={dim}], got {tuple(x.shape)}")


@dataclass
class LazyGPSample:
    """``num_instances`` exact GP sample paths, drawn lazily at queried points.

    ``query(x)`` with ``x`` ``[n, q, dim]`` returns ``y`` ``[n, q]``: a joint draw of the ``q``
    new observations given every observation returned so far (all of them remain part of the
    history). With ``noise == 0`` a repeated point returns its earlier value (up to the jitter,
    a variance of about ``2 · jitter · σ²``). ``jitter`` (relative to ``signal_variance``) is
    added to the diagonal of every conditional covariance for numerical stability.

    The noise ``z`` comes from ``generator`` in query order, so two samples built with equally
    seeded generators and queried alike give identical values (common random numbers).

    Args:
        lengthscales: ``[n, dim]``.
        signal_variance: the prior variance ``σ²``.
        noise: observation-noise variance.
        jitter: relative diagonal jitter.
        generator: draws the observations.
    """

    lengthscales: Tensor
    signal_variance: float = 1.0
    noise: float = 0.0
    jitter: float = 1e-6
    generator: torch.Generator | None = None
    X: Tensor | None = field(default=None, init=False)
    Y: Tensor | None = field(default=None, init=False)
    L: Tensor | None = field(default=None, init=False)

    @property
    def num_instances(self) -> int:
        """Number of sample paths ``n``."""
        return self.lengthscales.shape[0]

    @property
    def dim(self) -> int:
        """The dimension of the box."""
        return self.lengthscales.shape[1]

    @property
    def num_observed(self) -> int:
        """Observations drawn so far per path."""
        return 0 if self.X is None else self.X.shape[1]

    def to(self, device: torch.device | str) -> LazyGPSample:
        """The same sample paths with their tensors on ``device`` (the model's, say); the noise
        still comes from ``generator`` wherever that lives.

        Args:
            device: the device.
        Returns:
            A ``LazyGPSample`` with the same history.
        """
        moved = replace(self, lengthscales=self.lengthscales.to(device))
        moved.X, moved.Y, moved.L = (None if t is None else t.to(device) for t in (self.X, self.Y, self.L))
        return moved

    def _conditional(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Latent prior ``K_xx``, posterior mean and ``A = L⁻¹ K_hx`` (None without history)."""
        x = x.to(self.lengthscales.dtype)
        k_xx = se_kernel(x, x, self.lengthscales, self.signal_variance)
        if self.X is None:
            return k_xx, x.new_zeros(x.shape[:2]), None
        k_hx = se_kernel(self.X, x, self.lengthscales, self.signal_variance)
        A = torch.linalg.solve_triangular(self.L, k_hx, upper=False)  # [n, t, q]
        alpha = torch.linalg.solve_triangular(self.L, self.Y.unsqueeze(-1), upper=False)  # [n, t, 1]
        mean = (A.transpose(-1, -2) @ alpha).squeeze(-1)
        return k_xx, mean, A

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean ``[n, q]`` and covariance ``[n, q, q]`` of the latent ``f(x)`` given the
        history; draws nothing and changes nothing.

        Args:
            x: ``[n, q, dim]`` points in the unit box.
        Returns:
            ``(mean [n, q], cov [n, q, q])``.
        Raises:
            ValueError: ``x`` of another shape.
        """
        _check_x(x, self.num_instances, self.dim, "LazyGPSample.predict")
        k_xx, mean, A = self._conditional(x)
        cov = k_xx if A is None else k_xx - A.transpose(-1, -2) @ A
        return mean, cov

    def query(self, x: Tensor) -> Tensor:
        """Observations at ``x``, drawn jointly given the history and appended to it; differentiable
        w.r.t. ``x``.

        Args:
            x: ``[n, q, dim]`` points in the unit box.
        Returns:
            ``[n, q]``.
        Raises:
            ValueError: ``x`` of another shape.
        """
        _check_x(x, self.num_instances, self.dim, "LazyGPSample.query")
        x = x.to(self.lengthscales.dtype)
        n, q, _ = x.shape
        k_xx, mean, A = self._conditional(x)
        eye = torch.eye(q, dtype=x.dtype, device=x.device)
        cov = k_xx + (self.noise + self.jitter * self.signal_variance) * eye
        if A is not None:
            cov = cov - A.transpose(-1, -2) @ A
        L_c = robust_cholesky(cov, self.jitter * self.signal_variance)
        z = torch.randn((n, q, 1), generator=self.generator, dtype=x.dtype, device=generator_device(self.generator))
        y = mean + (L_c @ z.to(x.device)).squeeze(-1)
        if self.X is None:
            self.X, self.Y, self.L = x, y, L_c
        else:
            t = self.X.shape[1]
            top = torch.cat([self.L, x.new_zeros(n, t, q)], dim=-1)
            bottom = torch.cat([A.transpose(-1, -2), L_c], dim=-1)
            self.X = torch.cat([self.X, x], dim=1)
            self.Y = torch.cat([self.Y, y], dim=1)
            self.L = torch.cat([top, bottom], dim=1)
        return y


@dataclass
class RFFSample:
    """``num_instances`` random-Fourier-feature GP approximations; ``omega`` ``[n, M, d]``,
    ``phase`` ``[n, M]``, ``weights`` ``[n, M]``, ``lengthscales`` ``[n, d]``.

    Args:
        omega: ``[n, M, d]`` frequencies.
        phase: ``[n, M]`` phases.
        weights: ``[n, M]`` feature weights.
        lengthscales: ``[n, d]``.
        signal_variance: the prior variance ``σ²``.
        noise: observation-noise variance (``observe``).
    """

    omega: Tensor
    phase: Tensor
    weights: Tensor
    lengthscales: Tensor
    signal_variance: float = 1.0
    noise: float = 0.0

    @property
    def num_instances(self) -> int:
        """Number of functions ``n``."""
        return self.omega.shape[0]

    @property
    def num_features(self) -> int:
        """``M``, random features per function."""
        return self.omega.shape[1]

    def to(self, device: torch.device | str) -> RFFSample:
        """The same functions with their tensors on ``device``.

        Args:
            device: the device.
        Returns:
            An ``RFFSample``.
        """
        return replace(self, omega=self.omega.to(device), phase=self.phase.to(device),
                       weights=self.weights.to(device), lengthscales=self.lengthscales.to(device))

    @property
    def dim(self) -> int:
        """The dimension of the box."""
        return self.omega.shape[2]

    def features(self, x: Tensor) -> Tensor:
        """``sqrt(2σ²/M) cos(ω·(x/ℓ) + b)``, so ``f = features @ weights``.

        Args:
            x: ``[n, q, dim]`` points in the unit box.
        Returns:
            ``[n, q, M]``.
        Raises:
            ValueError: ``x`` of another shape.
        """
        _check_x(x, self.num_instances, self.dim, "RFFSample")
        x = x.to(self.omega.dtype) / self.lengthscales[:, None, :]
        scale = math.sqrt(2.0 * self.signal_variance / self.num_features)
        return scale * torch.cos(x @ self.omega.transpose(-1, -2) + self.phase[:, None, :])

    def __call__(self, x: Tensor) -> Tensor:
        """Noise-free ``f(x)``, ``[n, q]`` for ``x`` ``[n, q, dim]``; differentiable."""
        return (self.features(x) @ self.weights.unsqueeze(-1)).squeeze(-1)

    def observe(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``f(x) + ε``, ``ε ~ N(0, noise)``.

        Args:
            x: ``[n, q, dim]`` points in the unit box.
            generator: draws the noise.
        Returns:
            ``[n, q]``.
        Raises:
            ValueError: ``x`` of another shape.
        """
        y = self(x)
        if self.noise == 0.0:
            return y
        eps = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=generator_device(generator))
        return y + math.sqrt(self.noise) * eps.to(y.device)

    def min_estimate(self, **kwargs) -> tuple[Tensor, Tensor]:
        """See the module-level ``min_estimate``.

        Args:
            **kwargs: ``box_min_estimate``'s options.
        Returns:
            ``(values [n], points [n, dim])``.
        """
        return min_estimate(self, **kwargs)


def min_estimate(sample: RFFSample, **options) -> tuple[Tensor, Tensor]:
    """An *estimate* of each instance's global minimum over ``[0, 1]^dim``: ``(values [n],
    points [n, dim])``, detached.

    Dense uniform random search (``num_candidates`` points per instance), then the best
    ``num_starts`` candidates are refined by projected Adam on ``f`` (step ``lr × ℓ`` per
    coordinate, cosine-decayed, iterates clamped to the box) for ``steps`` steps. The result is
    the best point seen, so it never exceeds the random-search minimum, but it is only an
    upper bound on the true minimum (a narrow basin missed by every candidate stays missed);
    regret computed against it can therefore be slightly negative. ``options``: those of
    ``box_min_estimate`` (``num_candidates=4096, num_starts=8, steps=100, lr=0.1, generator,
    chunk=1024``).

    Args:
        sample: the functions.
        **options: ``box_min_estimate``'s options.
    Returns:
        ``(values [n], points [n, dim])``, detached.
    """
    vals, pts, _ = box_min_estimate(sample, sample.num_instances, sample.dim, sample.lengthscales.detach(),
                                    dtype=sample.omega.dtype, device=sample.omega.device, **options)
    return vals, pts


def box_min_estimate(
    f: Callable[[Tensor], Tensor],
    n: int,
    dim: int,
    step_scale: Tensor | float = 1.0,
    num_candidates: int = 4096,
    num_starts: int = 8,
    steps: int = 100,
    lr: float = 0.1,
    generator: torch.Generator | None = None,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``min_estimate`` for any batch of ``n`` functions ``f`` (``[n, q, dim] → [n, q]``,
    differentiable) on ``[0, 1]^dim``; Adam's step per coordinate is ``lr × step_scale``
    (``[n, dim]`` or a number). Returns ``(values [n], points [n, dim], candidate values
    [n, num_candidates])``, all detached; the candidate values are ``f`` at uniform points, so
    their median estimates ``f``'s median over the box.

    Args:
        f: ``[n, q, dim] -> [n, q]``, differentiable.
        n: number of functions.
        dim: the dimension.
        step_scale: ``[n, dim]`` or a number, multiplies ``lr``.
        num_candidates: uniform random points per function.
        num_starts: best candidates refined.
        steps: Adam steps.
        lr: Adam's step, relative to ``step_scale``.
        generator: draws the candidates.
        chunk: candidates evaluated per call of ``f``.
        dtype: dtype of the points.
        device: device of the points.
    Returns:
        ``(values [n], points [n, dim], candidate values [n, num_candidates])``, detached.
    Raises:
        ValueError: a count below its minimum.
    """
    if num_candidates < 1 or num_starts < 1 or steps < 0 or chunk < 1:
        raise ValueError("min_estimate: num_candidates, num_starts, chunk must be >= 1 and steps >= 0")
    with torch.no_grad():
        cand = torch.rand((n, num_candidates, dim), generator=generator, dtype=dtype,
                          device=generator_device(generator)).to(device)
        vals = torch.cat([f(cand[:, i:i + chunk]) for i in range(0, num_candidates, chunk)], dim=1).detach()
        k = min(num_starts, num_candidates)
        top = vals.topk(k, dim=1, largest=False).indices
        starts = torch.gather(cand, 1, top.unsqueeze(-1).expand(n, k, dim))
    best_vals, best_idx = vals.min(dim=1)
    best_pts = cand[torch.arange(n, device=cand.device), best_idx]
    if steps > 0:
        z = starts.clone().requires_grad_(True)
        step = torch.as_tensor(step_scale, dtype=dtype, device=cand.device)
        step = lr * (step[:, None, :] if step.dim() == 2 else step)
        m = torch.zeros_like(z)
        v = torch.zeros_like(z)
        b1, b2, eps = 0.9, 0.999, 1e-12
        with torch.enable_grad():
            for t in range(1, steps + 1):
                (g,) = torch.autograd.grad(f(z).sum(), z)
                with torch.no_grad():
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    scale = 0.5 * (1 + math.cos(math.pi * (t - 1) / steps))
                    upd = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                    z.sub_(scale * step * upd).clamp_(0.0, 1.0)
        with torch.no_grad():
            z = z.detach()
            refined = f(z)
            r_vals, r_idx = refined.min(dim=1)
            r_pts = z[torch.arange(n, device=z.device), r_idx]
            better = r_vals < best_vals
            best_vals = torch.where(better, r_vals, best_vals)
            best_pts = torch.where(better[:, None], r_pts, best_pts)
    return best_vals.detach(), best_pts.detach(), vals


class GPFunctionFamily:
    """GP-prior functions on ``[0, 1]^dim`` (Chen et al. 2017, arXiv 1611.03824); see the
    module docstring.

    Args:
        dim: the dimension of the box.
        lengthscale_range: ``(lo, hi)``: each instance's per-dimension lengthscales are i.i.d.
            ``U[lo, hi]`` (``lo == hi`` fixes them); ``(0.1, 0.5)`` gives a few to about ten bumps
            per unit edge.
        signal_variance: the prior variance ``σ²``.
        noise: observation-noise variance.
        num_features: ``M`` of the RFF sampler.
        jitter: relative diagonal jitter of the lazy sampler.
        dtype: dtype of the draws (float64 by default: the lazy sampler's growing Cholesky needs it).
    Raises:
        ValueError: a non-positive dimension, variance, feature count or lengthscale range, or a
            negative noise or jitter.
    """

    def __init__(
        self,
        dim: int = 2,
        lengthscale_range: tuple[float, float] = (0.1, 0.5),
        signal_variance: float = 1.0,
        noise: float = 0.0,
        num_features: int = 256,
        jitter: float = 1e-6,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if dim < 1:
            raise ValueError(f"GPFunctionFamily: dim must be >= 1, got {dim}")
        lo, hi = lengthscale_range
        if not (0 < lo <= hi):
            raise ValueError(f"GPFunctionFamily: need 0 < lo <= hi for lengthscale_range, got {lengthscale_range}")
        if signal_variance <= 0:
            raise ValueError(f"GPFunctionFamily: signal_variance must be > 0, got {signal_variance}")
        if noise < 0:
            raise ValueError(f"GPFunctionFamily: noise must be >= 0, got {noise}")
        if num_features < 1:
            raise ValueError(f"GPFunctionFamily: num_features must be >= 1, got {num_features}")
        if jitter < 0:
            raise ValueError(f"GPFunctionFamily: jitter must be >= 0, got {jitter}")
        self.dim = dim
        self.lengthscale_range = (float(lo), float(hi))
        self.signal_variance = float(signal_variance)
        self.noise = float(noise)
        self.num_features = num_features
        self.jitter = jitter
        self.dtype = dtype
        self.name = f"gp{dim}_se"

    @property
    def bounds(self) -> Tensor:
        """The search box, ``[2, dim]``: lower row zeros, upper row ones.

        Returns:
            ``[2, dim]``.
        """
        return torch.stack([torch.zeros(self.dim, dtype=self.dtype), torch.ones(self.dim, dtype=self.dtype)])

    def _lengthscales(self, num_instances: int, generator: torch.Generator | None,
                      lengthscales: Tensor | None) -> Tensor:
        if num_instances < 1:
            raise ValueError(f"GPFunctionFamily: num_instances must be >= 1, got {num_instances}")
        if lengthscales is not None:
            ls = torch.as_tensor(lengthscales, dtype=self.dtype, device=generator_device(generator))
            if ls.dim() == 0:
                ls = ls.expand(num_instances, self.dim)
            if ls.shape != (num_instances, self.dim) or not bool((ls > 0).all()):
                raise ValueError(f"GPFunctionFamily: lengthscales must be positive, [n, dim] = "
                                 f"[{num_instances}, {self.dim}] or a scalar, got shape {tuple(ls.shape)}")
            return ls.clone()
        lo, hi = self.lengthscale_range
        u = torch.rand((num_instances, self.dim), generator=generator, dtype=self.dtype,
                       device=generator_device(generator))
        return lo + (hi - lo) * u

    def lazy(self, num_instances: int, generator: torch.Generator | None = None,
             lengthscales: Tensor | None = None) -> LazyGPSample:
        """``num_instances`` exact lazily-sampled GP functions; ``generator`` draws their
        lengthscales (unless given) and, later, every query's noise.

        Args:
            num_instances: ``n``.
            generator: draws the lengthscales and the noise.
            lengthscales: ``[n, dim]`` or a scalar (None: drawn).
        Returns:
            A ``LazyGPSample``.
        Raises:
            ValueError: ``num_instances < 1`` or bad lengthscales.
        """
        ls = self._lengthscales(num_instances, generator, lengthscales)
        return LazyGPSample(ls, self.signal_variance, self.noise, self.jitter, generator)

    def rff(self, num_instances: int, generator: torch.Generator | None = None,
            lengthscales: Tensor | None = None, num_features: int | None = None) -> RFFSample:
        """``num_instances`` random-Fourier-feature GP approximations.

        Args:
            num_instances: ``n``.
            generator: draws the lengthscales and features.
            lengthscales: ``[n, dim]`` or a scalar (None: drawn).
            num_features: ``M`` (None: the family's).
        Returns:
            An ``RFFSample``.
        Raises:
            ValueError: ``num_instances < 1``, bad lengthscales or ``M < 1``.
        """
        ls = self._lengthscales(num_instances, generator, lengthscales)
        M = self.num_features if num_features is None else num_features
        if M < 1:
            raise ValueError(f"GPFunctionFamily.rff: num_features must be >= 1, got {M}")
        dev = generator_device(generator)
        omega = torch.randn((num_instances, M, self.dim), generator=generator, dtype=self.dtype, device=dev)
        phase = 2 * math.pi * torch.rand((num_instances, M), generator=generator, dtype=self.dtype, device=dev)
        weights = torch.randn((num_instances, M), generator=generator, dtype=self.dtype, device=dev)
        return RFFSample(omega, phase, weights, ls.to(dev), self.signal_variance, self.noise)

    def kernel(self, x1: Tensor, x2: Tensor, lengthscales: Tensor) -> Tensor:
        """The family's SE kernel, ``[n, a, b]``.

        Args:
            x1: ``[n, a, dim]``.
            x2: ``[n, b, dim]``.
            lengthscales: ``[n, dim]``.
        Returns:
            ``[n, a, b]``.
        """
        return se_kernel(x1, x2, lengthscales, self.signal_variance)
