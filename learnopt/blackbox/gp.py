"""Batched Gaussian-process regression and expected-improvement proposals: the GP bandit
baseline of the gradient-free learned optimizers (Spearmint-style GP-EI; Snoek et al. 2012).

Everything works on ``n`` independent problems at once on the unit box ``[0, 1]^D``:
observations ``X`` ``[n, t, D]``, ``Y`` ``[n, t]``. The model is a zero-mean GP with an ARD
squared-exponential kernel, signal variance ``σ²`` and observation-noise variance; with
``fit=True`` observations are standardised and (log lengthscales, log σ², log noise) are set
by maximising the log marginal likelihood with Adam, warm-started from the previous fit (what
"GP-EI with fitted hyperparameters" means here). The next query maximises EI over dense random
candidates plus perturbations of the incumbent, refined by projected Adam on EI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from learnopt.blackbox.losses import expected_improvement


def se_kernel(x1: Tensor, x2: Tensor, lengthscales: Tensor, signal_variance: float | Tensor = 1.0) -> Tensor:
    """ARD SE kernel matrix ``[n, a, b]`` between ``x1`` ``[n, a, D]`` and ``x2`` ``[n, b, D]``,
    with per-instance lengthscales ``[n, D]`` and signal variance (a number or ``[n]``). Uses
    explicit differences (exact zero distance for repeated points, well-defined gradients).

    Args:
        x1: ``[n, a, D]``.
        x2: ``[n, b, D]``.
        lengthscales: ``[n, D]``.
        signal_variance: a number or ``[n]``.
    Returns:
        ``[n, a, b]``.
    """
    diff = (x1[:, :, None, :] - x2[:, None, :, :]) / lengthscales.to(x1.dtype)[:, None, None, :]
    if isinstance(signal_variance, Tensor):
        signal_variance = signal_variance[:, None, None]
    return signal_variance * torch.exp(-0.5 * (diff * diff).sum(-1))


def robust_cholesky(matrix: Tensor, jitter: float, tries: int = 5) -> Tensor:
    """Cholesky factor of a (batched) symmetric matrix; on failure adds ``jitter`` to the
    diagonal, then 10× more each further try.

    Args:
        matrix: ``[..., t, t]`` symmetric.
        jitter: the first diagonal increment.
        tries: attempts with jitter.
    Returns:
        The lower Cholesky factor.
    Raises:
        RuntimeError: every attempt failed.
    """
    matrix = 0.5 * (matrix + matrix.transpose(-1, -2))
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    extra = 0.0
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(matrix + extra * eye)
        if not bool((info > 0).any()):
            return L
        extra = jitter if extra == 0.0 else 10.0 * extra
    raise RuntimeError(f"Cholesky failed even with added jitter {extra:g}; the points may be degenerate")


@dataclass
class GPHyperparameters:
    """Per-instance hyperparameters of the ARD SE kernel GP.

    Attributes:
        lengthscales: ``[n, D]``.
        signal_variance: ``[n]``.
        noise: ``[n]``, the observation-noise variance.
    """

    lengthscales: Tensor     # [n, D]
    signal_variance: Tensor  # [n]
    noise: Tensor            # [n], observation-noise variance


class GPPosterior:
    """Posterior of the latent function given ``X``, ``Y`` (already standardised if wanted).

    Args:
        X: ``[n, t, D]`` inputs.
        Y: ``[n, t]`` observations.
        hp: the hyperparameters.
        jitter: added to the diagonal, relative to the signal variance.
    """

    def __init__(self, X: Tensor, Y: Tensor, hp: GPHyperparameters, jitter: float = 1e-6) -> None:
        self.X, self.hp = X, hp
        t = X.shape[1]
        K = se_kernel(X, X, hp.lengthscales, hp.signal_variance)
        eye = torch.eye(t, dtype=X.dtype, device=X.device)
        K = K + (hp.noise + jitter * hp.signal_variance)[:, None, None] * eye
        self.L = robust_cholesky(K, 1e-8, tries=6)
        self.alpha = torch.cholesky_solve(Y.unsqueeze(-1), self.L)  # K⁻¹ y

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance ``[n, c]`` of the latent function at ``x`` ``[n, c, D]``.

        Args:
            x: ``[n, c, D]``.
        Returns:
            ``(mean, var)``, each ``[n, c]``.
        """
        k = se_kernel(self.X, x, self.hp.lengthscales, self.hp.signal_variance)  # [n, t, c]
        mean = (k.transpose(-1, -2) @ self.alpha).squeeze(-1)
        v = torch.linalg.solve_triangular(self.L, k, upper=False)
        var = self.hp.signal_variance[:, None] - (v * v).sum(1)
        return mean, var.clamp_min(1e-12)


