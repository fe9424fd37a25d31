"""A normalized per-parameter MLP update rule meant to generalize: the Celo2 line of work.

Celo2 (Moudgil, Knyazev & Belilovsky, ICLR 2026, arXiv 2602.19142) showed that a small
per-parameter MLP over hand-designed-optimizer features, whose output is *normalized per
tensor* and scaled by a global step multiplier (1e-3), meta-trained on a few small image MLPs,
stays stable far outside its meta-training distribution. For every coordinate of every
parameter tensor (``batch_dims`` leading instance dimensions excluded from every reduction)::

    x     = [g, p, m_b, 1/sqrt(v + 1e-6), m_b/sqrt(v + 1e-6), adam, sign(g), muon]   for b in decays
    x     = x / sqrt(mean_tensor(x²) + 1e-5)                   per feature, per tensor (as MLPLOpt)
    x     = [x, tanh(t / s - 1) for s in step_timescales, 2 t/T - 1, cos(π t/T)]    (t/T clipped to 1)
    d, m  = MLP(x)
    d     = d + nominal · x_adam                               (Harrison et al. 2022's nominal term)
    d     = d / sqrt(mean_tensor(d²) + eps)                    unit RMS per tensor
    step  = step_mult · exp(magnitude_range · tanh(mean_tensor(m))) · d
    θ_{t+1} = θ_t − step                                       (``update`` returns −step)

``muon`` is the Newton–Schulz-orthogonalized Nesterov momentum of ``learnopt.optim.muon`` for
tensors with at least two dimensions and the plain momentum for vectors. The progress columns
(``2 t/T − 1``, ``cos(π t/T)``) exist when ``num_steps`` (T) is given: the run length the rule
is told, so it can learn a schedule; a drop-in user passes their own (``as_torch_optimizer(params,
num_steps=T)``). The per-tensor magnitude head is bounded (a factor within
``exp(±magnitude_range)`` of ``step_mult``); ``magnitude_range=0`` gives Celo2's fixed step.
``normalize=False`` leaves out the per-tensor normalization of ``d`` (an ablation).
``nominal`` starts the rule near a per-tensor-normalized Adam (the MLP's last layer starts at
``output_init_scale`` times PyTorch's default), so meta-training begins from a working optimizer.

``orthogonalized_learned_optimizer`` composes the rule with Newton–Schulz orthogonalization of
its update for hidden matrices and AdamW for everything else ("Celo2" as opposed to
"Celo2-base", which is the rule alone), through ``learnopt.optim.partition`` / ``chain``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.features import FeaturesState, TransformFeatures, ema, rsqrt_second_moment
from learnopt.learned.mlp_lopt import second_moment_normalize
from learnopt.optim.alias import adamw
from learnopt.optim.base import EmptyState, GradientTransformation, Params, chain
from learnopt.optim.combinators import partition
from learnopt.optim.muon import scale_by_muon, zeropower_via_newtonschulz5
from learnopt.optim.torch_optimizer import TransformOptimizer
from learnopt.optim.transforms import scale

# Celo2 / learned_optimization's step multiplier: an output of RMS 1 moves a tensor by 1e-3.
STEP_MULT = 1e-3
GENERAL_MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999)  # learned_optimization's MLPLOpt, minus 0.9999
GENERAL_TIMESCALES = (1, 3, 10, 30, 100, 300)  # absolute steps: warm-up of the moving averages
DIRECTION_EPS = 1e-12  # keeps d / rms(d) differentiable when the MLP outputs zeros


def check_parameter(name: str, x: Tensor, batch_dims: int, owner: str) -> None:
    """Refuse what a per-tensor normalized rule cannot handle, naming the parameter.

    Args:
        name: the parameter's name, for the message.
        x: its value or gradient.
        batch_dims: leading instance dimensions of ``x``.
        owner: the rule's class name, for the message.

    Raises:
        ValueError: ``x`` is sparse, complex, or has no dimension beyond ``batch_dims``.
    """
    if x.is_sparse or x.layout != torch.strided:
        raise ValueError(f"{owner}: parameter {name!r} has a sparse gradient or value; "
                         "the rule needs dense tensors")
    if x.is_complex():
        raise ValueError(f"{owner}: parameter {name!r} is complex ({x.dtype}); "
                         "the rule handles real tensors only (view it as real pairs with torch.view_as_real)")
    if x.dim() <= batch_dims:
        raise ValueError(f"{owner}: parameter {name!r} has shape {tuple(x.shape)}, no dimension "
                         f"beyond batch_dims={batch_dims}; a per-tensor normalized update of a scalar is only "
                         "its sign (reshape it to [1] or give it to another optimizer)")


def orthogonalized_momentum(batch_dims: int = 0, momentum: float = 0.9) -> GradientTransformation:
    """Muon's direction (``scale_by_muon``) for tensors with two or more dimensions beyond
    ``batch_dims``, the momentum ``ema(momentum)`` for the rest.

    Args:
        batch_dims: leading instance dimensions of every tensor.
        momentum: the momentum decay of both branches.

    Returns:
        A ``GradientTransformation`` whose update points along the gradient.
    """
    return partition({"matrix": scale_by_muon(momentum, nesterov=True, batch_dims=batch_dims),
                      "vector": ema(momentum)},
                     lambda name, x: "matrix" if x.dim() - batch_dims >= 2 else "vector")


def progress_features(count: Tensor, num_steps: int, dtype: torch.dtype) -> Tensor:
    """``[2 f − 1, cos(π f)]`` with ``f = min(t / T, 1)``: where a run of ``T`` steps stands
    (``t`` 0-based).

    Args:
        count: ``t``, a scalar tensor.
        num_steps: the run length ``T``.
        dtype: the result's dtype.

    Returns:
        A ``[2]`` tensor.
    """
    frac = torch.clamp(count.to(dtype) / float(num_steps), max=1.0)
    return torch.stack([2.0 * frac - 1.0, torch.cos(math.pi * frac)])


class NormalizedMLPOptimizer(LearnedOptimizer):
    """Per-parameter MLP over hand-designed features with a per-tensor normalized output and a
    global step size (module docstring). ``config()`` returns the constructor arguments.

    Args:
        hidden_sizes: the MLP's hidden layer widths.
        momentum_decays: decays of the momentum features ``m_b``.
        second_moment_decay: decay of the second moment ``v``.
        directions: hand-designed directions among the features: ``"adam"``, ``"sign"``, ``"muon"``.
        step_timescales: the timescales ``s`` of the ``tanh(t / s − 1)`` features.
        num_steps: the run length T of the progress features (None: no progress features).
        step_mult: the global step multiplier.
        magnitude_range: bound of the learned log step factor (0: a fixed step).
        nominal: weight of the Adam direction added to the network's direction.
        output_init_scale: initial scale of the last layer relative to PyTorch's default.
        batch_dims: default leading instance dimensions of every tensor.
        normalize: normalize the direction to unit RMS per tensor.
    """

    takes_batch_dims = True  # as_torch_optimizer / load_optimizer accept batch_dims=

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32, 32),
        momentum_decays: Sequence[float] = GENERAL_MOMENTUM_DECAYS,
        second_moment_decay: float = 0.999,
        directions: Sequence[str] = ("adam", "sign", "muon"),
        step_timescales: Sequence[float] = GENERAL_TIMESCALES,
        num_steps: int | None = None,
        step_mult: float = STEP_MULT,
        magnitude_range: float = math.log(10.0),
        nominal: float = 1.0,
        output_init_scale: float = 0.01,
        batch_dims: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.momentum_decays = [float(b) for b in momentum_decays]
        self.second_moment_decay = float(second_moment_decay)
        self.directions = [str(d) for d in directions]
        self.step_timescales = [float(s) for s in step_timescales]
        self.num_steps = None if num_steps is None else int(num_steps)
        self.step_mult = float(step_mult)
        self.magnitude_range = float(magnitude_range)
        self.nominal = float(nominal)
        self.output_init_scale = float(output_init_scale)
        self.batch_dims = int(batch_dims)
        self.normalize = bool(normalize)
        self._validate()
        self._features: dict[int, TransformFeatures] = {}
        base = list(self.features(self.batch_dims).transforms)
        self._num_base = len(base)
        moments = [f"momentum_{b:g}" for b in self.momentum_decays]
        self._momentum_index = [base.index(n) for n in moments]
        self._rsqrt_index = base.index("rsqrt_second_moment")
        self._nominal_index = base.index("adam") if "adam" in base else None
        progress = ["progress", "progress_cos"] if self.num_steps is not None else []
        self.feature_names = (base + [f"{n}*rsqrt_second_moment" for n in moments]
                              + [f"step_tanh_{s:g}" for s in self.step_timescales] + progress)
        self._build_network()

    def _build_network(self) -> None:
        """The per-coordinate network, features -> (direction, log-magnitude); its last layer
        starts at ``output_init_scale`` times PyTorch's default, with zero bias."""
        sizes = [len(self.feature_names), *self.hidden_sizes, 2]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        with torch.no_grad():
            self.layers[-1].weight.mul_(self.output_init_scale)
            self.layers[-1].bias.zero_()

    def _validate(self) -> None:
        name = type(self).__name__
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"{name}: hidden sizes must be >= 1, got {self.hidden_sizes}")
        if not all(0.0 <= b < 1.0 for b in [*self.momentum_decays, self.second_moment_decay]):
            raise ValueError(f"{name}: momentum and second-moment decays must lie in [0, 1)")
        if len(set(self.momentum_decays)) != len(self.momentum_decays):
            raise ValueError(f"{name}: a momentum decay is given twice in {self.momentum_decays}")
        unknown = set(self.directions) - {"adam", "sign", "muon"}
        if unknown:
            raise ValueError(f"{name}: unknown directions {sorted(unknown)} (use 'adam', 'sign', 'muon')")
        if self.nominal != 0.0 and "adam" not in self.directions:
            raise ValueError(f"{name}: the nominal term needs the 'adam' direction (or nominal=0)")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"{name}: num_steps must be >= 1 or None, got {self.num_steps}")
        values = [self.step_mult, self.magnitude_range, self.nominal, self.output_init_scale]
        if not all(math.isfinite(v) for v in values) or self.step_mult <= 0 or self.magnitude_range < 0:
            raise ValueError(f"{name}: step_mult must be > 0, magnitude_range >= 0, all finite; got {values}")
        if self.batch_dims < 0:
            raise ValueError(f"{name}: batch_dims must be >= 0, got {self.batch_dims}")

    def config(self) -> dict[str, Any]:
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.momentum_decays),
            "second_moment_decay": self.second_moment_decay,
            "directions": list(self.directions),
            "step_timescales": list(self.step_timescales),
            "num_steps": self.num_steps,
            "step_mult": self.step_mult,
            "magnitude_range": self.magnitude_range,
            "nominal": self.nominal,
            "output_init_scale": self.output_init_scale,
            "batch_dims": self.batch_dims,
            "normalize": self.normalize,
        }

    @property
    def num_features(self) -> int:
        """Columns of the network's input (``len(feature_names)``)."""
        return len(self.feature_names)

    def features(self, batch_dims: int) -> TransformFeatures:
        """The feature extractor for tensors with ``batch_dims`` instance dimensions (the
        orthogonalized direction depends on it; the state's structure does not).

        Args:
            batch_dims: leading instance dimensions of every tensor.

        Returns:
            The (cached) ``TransformFeatures`` of this rule's base features.
        """
        if batch_dims not in self._features:
            transforms: dict[str, GradientTransformation | str] = {"grad": "grad", "param": "param"}
            transforms.update({f"momentum_{b:g}": ema(b) for b in self.momentum_decays})
            transforms["rsqrt_second_moment"] = rsqrt_second_moment(self.second_moment_decay)
            for d in self.directions:
                transforms[d] = orthogonalized_momentum(batch_dims) if d == "muon" else d
            self._features[batch_dims] = TransformFeatures(transforms)
        return self._features[batch_dims]

    # -- the optimizer ---------------------------------------------------------------------------
    def init(self, params: Params, batch_dims: int | None = None) -> FeaturesState:
        """Feature state for ``params`` (checked with ``check_parameter``).

        Args:
            params: the parameters, ``{name: tensor}``.
            batch_dims: leading instance dimensions (default: the constructor's).

        Returns:
            The initial ``FeaturesState``.
        """
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        for k, p in params.items():
            check_parameter(k, p, batch_dims, type(self).__name__)
        return self.features(batch_dims).init({k: p.detach().to(self.dtype) for k, p in params.items()})

    def mlp(self, x: Tensor) -> Tensor:
        """``[..., F] -> [..., 2]``: (direction, log-magnitude).

        Args:
            x: the feature rows ``[..., num_features]``.

        Returns:
            The network's output ``[..., 2]``.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def _rows(self, x: Tensor, count: Tensor, num_steps: int | None, batch_dims: int) -> Tensor:
        """One tensor's MLP input ``[*shape, num_features]`` from its raw features ``x``."""
        base = x
        adam_like = base[..., self._momentum_index] * base[..., self._rsqrt_index: self._rsqrt_index + 1]
        cols = [second_moment_normalize(torch.cat([base, adam_like], dim=-1), batch_dims)]
        extra = []
        if self.step_timescales:
            scales = torch.as_tensor(self.step_timescales, dtype=x.dtype, device=x.device)
            extra.append(torch.tanh(count.to(x.dtype) / scales - 1.0))
        if self.num_steps is not None:
            extra.append(progress_features(count, num_steps or self.num_steps, x.dtype))
        if extra:
            cols.append(torch.cat(extra).to(x.device).expand(*x.shape[:-1], -1))
        return torch.cat(cols, dim=-1)

    def feature_rows(self, grads: Params, state: FeaturesState, params: Params, batch_dims: int,
                     num_steps: int | None = None) -> tuple[Params, FeaturesState]:
        """The network's inputs per tensor, ``{name: [*shape, num_features]}``, and the new
        feature state (parameters checked with ``check_parameter``).

        Args:
            grads: the gradients, ``{name: tensor}``.
            state: the feature state.
            params: the parameter values (a feature).
            batch_dims: leading instance dimensions.
            num_steps: the run length T for the progress features (default: the constructor's).

        Returns:
            ``(rows, new_state)``.
        """
        for k, g in grads.items():
            check_parameter(k, g, batch_dims, type(self).__name__)
        grads = {k: g.to(self.dtype) for k, g in grads.items()}
        params = {k: params[k].to(self.dtype) for k in grads}
        raw, new_state = self.features(batch_dims).features_per_tensor(grads, state, params)
        return {k: self._rows(x, state.count, num_steps, batch_dims) for k, x in raw.items()}, new_state

    def directions_and_scales(self, grads: Params, state: FeaturesState, params: Params,
                              batch_dims: int, num_steps: int | None = None,
                              ) -> tuple[Params, Params, FeaturesState]:
        """Per tensor: the direction ``d`` (unit RMS unless ``normalize=False``) and the step
        ``step_mult · exp(...)`` (broadcastable, one per instance), and the new feature state.

        Args:
            grads, state, params, batch_dims, num_steps: as ``feature_rows``.

        Returns:
            ``(directions, scales, new_state)``.
        """
        rows, new_state = self.feature_rows(grads, state, params, batch_dims, num_steps)
        out = self.mlp(torch.cat([r.reshape(-1, self.num_features) for r in rows.values()]))
        directions, scales = self.directions_from(out, rows, batch_dims)
        return directions, scales, new_state

    def directions_from(self, out: Tensor, rows: Params, batch_dims: int) -> tuple[Params, Params]:
        """Split the network's output ``[N, 2]`` (rows in ``rows`` order) into per-tensor
        directions (plus the nominal term; normalized) and bounded step sizes.

        Args:
            out: the network's output ``[N, 2]``.
            rows: the feature rows per tensor, ``{name: [*shape, num_features]}``.
            batch_dims: leading instance dimensions, left out of the per-tensor means.

        Returns:
            ``(directions, scales)``, per tensor.
        """
        directions, scales, offset = {}, {}, 0
        for k, r in rows.items():
            shape = r.shape[:-1]
            o = out[offset: offset + shape.numel()].reshape(*shape, 2)
            offset += shape.numel()
            d, m = o[..., 0], o[..., 1]
            if self.nominal != 0.0:
                d = d + self.nominal * rows[k][..., self._nominal_index]
            dims = tuple(range(batch_dims, len(shape)))
            if self.normalize:
                d = d * torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + DIRECTION_EPS)
            directions[k] = d
            log_mag = self.magnitude_range * torch.tanh(m.mean(dim=dims, keepdim=True))
            scales[k] = self.step_mult * torch.exp(log_mag)
        return directions, scales

    def update(self, grads: Params, state: FeaturesState, params: Params | None = None,
               batch_dims: int | None = None, num_steps: int | None = None,
               **extra: Any) -> tuple[Params, FeaturesState]:
        """``(updates, state)`` with ``updates = −step`` (added to the parameters).

        Args:
            grads, state, params: as every ``GradientTransformation`` (``params`` is required:
                the parameter value is a feature).
            batch_dims: leading instance dimensions (default: the constructor's).
            num_steps: the run length T for the progress features (default: the constructor's).

        Returns:
            The updates and the new feature state.
        """
        if params is None:
            raise ValueError("NormalizedMLPOptimizer: the parameter-value feature needs params: "
                             "update(grads, state, params)")
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        directions, scales, state = self.directions_and_scales(grads, state, params, batch_dims, num_steps)
        return {k: -scales[k] * d for k, d in directions.items()}, state

    def transform(self, batch_dims: int | None = None, num_steps: int | None = None) -> GradientTransformation:
        """This rule as a ``GradientTransformation`` for tensors with ``batch_dims`` instance
        dimensions (default: the constructor's) and runs of ``num_steps`` steps.

        Args:
            batch_dims: leading instance dimensions (default: the constructor's).
            num_steps: the run length T for the progress features (default: the constructor's).

        Returns:
            A ``GradientTransformation`` of ``init`` and ``update``.
        """
        batch_dims = self.batch_dims if batch_dims is None else int(batch_dims)
        return GradientTransformation(partial(self.init, batch_dims=batch_dims),
                                      partial(self.update, batch_dims=batch_dims, num_steps=num_steps))

    def as_torch_optimizer(self, params, batch_dims: int = 0, num_steps: int | None = None,
                           **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` over ``params``; ``batch_dims=0`` (an ordinary
        model) unless given, ``num_steps``: the length of the user's run (default: the
        meta-training horizon stored in the config).

        Args:
            params: the parameters (as ``torch.optim.Optimizer`` takes them).
            batch_dims: leading instance dimensions of every parameter.
            num_steps: the run length T.
            **options: passed to ``TransformOptimizer``.

        Returns:
            A ``TransformOptimizer`` of ``transform(batch_dims, num_steps)``.
        """
        return self.drop_in(self.transform(batch_dims, num_steps), params, options)


def orthogonalize_matching_rms(batch_dims: int = 0, ns_steps: int = 5) -> GradientTransformation:
    """Replace each update ``u`` (two or more dimensions beyond ``batch_dims``; conv filters
    flattened to ``[out, rest]``) by its Newton–Schulz orthogonalization
    (``zeropower_via_newtonschulz5``) rescaled to ``u``'s own RMS per instance, so the
    learned rule keeps choosing the step size and Newton–Schulz only the direction.

    Args:
        batch_dims: leading instance dimensions of every update.
        ns_steps: Newton–Schulz iterations.

    Returns:
        A stateless ``GradientTransformation``.
    """

    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        out = {}
        for k, u in updates.items():
            m = u.reshape(*u.shape[: batch_dims + 1], -1)
            o = zeropower_via_newtonschulz5(m, ns_steps)
            dims = (-2, -1)
            ratio = torch.sqrt((m * m).mean(dim=dims, keepdim=True) / ((o * o).mean(dim=dims, keepdim=True) + 1e-30))
            out[k] = (o * ratio).reshape(u.shape)
        return out, state

    return GradientTransformation(init, update)


def is_hidden_matrix(name: str, x: Tensor, batch_dims: int = 0) -> bool:
    """Default routing of ``orthogonalized_learned_optimizer``: tensors with two or more
    dimensions beyond ``batch_dims`` whose name does not mention an embedding.

    Args:
        name: the parameter's name.
        x: the parameter.
        batch_dims: leading instance dimensions of ``x``.

    Returns:
        Whether ``x`` takes the orthogonalized learned update.
    """
    return x.dim() - batch_dims >= 2 and "embed" not in name.lower()


def orthogonalized_learned_optimizer(
    lopt: LearnedOptimizer,
    lr: float = 1.0,
    adamw_lr: float = 1e-3,
    adamw_betas: tuple[float, float] = (0.9, 0.999),
    adamw_weight_decay: float = 0.0,
    batch_dims: int = 0,
    num_steps: int | None = None,
    is_matrix: Callable[[str, Tensor], bool] | None = None,
    fast: bool = False,
) -> GradientTransformation:
    """The learned rule with Newton–Schulz orthogonalization for hidden matrices and AdamW for
    the rest (Celo2's practical variant)::

        hidden matrices:  p <- p + lr · orthogonalize_matching_rms(lopt.update(g))
        the rest:         p <- p − adamw_lr · (adam(g) + adamw_weight_decay · p)

    Args:
        lopt: the learned rule, any with ``transform(batch_dims, num_steps)`` (``NormalizedMLPOptimizer``,
            ``CompactNormalizedOptimizer``); its weights are used as they are at each call.
        lr: multiplier of the learned update.
        adamw_lr, adamw_betas, adamw_weight_decay: AdamW for the non-matrix parameters.
        batch_dims: leading instance dimensions of every tensor.
        num_steps: run length for the rule's progress features (default: its config's).
        is_matrix: ``(name, tensor) -> bool`` choosing the orthogonalized parameters
            (default ``is_hidden_matrix``).
        fast: the rule's ``update_fast`` (no graph, ``batch_dims=0``; rules with ``has_fast_path``),
            for drop-in use.

    Returns:
        A ``GradientTransformation`` built with ``partition`` and ``chain``.
    """
    choose = is_matrix or partial(is_hidden_matrix, batch_dims=batch_dims)
    inner = lopt.transform(batch_dims, num_steps, fast=True) if fast else lopt.transform(batch_dims, num_steps)
    learned = chain(inner, orthogonalize_matching_rms(batch_dims), scale(lr))
    rest = adamw(lr=adamw_lr, betas=adamw_betas, weight_decay=adamw_weight_decay)
    return partition({"learned": learned, "adamw": rest}, lambda name, x: "learned" if choose(name, x) else "adamw")
