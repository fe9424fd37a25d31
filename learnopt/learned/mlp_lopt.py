"""A per-coordinate MLP over hand-designed features: ``learned_optimization``'s ``MLPLOpt``.

The model of Metz et al. 2019, "Understanding and correcting pathologies in the training of
learned optimizers" (arXiv 1810.10180), as implemented in google/learned_optimization
(``learned_optimizers/mlp_lopt.py``, also called LOLv2), with the Adam-like features of its
``adafac_mlp_lopt`` (m · rsqrt(v)). For every coordinate of every parameter tensor::

    x      = [g, p, m_b for b in momentum_decays, 1/sqrt(v + 1e-6), m_b / sqrt(v + 1e-6) for b ...]
    x      = x / sqrt(mean_tensor(x²) + 1e-5)         per feature, per tensor, per task instance
    x      = [x, tanh(t / s - 1) for s in step_timescales]      (not normalised, as in mlp_lopt)
    d, m   = MLP(x)                                    shared weights, ReLU hidden layers
    step   = d · exp(m · exp_mult) · step_mult
    θ_{t+1} = θ_t − step                              (``update`` returns −step)

``m_b <- b m_b + (1 - b) g`` and ``v <- β v + (1 - β) g²`` start at zero without bias
correction: the per-tensor normalisation divides out any factor shared by a whole tensor,
which is all a bias correction is. The features come from
``learnopt.learned.features.TransformFeatures``, whose state (the moving averages and the
step count) is this optimizer's state.

Defaults follow ``MLPLOpt``: two hidden layers of 32 units, ``exp_mult = step_mult = 0.001``
(so an MLP output of order 1 moves a coordinate by about 1e-3, and the magnitude head acts
through a very gentle exponential). ``MLPLOpt`` uses momentum decays (0.1, 0.5, 0.9, 0.99,
0.999, 0.9999) and 11 step timescales up to 1e5; the defaults here are the project's feature
presets (``MOMENTUM_DECAYS``, ``DEFAULT_TIMESCALES``). The last layer starts at
``output_init_scale`` times PyTorch's default initialisation with zero bias, so the untrained
optimizer takes small steps (≈ ``step_mult · output_init_scale``) instead of large random ones.

Batched parameters: ``batch_dims`` is the number of leading dimensions of every parameter
that index independent task instances; the normalising mean runs over the other dimensions
only, so instances never mix. Nothing is inferred:

* meta-training on a ``tasks/`` family (``TruncatedBPTT``, ``rollout``), whose parameters carry
  one leading instance dimension, needs ``batch_dims=1`` (put it in the config);
* ``as_torch_optimizer`` / ``learnopt.load_optimizer`` on an ordinary model uses
  ``batch_dims=0`` whatever the checkpoint was trained with, unless told otherwise
  (``load_optimizer(path, params, batch_dims=1)`` for batched task parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.features import (
    DEFAULT_TIMESCALES,
    MOMENTUM_DECAYS,
    FeaturesState,
    TransformFeatures,
    ema,
    rsqrt_second_moment,
)
from learnopt.optim.base import GradientTransformation, Params
from learnopt.optim.torch_optimizer import TransformOptimizer

# learned_optimization's _second_moment_normalizer: x * rsqrt(eps + mean(x^2)).
NORMALIZER_EPS = 1e-5


def second_moment_normalize(x: Tensor, batch_dims: int = 0, eps: float = NORMALIZER_EPS) -> Tensor:
    """``x / sqrt(mean(x²) + eps)`` for features ``x: [*shape, F]``, the mean taken over the
    dimensions of ``shape`` after the first ``batch_dims`` (separately for each feature and
    each task instance). A tensor with no dimensions beyond ``batch_dims`` (one scalar per
    instance) is normalised by its own square, as ``MLPLOpt`` does for scalar parameters.

    Args:
        x: ``[*shape, F]`` features.
        batch_dims: leading task-instance dimensions of ``shape``.
        eps: added to the mean square.
    Returns:
        The normalised features, shape of ``x``.
    """
    dims = tuple(range(batch_dims, x.dim() - 1))
    # torch.mean(dim=()) would reduce over everything, hence the explicit branch
    second = (x * x).mean(dim=dims, keepdim=True) if dims else x * x
    return x * torch.rsqrt(second + eps)


class FeatureMLPOptimizer(LearnedOptimizer):
    """Per-coordinate MLP on normalised features, outputting a direction and a log-magnitude
    (module docstring). ``config()`` returns the constructor arguments.

    Args:
        hidden_sizes: widths of the ReLU hidden layers.
        momentum_decays: decays ``b`` of the momentum features.
        second_moment_decay: decay ``β`` of ``v``.
        param_feature: include the parameter value ``p`` as a feature.
        step_timescales: timescales ``s`` of the training-step features.
        exp_mult: multiplies the magnitude output inside the exponential.
        step_mult: multiplies the step.
        output_init_scale: scale of the last layer's initial weights (its bias starts at 0).
        batch_dims: leading task-instance dimensions of the meta-training parameters.
    Raises:
        ValueError: a hidden size below 1, a decay outside ``[0, 1)`` or given twice, or a
            negative ``batch_dims``.
    References:
        Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
        optimizers", arXiv 1810.10180.
    """

    takes_batch_dims = True  # as_torch_optimizer / load_optimizer accept batch_dims=

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32, 32),
        momentum_decays: Sequence[float] = MOMENTUM_DECAYS,
        second_moment_decay: float = 0.999,
        param_feature: bool = True,
        step_timescales: Sequence[float] = DEFAULT_TIMESCALES,
        exp_mult: float = 0.001,
        step_mult: float = 0.001,
        output_init_scale: float = 0.01,
        batch_dims: int = 0,
    ) -> None:
        super().__init__()
        hidden_sizes = [int(h) for h in hidden_sizes]
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"FeatureMLPOptimizer: hidden sizes must be >= 1, got {hidden_sizes}")
        decays = [float(b) for b in momentum_decays]
        if not all(0.0 <= b < 1.0 for b in [*decays, second_moment_decay]):
            raise ValueError("FeatureMLPOptimizer: momentum and second-moment decays must lie in [0, 1)")
        if len(set(decays)) != len(decays):
            raise ValueError(f"FeatureMLPOptimizer: a momentum decay is given twice in {decays}")
        if int(batch_dims) < 0:
            raise ValueError(f"FeatureMLPOptimizer: batch_dims must be >= 0, got {batch_dims}")
        self.hidden_sizes = hidden_sizes
        self.momentum_decays = decays
        self.second_moment_decay = float(second_moment_decay)
        self.param_feature = bool(param_feature)
        self.step_timescales = [float(s) for s in step_timescales]
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.output_init_scale = float(output_init_scale)
        self.batch_dims = int(batch_dims)

        transforms: dict[str, GradientTransformation | str] = {"grad": "grad"}
        if self.param_feature:
            transforms["param"] = "param"
        self._momentum_names = [f"momentum_{b:g}" for b in decays]
        transforms.update({n: ema(b) for n, b in zip(self._momentum_names, decays)})
        self._rsqrt_name = f"rsqrt_second_moment_{self.second_moment_decay:g}"
        transforms[self._rsqrt_name] = rsqrt_second_moment(self.second_moment_decay)
        self.features = TransformFeatures(transforms, step_timescales=self.step_timescales)
        base = list(self.features.transforms)
        self._num_base = len(base)
        self._momentum_index = [base.index(n) for n in self._momentum_names]
        self._rsqrt_index = base.index(self._rsqrt_name)
        step_names = self.features.names[self._num_base:]
        # Normalised columns (base features, then m_b * rsqrt(v)), then the step embedding.
        self.feature_names = base + [f"{n}*{self._rsqrt_name}" for n in self._momentum_names] + step_names

        sizes = [len(self.feature_names), *hidden_sizes, 2]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        with torch.no_grad():
            self.layers[-1].weight.mul_(self.output_init_scale)
            self.layers[-1].bias.zero_()

    @property
    def num_features(self) -> int:
        """Number of MLP inputs per coordinate."""
        return len(self.feature_names)

    def config(self) -> dict[str, Any]:
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.momentum_decays),
            "second_moment_decay": self.second_moment_decay,
            "param_feature": self.param_feature,
            "step_timescales": list(self.step_timescales),
            "exp_mult": self.exp_mult,
            "step_mult": self.step_mult,
            "output_init_scale": self.output_init_scale,
            "batch_dims": self.batch_dims,
        }

    # -- the optimizer ---------------------------------------------------------------------------
    def init(self, params: Params) -> FeaturesState:
        """The feature state (moving averages and step count) for ``params``.

        Args:
            params: ``{name: tensor}``.
        Returns:
            A ``FeaturesState``.
        """
        return self.features.init({k: p.detach().to(self.dtype) for k, p in params.items()})

    def mlp(self, x: Tensor) -> Tensor:
        """``[..., F] -> [..., 2]``: (direction, magnitude).

        Args:
            x: ``[..., F]`` input rows.
        Returns:
            ``[..., 2]``.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def inputs(self, grads: Params, state: FeaturesState, params: Params | None = None,
               batch_dims: int | None = None, **extra: Any) -> tuple[Tensor, FeaturesState]:
        """The MLP's input rows ``[N, num_features]`` (coordinates in ``grads`` order, as
        ``TransformFeatures``) and the new feature state.

        Args:
            grads: ``{name: gradient}``.
            state: the feature state.
            params: the current parameters (required with ``param_feature``).
            batch_dims: leading task-instance dimensions (None: the constructor's).
            **extra: passed to the feature transforms.
        Returns:
            ``(rows, state)``.
        Raises:
            ValueError: ``params`` is missing with ``param_feature``, or a parameter has fewer than
                ``batch_dims`` dimensions.
        """
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        if self.param_feature and params is None:
            raise ValueError(
                "FeatureMLPOptimizer: the parameter-value feature needs params: update(grads, state, params)"
            )
        grads = {k: g.to(self.dtype) for k, g in grads.items()}
        if params is not None:
            params = {k: params[k].to(self.dtype) for k in grads}
        per_tensor, state = self.features.features_per_tensor(grads, state, params, **extra)
        rows = []
        for name, x in per_tensor.items():
            if x.dim() - 1 < batch_dims:
                raise ValueError(
                    f"FeatureMLPOptimizer: parameter {name!r} has shape {tuple(x.shape[:-1])}, fewer than "
                    f"batch_dims={batch_dims} leading instance dimensions"
                )
            base, steps = x[..., : self._num_base], x[..., self._num_base:]
            adam_like = base[..., self._momentum_index] * base[..., self._rsqrt_index: self._rsqrt_index + 1]
            normed = second_moment_normalize(torch.cat([base, adam_like], dim=-1), batch_dims)
            rows.append(torch.cat([normed, steps], dim=-1).reshape(-1, self.num_features))
        return torch.cat(rows, dim=0), state

    def step_size(self, rows: Tensor) -> Tensor:
        """``d · exp(m · exp_mult) · step_mult`` per row (the amount subtracted from θ).

        Args:
            rows: ``[N, num_features]`` input rows.
        Returns:
            ``[N]`` step sizes.
        """
        out = self.mlp(rows)
        direction, magnitude = out[:, 0], out[:, 1]
        return direction * torch.exp(magnitude * self.exp_mult) * self.step_mult

    def update(self, grads: Params, state: FeaturesState, params: Params | None = None,
               batch_dims: int | None = None, **extra: Any) -> tuple[Params, FeaturesState]:
        """One step: ``updates = -step`` (added to the parameters).

        Args:
            grads: ``{name: gradient}``.
            state: the feature state.
            params: the current parameters.
            batch_dims: leading task-instance dimensions (None: the constructor's).
            **extra: passed to the feature transforms.
        Returns:
            ``(updates, state)``.
        """
        rows, state = self.inputs(grads, state, params, batch_dims, **extra)
        return TransformFeatures.unflatten(-self.step_size(rows), grads), state

    def transform(self, batch_dims: int | None = None) -> GradientTransformation:
        """This optimizer as a ``GradientTransformation``.

        Args:
            batch_dims: leading task-instance dimensions (None: the constructor's).
        Returns:
            A ``GradientTransformation``.
        """
        batch_dims = self.batch_dims if batch_dims is None else int(batch_dims)
        return GradientTransformation(self.init, partial(self.update, batch_dims=batch_dims))

    def as_torch_optimizer(self, params, batch_dims: int = 0, **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` over ``params``, with ``batch_dims=0`` (an ordinary
        model) unless given: the constructor's ``batch_dims`` describes the meta-training tasks.

        Args:
            params: tensors, ``(name, tensor)`` pairs or param group dicts.
            batch_dims: leading task-instance dimensions of ``params``.
            **options: ``TransformOptimizer``'s keyword options.
        Returns:
            A ``TransformOptimizer``.
        """
        return self.drop_in(self.transform(batch_dims), params, options)