def log_marginal_likelihood(X: Tensor, Y: Tensor, hp: GPHyperparameters) -> Tensor:
    """``[n]`` log p(Y | X, hp).

    Args:
        X: ``[n, t, D]`` inputs.
        Y: ``[n, t]`` observations.
        hp: the hyperparameters.
    Returns:
        ``[n]``.
    """
    t = X.shape[1]
    post = GPPosterior(X, Y, hp)
    fit = -0.5 * (Y.unsqueeze(-1) * post.alpha).sum((1, 2))
    logdet = torch.log(torch.diagonal(post.L, dim1=-2, dim2=-1)).sum(-1)
    return fit - logdet - 0.5 * t * math.log(2 * math.pi)


def fit_hyperparameters(X: Tensor, Y: Tensor, init: GPHyperparameters, steps: int = 50,
                        lr: float = 0.05) -> GPHyperparameters:
    """Maximise the log marginal likelihood over log lengthscales (in [0.01, 10]), log σ² (in
    [0.01, 100]) and log noise (in [1e-6, 1]) with Adam from ``init``; batched over problems.

    Args:
        X: ``[n, t, D]`` inputs.
        Y: ``[n, t]`` observations.
        init: the starting hyperparameters.
        steps: Adam steps.
        lr: Adam's learning rate.
    Returns:
        The fitted ``GPHyperparameters`` (detached).
    """
    raw = [torch.log(init.lengthscales).detach().clone().requires_grad_(True),
           torch.log(init.signal_variance).detach().clone().requires_grad_(True),
           torch.log(init.noise).detach().clone().requires_grad_(True)]
    limits = [(math.log(0.01), math.log(10.0)), (math.log(0.01), math.log(100.0)), (math.log(1e-6), 0.0)]
    opt = torch.optim.Adam(raw, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            hp = GPHyperparameters(*(torch.exp(r) for r in raw))
            loss = -log_marginal_likelihood(X, Y, hp).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for r, (lo, hi) in zip(raw, limits):
                    r.clamp_(lo, hi)
    return GPHyperparameters(*(torch.exp(r.detach()) for r in raw))


@torch.no_grad()
def propose_ei(post: GPPosterior, best: Tensor, generator: torch.Generator, num_candidates: int = 2048,
               num_local: int = 256, refine_steps: int = 20, refine_starts: int = 4) -> Tensor:
    """The EI-maximising next query ``[n, 1, D]`` (see the module docstring).

    Args:
        post: the GP posterior.
        best: ``[n]`` the incumbent.
        generator: the source of the random candidates.
        num_candidates: uniform random candidates.
        num_local: Gaussian perturbations of the incumbent (at scales 0.01, 0.05, 0.2).
        refine_steps: Adam steps on EI from the best candidates.
        refine_starts: the number of best candidates refined.
    Returns:
        ``[n, 1, D]``.
    """
    n, _, d = post.X.shape
    dtype = post.X.dtype
    cand = torch.rand((n, num_candidates, d), generator=generator, dtype=dtype)
    # Local candidates: Gaussian perturbations of the incumbent at a few scales.
    mean_obs, _ = post.predict(post.X)
    inc = post.X[torch.arange(n), mean_obs.argmin(1)]
    scales = torch.tensor([0.01, 0.05, 0.2], dtype=dtype).repeat_interleave(math.ceil(num_local / 3))[:num_local]
    local = inc[:, None, :] + scales[None, :, None] * torch.randn((n, num_local, d), generator=generator, dtype=dtype)
    cand = torch.cat([cand, local.clamp(0.0, 1.0)], dim=1)
    mean, var = post.predict(cand)
    ei = expected_improvement(mean, var, best[:, None])
    top = ei.topk(refine_starts, dim=1).indices
    z = torch.gather(cand, 1, top[..., None].expand(n, refine_starts, d)).clone()
    if refine_steps > 0:
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.01)
        with torch.enable_grad():
            for _ in range(refine_steps):
                m, v = post.predict(z)
                loss = -expected_improvement(m, v, best[:, None]).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    z.clamp_(0.0, 1.0)
        z = z.detach()
    m, v = post.predict(z)
    ei_z = expected_improvement(m, v, best[:, None])
    best_idx = ei_z.argmax(1)
    return z[torch.arange(n), best_idx][:, None, :]
