"""A compact normalized per-parameter MLP rule with a hand-designed schedule as its prior.

``NormalizedMLPOptimizer`` (``learnopt.learned.general``) reads 24 feature columns per
coordinate through a width-32 MLP; as a drop-in it costs hundreds of Adam steps. This rule keeps
its recipe (features normalized per tensor, a per-coordinate MLP, the nominal Adam term, the
output normalized to unit RMS per tensor, a bounded per-tensor magnitude) with per-coordinate
work close to Adam's: five features, one hidden layer of four units, and the progress features
(per-step scalars) entering as a bias rather than as columns. Its step size follows a
hand-designed warm-up + cosine schedule that the network corrects, so the untrained rule is
per-tensor-normalized Adam on a good schedule and meta-training starts from there. For every
parameter tensor (``batch_dims`` leading instance dimensions excluded from every reduction)::

    m_b   = b m_b + (1 − b) g            for b in momentum_decays     (zero start)
    v     = β₂ v + (1 − β₂) g²,   r = 1 / sqrt(v / (1 − β₂ᵗ) + ε²)
    x     = [g, m_b …, r, m_{adam_decay} · r]                         (the last: Adam's direction)
    x     = x / sqrt(mean_tensor(x²) + 1e-24)                         per feature, per tensor
    c     = [tanh(t / s − 1) for s in step_timescales, 2 t/T − 1, cos(π t/T)]   per step
    h     = relu(W₁ [x, c] + b₁),   (d, μ) = W₂ h + b₂
    d     = d + nominal · x_adam,   d = d / sqrt(mean_tensor(d²) + eps)
    step  = step_mult · schedule(t, T) · exp(magnitude_range · tanh(mean_tensor(μ)))
    θ_{t+1} = θ_t − step · d

``schedule`` is 1 without a run length T, else a linear warm-up over the first ``warmup`` of
the run and a cosine decay to ``final_ratio`` at T (held after T). ``update_fast`` is the same
arithmetic for a caller that needs no graph and has no instance dimension (the drop-in
``torch.optim`` step; tested equal to ``update``): the features of a tensor are rows of one
``[5, n]`` buffer, their per-tensor normalization is folded into the first layer's weights and
the progress columns into its bias, so the MLP is one ``addmm`` and one ``addmv`` per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.general import (
    DIRECTION_EPS,
    GENERAL_TIMESCALES,
    check_parameter,
    progress_features,
)
from learnopt.learned.mlp_lopt import second_moment_normalize
from learnopt.optim.base import GradientTransformation, Params
from learnopt.optim.torch_optimizer import TransformOptimizer

# Scale invariance: a feature of RMS 1e-10 is still normalized to RMS 1 (float32 squares stay
# normal down to ~1e-19 RMS); only an all-zero feature stays zero.
FEATURE_EPS = 1e-24
ADAM_EPS = 1e-8
# Peak step (per-coordinate RMS of the update): the best of 5e-3 … 1e-1 for the untrained rule on
# the meta-training distribution's validation instances (docs/general.md); Celo2's 1e-3 is for
# a rule without a schedule.
COMPACT_STEP_MULT = 1e-2


class CompactState(NamedTuple):
    count: Tensor  # number of previous calls
    momenta: Params  # name -> [len(momentum_decays), *shape]
    second_moment: Params  # name -> [*shape]


def warmup_cosine(count: Tensor | float, num_steps: int | None, warmup: float, final_ratio: float) -> Tensor:
    """The hand-designed schedule: ``min(1, (t + 1) / (warmup · T))`` times a cosine from 1 at
    the end of the warm-up to ``final_ratio`` at ``T`` (held after it); 1 when ``T`` is None.

    Args:
        count: ``t``, the number of previous steps (0-based).
        num_steps: the run length ``T``.
        warmup: the warm-up's share of the run, in [0, 1).
        final_ratio: the schedule's value at and after ``T``.

    Returns:
        A 0-d tensor (float64 when ``count`` is a Python number).
    """
    t = torch.as_tensor(count, dtype=torch.float64)
    if num_steps is None:
        return torch.ones((), dtype=torch.float64)
    w = warmup * num_steps
    ramp = torch.clamp((t + 1.0) / w, max=1.0) if w > 0 else torch.ones_like(t)
    frac = torch.clamp((t - w) / max(num_steps - w, 1e-12), 0.0, 1.0)
    return ramp * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + torch.cos(math.pi * frac)))


class CompactNormalizedOptimizer(LearnedOptimizer):
    """A normalized per-parameter MLP over five features with a learned correction of a
    warm-up + cosine step schedule (module docstring). ``config()`` returns the constructor
    arguments."""

    takes_batch_dims = True  # as_torch_optimizer / load_optimizer accept batch_dims=

    def __init__(
        self,
        hidden_size: int = 4,
        momentum_decays: Sequence[float] = (0.9, 0.99),
        adam_decay: float | None = 0.9,
        second_moment_decay: float = 0.999,
        step_timescales: Sequence[float] = GENERAL_TIMESCALES,
        num_steps: int | None = None,
        step_mult: float = COMPACT_STEP_MULT,
        warmup: float = 0.05,
        final_ratio: float = 0.01,
        magnitude_range: float = math.log(10.0),
        nominal: float = 1.0,
        output_init_scale: float = 0.01,
        batch_dims: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.momentum_decays = [float(b) for b in momentum_decays]
        self.adam_decay = None if adam_decay is None else float(adam_decay)
        self.second_moment_decay = float(second_moment_decay)
        self.step_timescales = [float(s) for s in step_timescales]
        self.num_steps = None if num_steps is None else int(num_steps)
        self.step_mult = float(step_mult)
        self.warmup = float(warmup)
        self.final_ratio = float(final_ratio)
        self.magnitude_range = float(magnitude_range)
        self.nominal = float(nominal)
        self.output_init_scale = float(output_init_scale)
        self.batch_dims = int(batch_dims)
        self.normalize = bool(normalize)
        self._validate()
        moments = [f"momentum_{b:g}" for b in self.momentum_decays]
        self.feature_names = ["grad", *moments, "rsqrt_second_moment"] + (["adam"] if self.adam_decay is not None else [])
        self.progress_names = [f"step_tanh_{s:g}" for s in self.step_timescales]
        if self.num_steps is not None:
            self.progress_names += ["progress", "progress_cos"]
        self._adam_row = None if self.adam_decay is None else self.momentum_decays.index(self.adam_decay)
        self.layers = nn.ModuleList([nn.Linear(self.num_features + len(self.progress_names), self.hidden_size),
                                     nn.Linear(self.hidden_size, 2)])
        with torch.no_grad():  # start near the nominal term alone: per-tensor-normalized Adam
            self.layers[-1].weight.mul_(self.output_init_scale)
            self.layers[-1].bias.zero_()

    def _validate(self) -> None:
        name = type(self).__name__
        if self.hidden_size < 1:
            raise ValueError(f"{name}: hidden_size must be >= 1, got {self.hidden_size}")
        if not all(0.0 <= b < 1.0 for b in [*self.momentum_decays, self.second_moment_decay]):
            raise ValueError(f"{name}: momentum and second-moment decays must lie in [0, 1)")
        if len(set(self.momentum_decays)) != len(self.momentum_decays):
            raise ValueError(f"{name}: a momentum decay is given twice in {self.momentum_decays}")
        if self.adam_decay is None and self.nominal != 0.0:
            raise ValueError(f"{name}: the nominal term needs the Adam direction (adam_decay) or nominal=0")
        if self.adam_decay is not None and self.adam_decay not in self.momentum_decays:
            raise ValueError(f"{name}: adam_decay {self.adam_decay} must be one of momentum_decays "
                             f"{self.momentum_decays}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"{name}: num_steps must be >= 1 or None, got {self.num_steps}")
        if not (0.0 <= self.warmup < 1.0 and 0.0 <= self.final_ratio <= 1.0):
            raise ValueError(f"{name}: warmup must lie in [0, 1) and final_ratio in [0, 1]")
        values = [self.step_mult, self.magnitude_range, self.nominal, self.output_init_scale]
        if not all(math.isfinite(v) for v in values) or self.step_mult <= 0 or self.magnitude_range < 0:
            raise ValueError(f"{name}: step_mult must be > 0, magnitude_range >= 0, all finite; got {values}")
        if self.batch_dims < 0:
            raise ValueError(f"{name}: batch_dims must be >= 0, got {self.batch_dims}")

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "momentum_decays": list(self.momentum_decays),
            "adam_decay": self.adam_decay,
            "second_moment_decay": self.second_moment_decay,
            "step_timescales": list(self.step_timescales),
            "num_steps": self.num_steps,
            "step_mult": self.step_mult,
            "warmup": self.warmup,
            "final_ratio": self.final_ratio,
            "magnitude_range": self.magnitude_range,
            "nominal": self.nominal,
            "output_init_scale": self.output_init_scale,
            "batch_dims": self.batch_dims,
            "normalize": self.normalize,
        }

    @property
    def num_features(self) -> int:
        """Per-coordinate feature columns (the progress columns are per step, not counted)."""
        return len(self.feature_names)

    # -- shared pieces ------------------------------------------------------------------------------
    def init(self, params: Params, batch_dims: int | None = None) -> CompactState:
        """Zero moments for ``params`` (checked with ``check_parameter``)."""
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        for k, p in params.items():
            check_parameter(k, p, batch_dims)
        k_m = len(self.momentum_decays)
        return CompactState(
            torch.zeros((), dtype=torch.int64, device=self.device),
            {k: torch.zeros(k_m, *p.shape, dtype=self.dtype, device=p.device) for k, p in params.items()},
            {k: torch.zeros(p.shape, dtype=self.dtype, device=p.device) for k, p in params.items()},
        )

    def progress(self, count: Tensor, num_steps: int | None) -> Tensor:
        """The per-step inputs ``c`` (module docstring), ``[len(progress_names)]``."""
        count = count.to(self.dtype)
        cols = [torch.tanh(count / s - 1.0) for s in self.step_timescales]
        parts = [torch.stack(cols)] if cols else []
        if self.num_steps is not None:
            parts.append(progress_features(count, num_steps or self.num_steps, self.dtype))
        return torch.cat(parts).to(self.device) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)

    def step_size(self, count: Tensor, num_steps: int | None) -> Tensor:
        """``step_mult · schedule(t, T)`` before the learned per-tensor factor (0-d)."""
        sched = warmup_cosine(count.detach().cpu(), num_steps or self.num_steps, self.warmup, self.final_ratio)
        return (self.step_mult * sched).to(self.dtype).to(self.device)

    def _first_layer(self, count: Tensor, num_steps: int | None) -> tuple[Tensor, Tensor]:
        """The first layer's weight on the features and its bias with the progress folded in."""
        layer = self.layers[0]
        f = self.num_features
        return layer.weight[:, :f], layer.bias + layer.weight[:, f:] @ self.progress(count, num_steps)

    def _check(self, grads: Params, state: CompactState, batch_dims: int) -> None:
        for k, g in grads.items():
            check_parameter(k, g, batch_dims)
            if k not in state.second_moment or state.second_moment[k].shape != g.shape:
                raise ValueError(f"{type(self).__name__}: the state has no moments of shape {tuple(g.shape)} "
                                 f"for parameter {k!r}; make it with init(params)")

    # -- the reference: out of place, differentiable, any batch_dims ------------------------------
    def update(self, grads: Params, state: CompactState, params: Params | None = None,
               batch_dims: int | None = None, num_steps: int | None = None,
               **extra: Any) -> tuple[Params, CompactState]:
        """``(updates, state)`` with ``updates = −step · d`` (module docstring).

        Args:
            grads, state, params: as every ``GradientTransformation`` (``params`` is unused:
                the parameter value is not a feature).
            batch_dims: leading instance dimensions (default: the constructor's).
            num_steps: the run length T for the schedule and progress (default: the constructor's).

        Returns:
            The updates and the new state.
        """
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        self._check(grads, state, batch_dims)
        count = state.count
        t = (count + 1).to(self.dtype)
        b2 = self.second_moment_decay
        w1, b1 = self._first_layer(count, num_steps)
        w2, b2_out = self.layers[1].weight, self.layers[1].bias
        base_step = self.step_size(count, num_steps)
        momenta, second, updates = {}, {}, {}
        for k, g in grads.items():
            g = g.to(self.dtype)
            decays = torch.tensor(self.momentum_decays, dtype=self.dtype, device=g.device)
            decays = decays.view(-1, *([1] * g.dim()))
            m = decays * state.momenta[k] + (1.0 - decays) * g
            v = b2 * state.second_moment[k] + (1.0 - b2) * g * g
            r = torch.rsqrt(v / (1.0 - b2 ** t) + ADAM_EPS**2)
            adam = [] if self._adam_row is None else [m[self._adam_row] * r]
            x = torch.stack([g, *m.unbind(0), r, *adam], dim=-1)
            x = second_moment_normalize(x, batch_dims, eps=FEATURE_EPS)
            o = functional.linear(torch.relu(functional.linear(x, w1, b1)), w2, b2_out)
            d = o[..., 0] + self.nominal * x[..., -1] if self.nominal != 0.0 else o[..., 0]
            dims = tuple(range(batch_dims, g.dim()))
            if self.normalize:
                d = d * torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + DIRECTION_EPS)
            log_mag = self.magnitude_range * torch.tanh(o[..., 1].mean(dim=dims, keepdim=True))
            updates[k] = -(base_step * torch.exp(log_mag)) * d
            momenta[k], second[k] = m, v
        return updates, CompactState(count + 1, momenta, second)

    # -- the drop-in: no graph, no instance dimension ---------------------------------------------
    @torch.no_grad()
    def update_fast(self, grads: Params, state: CompactState, params: Params | None = None,
                    num_steps: int | None = None, **extra: Any) -> tuple[Params, CompactState]:
        """``update`` with ``batch_dims=0`` and no graph, arranged for speed (module docstring);
        the same arithmetic up to rounding, out of place like ``update``."""
        self._check(grads, state, 0)
        count = state.count
        b2 = self.second_moment_decay
        bias2 = 1.0 - b2 ** (float(count) + 1.0)
        w1, b1 = self._first_layer(count, num_steps)
        w_dir, w_mag = self.layers[1].weight[0], self.layers[1].weight[1]
        b_dir, b_mag = float(self.layers[1].bias[0]), float(self.layers[1].bias[1])
        base_step = float(self.step_size(count, num_steps))
        k_m, f = len(self.momentum_decays), self.num_features
        momenta, second, updates = {}, {}, {}
        for k, grad in grads.items():
            n = grad.numel()
            g = grad.reshape(n).to(self.dtype)
            rows = torch.empty(f, n, dtype=self.dtype, device=g.device)
            rows[0].copy_(g)
            weight = torch.tensor([1.0 - b for b in self.momentum_decays], dtype=self.dtype, device=g.device)
            torch.lerp(state.momenta[k].reshape(k_m, n), g.expand(k_m, n), weight[:, None], out=rows[1: 1 + k_m])
            v = torch.mul(state.second_moment[k].reshape(n), b2).addcmul_(g, g, value=1.0 - b2)
            # rsqrt(v / bias2 + ε²) = sqrt(bias2) · rsqrt(v + ε² bias2); the normalization drops sqrt(bias2)
            torch.add(v, ADAM_EPS**2 * bias2, out=rows[f - 2]).rsqrt_()
            torch.mul(rows[1 + self._adam_row], rows[f - 2], out=rows[f - 1])
            inv = torch.rsqrt(torch.linalg.vector_norm(rows, dim=1).square() / n + FEATURE_EPS)
            h = torch.addmm(b1[:, None], w1 * inv, rows).relu_()
            d = torch.addmv(rows[f - 1], h.t(), w_dir, beta=self.nominal * float(inv[f - 1])).add_(b_dir)
            mu = float(w_mag @ h.mean(dim=1)) + b_mag
            scale = base_step * math.exp(self.magnitude_range * math.tanh(mu))
            rms = math.sqrt(float(torch.dot(d, d)) / n + DIRECTION_EPS)
            updates[k] = d.mul_(-scale / rms).view(grad.shape)
            momenta[k] = rows[1: 1 + k_m].clone().view(k_m, *grad.shape)
            second[k] = v.view(grad.shape)
        return updates, CompactState(count + 1, momenta, second)

    def transform(self, batch_dims: int | None = None, num_steps: int | None = None,
                  fast: bool = False) -> GradientTransformation:
        """This rule as a ``GradientTransformation`` for tensors with ``batch_dims`` instance
        dimensions (default: the constructor's) and runs of ``num_steps`` steps; ``fast``:
        ``update_fast`` (no graph, ``batch_dims=0`` only)."""
        batch_dims = self.batch_dims if batch_dims is None else int(batch_dims)
        if fast and batch_dims != 0:
            raise ValueError(f"{type(self).__name__}: the fast update has no instance dimension (batch_dims=0)")
        # update_fast is written for the shipped rule; the ablations (no Adam feature, no
        # normalization) take the reference path.
        fast = fast and self.adam_decay is not None and self.normalize
        update = (partial(self.update_fast, num_steps=num_steps) if fast
                  else partial(self.update, batch_dims=batch_dims, num_steps=num_steps))
        return GradientTransformation(partial(self.init, batch_dims=batch_dims), update)

    def as_torch_optimizer(self, params, batch_dims: int = 0, num_steps: int | None = None,
                           **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` over ``params`` (``update_fast`` when
        ``batch_dims=0``); ``num_steps``: the length of the user's run (default: the
        meta-training horizon stored in the config)."""
        return TransformOptimizer(self.transform(batch_dims, num_steps, fast=batch_dims == 0), params, **options)
