"""A compact normalized per-parameter MLP rule with a hand-designed schedule as its prior.

``NormalizedMLPOptimizer`` (``learnopt.learned.general``) reads 24 feature columns per coordinate through a width-32
MLP. This rule keeps its recipe (per-tensor normalized features, a per-coordinate MLP, the nominal Adam term, a
unit-RMS output per tensor, a bounded per-tensor magnitude) with per-coordinate work close to Adam's: five features,
one hidden layer of four units, the per-step progress features entering as a bias. Its step size follows a
hand-designed warm-up + cosine schedule that the network corrects: untrained, the rule is per-tensor-normalized Adam
on a good schedule. For every tensor (``batch_dims`` leading instance dimensions left out of every reduction)::

    m_b   = b m_b + (1 − b) g            for b in momentum_decays     (zero start)
    v     = β₂ v + (1 − β₂) g²,   r = 1 / sqrt(v / (1 − β₂ᵗ) + ε²)
    x     = [g, m_b …, r, m_{adam_decay} · r]                         (the last: Adam's direction)
    x     = x / sqrt(mean_tensor(x²) + 1e-24)                         per feature, per tensor
    c     = [tanh(t / s − 1) for s in step_timescales, 2 t/T − 1, cos(π t/T)]   per step
    h     = relu(W₁ [x, c] + b₁),   (d, μ) = W₂ h + b₂
    d     = d + nominal · x_adam,   d = d / sqrt(mean_tensor(d²) + eps)
    step  = step_mult · schedule(t, T) · exp(magnitude_range · tanh(mean_tensor(μ)))
    step  = step · min(1, cap · rms_tensor(x_adam before its normalization))     with max_amplification
    θ_{t+1} = θ_t − step · d

With ``max_amplification``, the normalization may scale the step up by at most ``cap`` over Adam's own direction
m / sqrt(v̂) (whose RMS falls well below 1 once the gradients are mostly noise); ``cap = max_amplification ·
exp(AMPLIFICATION_GAIN · a)`` with ``a`` a meta-learned weight that starts at 0.

``schedule`` is 1 without a run length T, else a linear warm-up over the first ``warmup`` of the run and a cosine
decay to ``final_ratio`` at T (held after T). ``update_fast`` is the same arithmetic for a caller that needs no
graph and has no instance dimension (the drop-in ``torch.optim`` step; tested equal to ``update``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.general import DIRECTION_EPS, GENERAL_TIMESCALES, check_parameter
from learnopt.learned.general import orthogonalized_learned_optimizer
from learnopt.learned.general_compact_fast import ADAM_EPS, FEATURE_EPS, CompactFastUpdate, CompactState
from learnopt.learned.mlp_lopt import second_moment_normalize
from learnopt.optim.base import GradientTransformation, Params
from learnopt.optim.torch_optimizer import TransformOptimizer

# Peak step (per-coordinate RMS of the update): the best of 5e-3 … 1e-1 for the untrained rule on the
# meta-training distribution's validation instances (docs/general.md); Celo2's 1e-3 is for a rule without a schedule.
COMPACT_STEP_MULT = 1e-2
# The cap's log moves AMPLIFICATION_GAIN times as fast as the weight ``a``: Adam, the meta-optimizer, moves every
# weight by about meta_lr (3e-4) per meta-step, and the cap's log needs moves of order 1 within a few hundred.
AMPLIFICATION_GAIN = 10.0


CONFIG_KEYS = tuple("hidden_size momentum_decays adam_decay second_moment_decay step_timescales num_steps step_mult "
                    "warmup final_ratio magnitude_range nominal output_init_scale batch_dims normalize "
                    "max_amplification".split())


def warmup_cosine(count: float, num_steps: int | None, warmup: float, final_ratio: float) -> float:
    """The hand-designed schedule: ``min(1, (t + 1) / (warmup · T))`` times a cosine from 1 at
    the end of the warm-up to ``final_ratio`` at ``T`` (held after it); 1 when ``T`` is None.

    Args:
        count, num_steps: ``t``, the number of previous steps (0-based), and the run length ``T``.
        warmup: the warm-up's share of the run, in [0, 1).
        final_ratio: the schedule's value at and after ``T``.

    Returns:
        The schedule's value (plain Python arithmetic: it is a per-step scalar).
    """
    if num_steps is None:
        return 1.0
    w = warmup * num_steps
    ramp = min((count + 1.0) / w, 1.0) if w > 0 else 1.0
    frac = min(max((count - w) / max(num_steps - w, 1e-12), 0.0), 1.0)
    return ramp * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))


class CompactNormalizedOptimizer(CompactFastUpdate, LearnedOptimizer):
    """A normalized per-parameter MLP over five features with a learned correction of a warm-up + cosine step
    schedule (module docstring). ``config()`` returns the constructor arguments.

    Args:
        hidden_size: the MLP's hidden units; ``output_init_scale``: its last layer's initial scale (× PyTorch's).
        momentum_decays, second_moment_decay: decays of the momenta ``m_b`` and of ``v``.
        adam_decay: the momentum decay of the Adam feature (one of ``momentum_decays``; None: no such feature).
        step_timescales: the timescales ``s`` of the ``tanh(t / s − 1)`` inputs.
        num_steps: the run length T of the schedule and progress inputs (None: a constant schedule).
        step_mult: the peak step; ``warmup``, ``final_ratio``: the schedule's (``warmup_cosine``).
        magnitude_range, nominal: bound of the learned log step factor, weight of ``x_adam`` in ``d``.
        batch_dims: default leading instance dimensions; ``normalize``: scale the direction to unit RMS per tensor.
        max_amplification: the initial ``cap`` on the step over Adam's direction's RMS (None: no cap; module
            docstring); the cap is then meta-learned (the weight ``amplification``).
    """

    takes_batch_dims = True  # as_torch_optimizer / load_optimizer accept batch_dims=
    has_fast_path = True  # update_fast computes this class's update

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
        max_amplification: float | None = None,
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
        self.max_amplification = None if max_amplification is None else float(max_amplification)
        self._validate()
        moments = [f"momentum_{b:g}" for b in self.momentum_decays]
        adam = ["adam"] if self.adam_decay is not None else []
        self.feature_names = ["grad", *moments, "rsqrt_second_moment", *adam]
        self.progress_names = [f"step_tanh_{s:g}" for s in self.step_timescales]
        if self.num_steps is not None:
            self.progress_names += ["progress", "progress_cos"]
        self._adam_row = None if self.adam_decay is None else self.momentum_decays.index(self.adam_decay)
        self.layers = nn.ModuleList([nn.Linear(self.num_features + len(self.progress_names), self.hidden_size),
                                     nn.Linear(self.hidden_size, 2)])
        with torch.no_grad():  # start near the nominal term alone: per-tensor-normalized Adam
            self.layers[-1].weight.mul_(self.output_init_scale)
            self.layers[-1].bias.zero_()
        if self.max_amplification is not None:
            self.amplification = nn.Parameter(torch.zeros(()))

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
        cap = self.max_amplification
        if cap is not None and not (math.isfinite(cap) and cap > 0 and self.adam_decay is not None):
            raise ValueError(f"{name}: max_amplification must be finite and > 0 and needs the Adam direction "
                             f"(adam_decay); got {cap} with adam_decay {self.adam_decay}")

    def config(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v := getattr(self, k), list) else v for k in CONFIG_KEYS}

    @property
    def num_features(self) -> int:
        """Per-coordinate feature columns (the progress columns are per step, not counted)."""
        return len(self.feature_names)

    # -- shared pieces ------------------------------------------------------------------------------
    def init(self, params: Params, batch_dims: int | None = None) -> CompactState:
        """Zero moments for ``params`` (checked with ``check_parameter``).

        Args:
            params: the parameters; ``batch_dims``: their instance dimensions (default: the constructor's).

        Returns:
            A ``CompactState``.
        """
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        for k, p in params.items():
            check_parameter(k, p, batch_dims, type(self).__name__)
        k_m = len(self.momentum_decays)
        return CompactState(
            torch.zeros((), dtype=torch.int64, device=self.device),
            {k: torch.zeros(k_m, *p.shape, dtype=self.dtype, device=p.device) for k, p in params.items()},
            {k: torch.zeros(p.shape, dtype=self.dtype, device=p.device) for k, p in params.items()},
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].weight.dtype  # LearnedOptimizer's walks all parameters: per-step overhead

    @property
    def device(self) -> torch.device:
        return self.layers[0].weight.device

    def progress(self, count: float, num_steps: int | None) -> list[float]:
        """The per-step inputs ``c`` (module docstring), as ``progress_features`` gives the last two.

        Args:
            count, num_steps: the step ``t`` (0-based) and the run length T (default: the constructor's).

        Returns:
            The values of ``progress_names`` (plain Python arithmetic: they are per-step scalars).
        """
        cols = [math.tanh(count / s - 1.0) for s in self.step_timescales]
        if self.num_steps is not None:
            frac = min(count / float(num_steps or self.num_steps), 1.0)
            cols += [2.0 * frac - 1.0, math.cos(math.pi * frac)]
        return cols

    def step_size(self, count: float, num_steps: int | None) -> float:
        """``step_mult · schedule(t, T)`` before the learned per-tensor factor.

        Args:
            count, num_steps: the step ``t`` (0-based) and the run length T (default: the constructor's).

        Returns:
            The step size.
        """
        return self.step_mult * warmup_cosine(count, num_steps or self.num_steps, self.warmup, self.final_ratio)

    def amplification_cap(self) -> Tensor | None:
        """The cap on the amplification of the step over Adam's direction.

        Returns:
            ``max_amplification · exp(AMPLIFICATION_GAIN · a)`` (a 0-d tensor), or None without ``max_amplification``.
        """
        if self.max_amplification is None:
            return None
        return self.max_amplification * torch.exp(AMPLIFICATION_GAIN * self.amplification)

    def weights_from(self, source: CompactNormalizedOptimizer) -> dict[str, Tensor]:
        """The weights of ``source``, a rule without ``max_amplification``, for this rule with it (``init_from``):
        the cap starts at ``max_amplification`` (the weight ``amplification`` at 0).

        Args:
            source: the checkpoint's rule.

        Returns:
            A state dict for this rule.

        Raises:
            ValueError: ``source`` has other weights than this rule's without the cap.
        """
        mine = self.state_dict()
        theirs = {**source.state_dict(), **({"amplification": mine["amplification"]}
                                             if "amplification" in mine else {})}
        if set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
            raise ValueError(f"{type(self).__name__}: weights {sorted(theirs)} do not fit {sorted(mine)}")
        return theirs

    def _first_layer(self, count: float, num_steps: int | None) -> tuple[Tensor, Tensor]:
        """The first layer's weight on the features and its bias with the progress folded in."""
        layer = self.layers[0]
        f = self.num_features
        c = torch.tensor(self.progress(count, num_steps), dtype=self.dtype, device=self.device)
        return layer.weight[:, :f], layer.bias + layer.weight[:, f:] @ c

    def _check(self, grads: Params, state: CompactState, batch_dims: int) -> None:
        for k, g in grads.items():
            check_parameter(k, g, batch_dims, type(self).__name__)
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
        rows, momenta, second, adam_rms = self.feature_rows(grads, state, batch_dims)
        t = float(state.count)
        out = self.network(torch.cat([x.reshape(-1, self.num_features) for x in rows.values()]), t, num_steps)
        updates = self.updates_from(out, rows, t, num_steps, batch_dims, adam_rms)
        return updates, CompactState(state.count + 1, momenta, second)

    def feature_rows(self, grads: Params, state: CompactState,
                     batch_dims: int) -> tuple[Params, Params, Params, Params | None]:
        """Per tensor, the normalized features, the new momenta and second moments and, with
        ``max_amplification``, the RMS of Adam's direction ``x_adam`` before its normalization (for the cap).

        Args:
            grads, state: the gradients (checked with ``check_parameter``) and the ``CompactState``.
            batch_dims: leading instance dimensions.

        Returns:
            ``(rows, momenta, second_moments, adam_rms)``, each ``{name: tensor}`` (``adam_rms`` None without
            ``max_amplification``, else with the instance dimensions kept); rows ``[*shape, num_features]``.
        """
        self._check(grads, state, batch_dims)
        t = float(state.count)
        b2 = self.second_moment_decay
        rows, momenta, second = {}, {}, {}
        adam_rms = None if self.max_amplification is None else {}
        for k, g in grads.items():
            g = g.to(self.dtype)
            decays = torch.tensor(self.momentum_decays, dtype=self.dtype, device=g.device)
            decays = decays.view(-1, *([1] * g.dim()))
            m = decays * state.momenta[k] + (1.0 - decays) * g
            v = b2 * state.second_moment[k] + (1.0 - b2) * g * g
            r = torch.rsqrt(v / (1.0 - b2 ** (t + 1.0)) + ADAM_EPS**2)
            adam = [] if self._adam_row is None else [m[self._adam_row] * r]
            x = torch.stack([g, *m.unbind(0), r, *adam], dim=-1)
            rows[k] = second_moment_normalize(x, batch_dims, eps=FEATURE_EPS)
            momenta[k], second[k] = m, v
            if adam_rms is not None:
                adam_rms[k] = adam[0].square().mean(dim=tuple(range(batch_dims, g.dim())), keepdim=True).sqrt()
        return rows, momenta, second, adam_rms

    def network(self, x: Tensor, count: float, num_steps: int | None) -> Tensor:
        """``[N, num_features] -> [N, 2]`` (direction, log-magnitude) at step ``count``.

        Args:
            x, count, num_steps: the feature rows, the step ``t`` and the run length T.

        Returns:
            The network's output ``[N, 2]``.
        """
        w1, b1 = self._first_layer(count, num_steps)
        return self.layers[1](torch.relu(functional.linear(x, w1, b1)))

    def updates_from(self, out: Tensor, rows: Params, count: float, num_steps: int | None,
                     batch_dims: int, adam_rms: Params | None = None) -> Params:
        """The updates ``−step · d`` from the network's output ``[N, 2]`` (rows in ``rows`` order).

        Args:
            out, rows: the network's output and the feature rows per tensor (``feature_rows``).
            count, num_steps, batch_dims: the step ``t``, the run length T and the instance dimensions.
            adam_rms: ``feature_rows``'s, for the cap on the amplification (None: no cap).

        Returns:
            The updates, ``{name: tensor}``.
        """
        base_step = self.step_size(count, num_steps)
        cap = self.amplification_cap() if adam_rms is not None else None
        updates, offset = {}, 0
        for k, x in rows.items():
            shape = x.shape[:-1]
            o = out[offset: offset + shape.numel()].reshape(*shape, 2)
            offset += shape.numel()
            d = o[..., 0] + self.nominal * x[..., -1] if self.nominal != 0.0 else o[..., 0]
            dims = tuple(range(batch_dims, len(shape)))
            if self.normalize:
                d = d * torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + DIRECTION_EPS)
            log_mag = self.magnitude_range * torch.tanh(o[..., 1].mean(dim=dims, keepdim=True))
            step = base_step * torch.exp(log_mag)
            if cap is not None:
                step = step * torch.clamp(cap * adam_rms[k], max=1.0)
            updates[k] = -step * d
        return updates

    def transform(self, batch_dims: int | None = None, num_steps: int | None = None,
                  fast: bool = False, compiled: bool = False) -> GradientTransformation:
        """This rule as a ``GradientTransformation``.

        Args:
            batch_dims, num_steps: the tensors' instance dimensions and the run length T (default: the constructor's).
            fast: ``update_fast`` (no graph, ``batch_dims=0`` only); ``compiled``: its compiled loops.

        Returns:
            A ``GradientTransformation`` of ``init`` and ``update`` (or ``update_fast``).
        """
        batch_dims = self.batch_dims if batch_dims is None else int(batch_dims)
        if fast and batch_dims != 0:
            raise ValueError(f"{type(self).__name__}: the fast update has no instance dimension (batch_dims=0)")
        fast = fast and self._has_fast_update()
        update = (partial(self.update_fast, num_steps=num_steps, compiled=compiled) if fast
                  else partial(self.update, batch_dims=batch_dims, num_steps=num_steps))
        return GradientTransformation(partial(self.init, batch_dims=batch_dims), update)

    def _has_fast_update(self) -> bool:
        """update_fast is written for the shipped rule; the ablations (no Adam feature, no normalization) lack one."""
        return self.has_fast_path and self.adam_decay is not None and self.normalize

    def as_torch_optimizer(self, params, batch_dims: int = 0, num_steps: int | None = None,
                           compile: bool = False, orthogonalize: bool = False, **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` over ``params`` (``update_fast`` when ``batch_dims=0``).

        Args:
            params, batch_dims: the parameters (as ``torch.optim.Optimizer`` takes them) and their instance dimensions.
            num_steps: the length of the user's run (default: the meta-training horizon stored in the config).
            compile: ``update_fast``'s ``torch.compile``d loops (the first step compiles them).
            orthogonalize: Celo2's practical variant, ``orthogonalized_learned_optimizer``: Newton–Schulz on the
                rule's update of hidden matrices, AdamW for vectors and parameters named ``*embed*``.
            **options: passed to ``TransformOptimizer``.

        Returns:
            A ``TransformOptimizer``.

        Raises:
            ValueError: ``compile`` with ``orthogonalize`` (the composition runs the eager update).
        """
        if orthogonalize and compile:
            raise ValueError(f"{type(self).__name__}: compile=True is for the rule alone, not orthogonalize=True")
        tx = (orthogonalized_learned_optimizer(self, batch_dims=batch_dims, num_steps=num_steps, fast=batch_dims == 0)
              if orthogonalize else self.transform(batch_dims, num_steps, fast=batch_dims == 0, compiled=compile))
        if compile and batch_dims == 0 and self._has_fast_update():
            options.setdefault("check_finite", False)  # update_fast checks in its first loop
        return self.drop_in(tx, params, options)
