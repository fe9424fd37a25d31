"""Meta-training and held-out problems for the RNN proposer (Chen et al. 2017).

``GPProposerEpisodes`` is an episode family (``learnopt.meta.episodic``): an episode is one
run of ``horizon`` evaluations of the proposer on a function drawn from a GP prior on
``[0, 1]^dim`` (``tasks.gp_functions``), scored by the meta-loss ``loss`` (``"sum"``, ``"oi"``
or ``"ei"``, see ``learnopt.blackbox.losses``). Training functions are exact GP samples drawn
lazily at the queried points (``sampler="lazy"``), so observations are differentiable in the
queries; ``sampler="rff"`` uses the random-Fourier-feature approximation instead.

Held-out scoring (validation here, the benchmark script for tests) uses RFF samples, which are
ordinary deterministic functions whose minimum and median can be estimated: the *normalised
regret* of a run is ``(best_t − f_min) / (f_median − f_min)``, with ``f_median`` the median of
``f`` over the box (4,096 uniform points) — 0 at the minimum, 1 at a typical point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from learnopt.blackbox.losses import (
    META_LOSSES,
    expected_improvement,
    expected_improvement_loss,
    observed_improvement_loss,
    sum_loss,
)
from learnopt.task import seeded_generator
from tasks.gp_functions import GPFunctionFamily, RFFSample, box_min_estimate

LOSS_SCALES = ("raw", "normalized", "log")


def normalized_regret(best: Tensor, minimum: Tensor, median: Tensor) -> Tensor:
    """``(best − minimum) / (median − minimum)`` per problem.

    Args:
        best: ``[n, ...]`` values.
        minimum: ``[n]``.
        median: ``[n]``.
    Returns:
        ``[n, ...]``.
    """
    shape = (-1,) + (1,) * (best.dim() - 1)
    return (best - minimum.view(shape)) / (median - minimum).view(shape)


def _bowl(x: Tensor, a: Tensor, c: Tensor, m: Tensor | None = None) -> Tensor:
    """``a (x − c)ᵀ M (x − c)`` (``M = I`` when None) for queries ``x [n, ..., d]``, ``a [n]``,
    ``c [n, d]``, ``M [n, d, d]``."""
    extra = [1] * (x.dim() - 2)
    z = x - c.view(c.shape[0], *extra, -1)
    if m is None:
        quad = z.pow(2).sum(-1)
    else:
        quad = torch.einsum("n...i,nij,n...j->n...", z, m, z)
    return a.view(-1, *extra) * quad


@dataclass
class HeldOutGP:
    """``n`` deterministic GP-prior functions with their minimum and median estimates.

    Args:
        functions: the RFF functions.
        minimum: ``[n]`` estimates of their minima over the box.
        median: ``[n]`` their medians over the box.
    """

    functions: RFFSample
    minimum: Tensor  # [n]
    median: Tensor   # [n]

    def __call__(self, x: Tensor) -> Tensor:
        return self.functions(x.to(self.functions.omega.dtype))

    def normalized_regret(self, best: Tensor) -> Tensor:
        """``(best − min) / (median − min)``.

        Args:
            best: ``[n, ...]`` values.
        Returns:
            ``[n, ...]``.
        """
        return normalized_regret(best, self.minimum, self.median)

    def to(self, device: torch.device | str) -> HeldOutGP:
        """The same functions and estimates on ``device`` (the proposer's, for validation).

        Args:
            device: the device.
        Returns:
            A ``HeldOutGP``.
        """
        return HeldOutGP(self.functions.to(device), self.minimum.to(device), self.median.to(device))


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def held_out_gp(family: GPFunctionFamily, num_functions: int, split: str, seed: int = 0,
                num_features: int | None = None) -> HeldOutGP:
    """``num_functions`` RFF functions from the seed stream ``(split, seed)`` with their minimum
    (``tasks.gp_functions.min_estimate``) and median over the box.

    Args:
        family: the GP prior.
        num_functions: ``n``.
        split: the seed stream's name (``"val"``, ``"test"``).
        seed: the seed.
        num_features: RFF features (None: the family's default).
    Returns:
        A ``HeldOutGP``.
    """
    generator = seeded_generator(split, seed, family.dim)
    functions = family.rff(num_functions, generator, num_features=num_features)
    minimum, _ = functions.min_estimate(generator=generator)
    with torch.no_grad():
        u = torch.rand((num_functions, 4096, family.dim), generator=generator, dtype=family.dtype)
        median = functions(u).median(dim=1).values
    return HeldOutGP(functions, minimum, median)


class GPProposerEpisodes:
    """Episodes of ``horizon`` evaluations on GP-prior functions on ``[0, 1]^dim``.

    ``lengthscale_range``, ``signal_variance`` and ``noise`` define the GP prior
    (``tasks.gp_functions.GPFunctionFamily``). ``val_functions`` held-out RFF functions from the
    ``"val"`` stream give ``validation_score``: the median normalised regret at the horizon
    (lower is better; logged as ``val/median_regret``).

    Args:
        dim: the dimension of the box.
        horizon: evaluations per episode.
        loss: ``"sum"``, ``"oi"`` or ``"ei"`` (``learnopt.blackbox.losses``).
        lengthscale_range: ``(low, high)`` of the GP lengthscales.
        signal_variance: the GP's signal variance.
        noise: observation-noise variance.
        sampler: ``"lazy"`` (exact GP samples, queried lazily) or ``"rff"`` (random Fourier features).
        val_functions: held-out functions of ``validation_score``.
        seed: the validation seed.
        bowl_fraction: fraction of episodes with an added bowl (``bowls``).
        bowl_curvature: ``(low, high)`` of the bowl's curvature ``a``.
        bowl_shape: ``"round"`` or ``"elongated"``.
        warp_fraction: fraction of episodes with a warped observation (``warps``).
        warp_strength: ``s``, the warp's range.
        loss_scale: ``"raw"``, ``"normalized"`` (normalised regret) or ``"log"`` (log of the best).
        log_eps: added before the log.
    Raises:
        ValueError: an unknown option, or options that do not go together (``"ei"`` needs
            ``"lazy"`` and no bowls or warps; a scaled loss needs ``"rff"``; ``"log"`` needs ``"oi"``).
    References:
        Chen et al. 2017, arXiv 1611.03824.
    """

    validation_name = "median_regret"

    def __init__(
        self,
        dim: int = 2,
        horizon: int = 50,
        loss: str = "oi",
        lengthscale_range: tuple[float, float] = (0.1, 0.5),
        signal_variance: float = 1.0,
        noise: float = 0.0,
        sampler: str = "lazy",
        val_functions: int = 128,
        seed: int = 0,
        bowl_fraction: float = 0.0,
        bowl_curvature: tuple[float, float] = (2.0, 10.0),
        bowl_shape: str = "round",
        warp_fraction: float = 0.0,
        warp_strength: float = 1.0,
        loss_scale: str = "raw",
        log_eps: float = 1e-3,
    ) -> None:
        if loss not in META_LOSSES:
            raise ValueError(f"GPProposerEpisodes: loss must be one of {META_LOSSES}, got {loss!r}")
        if sampler not in ("lazy", "rff"):
            raise ValueError(f"GPProposerEpisodes: sampler must be 'lazy' or 'rff', got {sampler!r}")
        if loss == "ei" and sampler != "lazy":
            raise ValueError("GPProposerEpisodes: loss 'ei' needs the exact GP posterior (sampler='lazy')")
        if horizon < 1:
            raise ValueError(f"GPProposerEpisodes: horizon must be >= 1, got {horizon}")
        if not 0.0 <= bowl_fraction <= 1.0:
            raise ValueError(f"GPProposerEpisodes: bowl_fraction must be in [0, 1], got {bowl_fraction}")
        if not 0.0 <= bowl_curvature[0] <= bowl_curvature[1]:
            raise ValueError(f"GPProposerEpisodes: bowl_curvature must be 0 <= low <= high, got {bowl_curvature}")
        if bowl_shape not in ("round", "elongated"):
            raise ValueError(f"GPProposerEpisodes: bowl_shape must be 'round' or 'elongated', got {bowl_shape!r}")
        self.bowl_shape = bowl_shape
        if loss == "ei" and bowl_fraction > 0:
            raise ValueError("GPProposerEpisodes: loss 'ei' uses the GP posterior, which does not know the bowls")
        self.bowl_fraction, self.bowl_curvature = float(bowl_fraction), tuple(bowl_curvature)
        if not 0.0 <= warp_fraction <= 1.0 or not 0.0 < warp_strength <= 3.0:
            raise ValueError(f"GPProposerEpisodes: need warp_fraction in [0, 1] and warp_strength in (0, 3], got "
                             f"{warp_fraction}, {warp_strength}")
        if loss == "ei" and warp_fraction > 0:
            raise ValueError("GPProposerEpisodes: loss 'ei' scores the GP posterior, warps change what is observed")
        self.warp_fraction, self.warp_strength = float(warp_fraction), float(warp_strength)
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"GPProposerEpisodes: loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
        if loss_scale != "raw" and sampler != "rff":
            raise ValueError(f"GPProposerEpisodes: loss_scale {loss_scale!r} needs each function's minimum and median "
                             "over the box, which only sampler='rff' functions have")
        if loss_scale == "log" and loss != "oi":
            raise ValueError(f"GPProposerEpisodes: loss_scale 'log' is the log of L_OI's best value, not defined for "
                             f"loss {loss!r}")
        if not log_eps > 0:
            raise ValueError(f"GPProposerEpisodes: log_eps must be > 0, got {log_eps}")
        self.loss_scale, self.log_eps = loss_scale, float(log_eps)
        self.dim, self.horizon, self.loss, self.sampler = dim, horizon, loss, sampler
        self.lengthscale_range = tuple(lengthscale_range)
        self.signal_variance, self.noise = signal_variance, noise
        self.val_functions, self.seed = val_functions, seed
        self.gp = GPFunctionFamily(dim, lengthscale_range, signal_variance, noise)
        self.name = f"gp{dim}_proposer"
        self._val: HeldOutGP | None = None

    def _check(self, model: nn.Module) -> None:
        if getattr(model, "dim", self.dim) != self.dim:
            raise ValueError(f"GPProposerEpisodes: the proposer is for dimension {model.dim}, the episodes are "
                             f"{self.dim}-dimensional")

    def bowls(self, num_episodes: int, generator: torch.Generator, dtype: torch.dtype):
        """The training functions' optional bowls: a fraction ``bowl_fraction`` of the episodes
        get ``a ‖x − c‖²`` added (``bowl_shape="round"``), ``a ~ U[bowl_curvature]``,
        ``c ~ U[0.15, 0.85]^dim``, so their minimum tends to lie inside the box. With
        ``"elongated"`` the bowl is ``a (x − c)ᵀ Q diag(e) Qᵀ (x − c)``, ``Q`` a random rotation and
        ``e`` log-uniform in [0.02, 1] with its largest entry 1: long curved valleys as well as
        round basins. A zero-mean stationary GP sample has its minimum over the box on the box's
        boundary far more often than a typical test function, and a proposer trained on those
        alone learns to search the faces and edges of the box (``docs/blackbox/training.md``).

        Returns:
            ``(a [n], c [n, dim], M [n, dim, dim] or None)``, or None without bowls.

        Args:
            num_episodes: ``n``.
            generator: the source of the draw.
            dtype: the dtype.
        """
        if self.bowl_fraction == 0.0:
            return None
        u = torch.rand(num_episodes, 2, generator=generator, dtype=dtype)
        low, high = self.bowl_curvature
        a = torch.where(u[:, 0] < self.bowl_fraction, low + (high - low) * u[:, 1], torch.zeros_like(u[:, 1]))
        c = 0.15 + 0.7 * torch.rand(num_episodes, self.dim, generator=generator, dtype=dtype)
        if self.bowl_shape == "round":
            return a, c, None
        # q·diag(e)·qᵀ is unchanged by flipping columns of q, so plain QR's q gives the same law
        # as a Haar-random rotation (learnopt.task.haar_orthogonal fixes the signs; not needed here).
        q, _ = torch.linalg.qr(torch.randn(num_episodes, self.dim, self.dim, generator=generator, dtype=dtype))
        e = torch.exp(math.log(0.02) * torch.rand(num_episodes, self.dim, generator=generator, dtype=dtype))
        e = e / e.max(dim=1, keepdim=True).values
        return a, c, q @ torch.diag_embed(e) @ q.transpose(1, 2)

    def warps(self, num_episodes: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor | None:
        """The optional warps of what the proposer observes: a fraction ``warp_fraction`` of the
        episodes observe ``w(f) = (exp(k f) − 1) / k`` instead of ``f``, ``k ~ U[−s, s]``
        (``s = warp_strength``; ``k = 0`` elsewhere, ``w(f) = f``). ``w`` is increasing, so the
        minimiser is the same, but the observed values are skewed and heavy-tailed (``k > 0``:
        flat valleys and steep walls, as in Branin; ``k < 0``: a sharp minimum). The meta-loss is
        scored on ``f`` itself, so every episode keeps the GP prior's scale.

        Returns:
            ``k`` ``[n]``, or None without warps.

        Args:
            num_episodes: ``n``.
            generator: the source of the draw.
            dtype: the dtype.
        """
        if self.warp_fraction == 0.0:
            return None
        u = torch.rand(num_episodes, 2, generator=generator, dtype=dtype)
        k = self.warp_strength * (2 * u[:, 1] - 1)
        return torch.where(u[:, 0] < self.warp_fraction, k, torch.zeros_like(u[:, 1]))

    def meta_loss(self, model: nn.Module, num_episodes: int,
                  generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The meta-loss of one batch of episodes (``loss``, scaled by ``loss_scale``).

        Args:
            model: the proposer (``RNNProposer``).
            num_episodes: episodes in the batch.
            generator: draws the functions, bowls, warps and noise.
        Returns:
            ``(loss, metrics)``: a differentiable scalar and ``best_final``, ``mean_y`` (and ``regret_final``).
        Raises:
            ValueError: the proposer's dimension differs.
        """
        self._check(model)
        eis: list[Tensor] = []
        unwarped: list[Tensor] = []

        def with_bowl(x: Tensor, y: Tensor) -> Tensor:
            return y if bowls is None else y + _bowl(x, *bowls)

        def warp(y: Tensor, k: Tensor | None) -> Tensor:
            if k is None:
                return y
            unwarped.append(y)
            k = k[:, None]
            safe = torch.where(k == 0, torch.ones_like(k), k)
            return torch.where(k == 0, y, torch.expm1(k * y) / safe)

        # drawn from the generator (on its device), then moved to the proposer's device
        device = _device_of(model)

        def moved(t: Tensor | tuple | None):
            return t.to(device) if isinstance(t, Tensor) else None if t is None else tuple(moved(u) for u in t)

        if self.sampler == "rff":
            functions = self.gp.rff(num_episodes, generator).to(device)
            bowls = moved(self.bowls(num_episodes, generator, functions.omega.dtype))
            warps = moved(self.warps(num_episodes, generator, functions.omega.dtype))

            def function(x: Tensor) -> Tensor:  # noise-free and unwarped: what the loss scores
                x = x.to(functions.omega.dtype)
                return with_bowl(x, functions(x))

            def objective(x: Tensor) -> Tensor:
                x = x.to(functions.omega.dtype)
                return warp(with_bowl(x, functions.observe(x, generator)), warps)
        else:
            functions = self.gp.lazy(num_episodes, generator).to(device)
            bowls = moved(self.bowls(num_episodes, generator, functions.lengthscales.dtype))
            warps = moved(self.warps(num_episodes, generator, functions.lengthscales.dtype))

            def objective(x: Tensor) -> Tensor:
                x = x.to(functions.lengthscales.dtype)
                if self.loss == "ei":
                    mean, cov = functions.predict(x)
                    best = (functions.Y.min(1).values[:, None] if functions.Y is not None
                            else mean.new_zeros(mean.shape[0], 1))
                    eis.append(expected_improvement(mean, torch.diagonal(cov, dim1=-2, dim2=-1), best))
                y = functions.query(x)
                return warp(with_bowl(x, y), warps)

        _, ys = model.rollout(objective, num_episodes, self.horizon, generator=generator)
        if unwarped:  # score the functions themselves, not what the proposer observed
            ys = torch.cat(unwarped, dim=1)
        metrics = {"best_final": float(ys.detach().min(1).values.mean()), "mean_y": float(ys.detach().mean())}
        if self.loss_scale != "raw":
            # each function's own scale: (y − min) / (median − min), the benchmark's normalised regret
            minimum, _, values = box_min_estimate(function, num_episodes, self.dim, functions.lengthscales,
                                                  num_candidates=1024, num_starts=4, steps=25,
                                                  generator=generator, dtype=ys.dtype, device=ys.device)
            minimum = torch.minimum(minimum, ys.detach().min(1).values)
            ys = normalized_regret(ys, minimum, values.median(1).values.clamp_min(minimum + 1e-12))
            metrics["regret_final"] = float(ys.detach().min(1).values.median())
        if self.loss_scale == "log":
            loss = torch.log(ys.min(1).values + self.log_eps).mean()
        elif self.loss == "sum":
            loss = sum_loss(ys)
        elif self.loss == "oi":
            loss = observed_improvement_loss(ys)
        else:
            loss = expected_improvement_loss(torch.cat(eis, dim=1))
        return loss.to(model.dtype) if hasattr(model, "dtype") else loss, metrics

    def validation_set(self) -> HeldOutGP:
        """The held-out validation functions (built once, then cached).

        Returns:
            A ``HeldOutGP``.
        """
        if self._val is None:
            self._val = held_out_gp(self.gp, self.val_functions, "val", self.seed)
        return self._val

    @torch.no_grad()
    def validation_score(self, model: nn.Module, generator: Any = None) -> float:
        """Median normalised regret at the horizon on the fixed validation functions.

        Args:
            model: the proposer.
            generator: unused (the noise stream is fixed).
        Returns:
            The score.
        Raises:
            ValueError: the proposer's dimension differs.
        """
        self._check(model)
        val = self.validation_set().to(_device_of(model))
        _, ys = model.rollout(val, self.val_functions, self.horizon, generator=seeded_generator("val-noise", self.seed))
        return float(val.normalized_regret(ys.min(1).values).median())
