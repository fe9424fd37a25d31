"""Input features for learned optimizers, taken from any gradient transformation.

A learned optimizer that acts per coordinate (Andrychowicz et al. 2016; the MLP optimizers of
Metz et al. 2020/2022 in ``learned_optimization``) reads, for every coordinate, a vector of
features: the gradient, momenta at several timescales, second-moment normalisers, the
directions hand-designed optimizers would take, the training step. ``TransformFeatures``
computes such vectors from a set of named ``GradientTransformation``s: each transform's
*update* for a coordinate is one feature column, and the transforms keep their own state.

API::

    feats = TransformFeatures(["grad", "momenta", "rsqrt_second_moment", "adam", "sign"],
                              step_timescales=DEFAULT_TIMESCALES)
    state = feats.init(params)                       # params: dict[str, Tensor]
    x, state = feats(grads, state, params)           # x: [N, F], N = all coordinates
    feats.names                                      # F column names, in order

Rows follow ``CoordinatewiseLSTM``'s order: ``torch.cat([g.reshape(-1) for g in
grads.values()])``, i.e. all coordinates of the first tensor (including leading task-instance
dimensions), then the second, and so on. A transform may return, for a tensor, something
smaller that broadcasts against it (a per-tensor scalar, a per-instance ``[B, 1, ...]`` value
from a ``batch_dims`` transform); it is broadcast over that tensor's coordinates. The step
embedding is one value per column for all coordinates. ``features_per_tensor`` gives the same
columns as a ``dict`` of ``[*shape, F]`` tensors, for per-tensor normalisation.

Everything is out of place and differentiable: with respect to the transforms' tensor
hyperparameters (a decay that requires grad is meta-learnable), and through the gradients
when the caller differentiates through them. Extra keyword arguments (``loss_fn``, ...; see
``learnopt.optim.extra``) are forwarded to every transform.

Feature names (``transforms`` may mix names and ``{name: GradientTransformation}``):

=============================  ================================================================
``grad``                       the gradient ``g``
``param``                      the parameter value (needs ``params``)
``sign``                       ``sign(g)``
``momenta``                    ``momentum_b`` for b in ``MOMENTUM_DECAYS`` (0.5, 0.9, 0.99, 0.999)
``momentum_<b>``               ``m <- b m + (1 - b) g`` (zero start, no bias correction, as
                               ``learned_optimization``'s rolling momenta); feature ``m``
``rsqrt_second_moment``        ``rsqrt_second_moment_b`` for b in ``SECOND_MOMENT_DECAYS``
``rsqrt_second_moment_<b>``    ``v <- b v + (1 - b) g^2``; feature ``1 / sqrt(v + 1e-6)`` (finite
                               at zero gradient)
any registered optimizer       ``adam``, ``lion``, ``lamb``, ``momentum``, ...: its direction,
                               ``direction(name)``: minus the update it would make with
                               ``lr=1`` (so it points along the gradient, like ``grad``)
``step_tanh_<s>``              with ``step_timescales``: ``tanh(t / s - 1)``, ``t`` the number of
                               previous calls (``learned_optimization``'s ``_tanh_embedding``)
=============================  ================================================================

(``momentum`` alone is the registered optimizer: torch's heavy-ball buffer ``b <- 0.9 b + g``;
``momenta`` / ``momentum_<b>`` are the averages above.)

Example: a linear learned optimizer over features, meta-trained through the unroll::

    from learnopt.learned.features import TransformFeatures
    feats = TransformFeatures(["grad", "momenta", "adam"], step_timescales=(1, 10, 100))
    head = torch.nn.Linear(feats.num_features, 1)
    state = feats.init(params)
    for t in range(T):
        grads = ...                                            # dict like params
        x, state = feats(grads, state, params)                 # [N, F]
        step = feats.unflatten(head(x).squeeze(-1), params)    # dict like params
        params = {k: p - 0.01 * step[k] for k, p in params.items()}
    meta_loss.backward()                                       # reaches head.weight
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import EmptyState, GradientTransformation, Hyper, Params, zeros_like

MOMENTUM_DECAYS = (0.5, 0.9, 0.99, 0.999)
SECOND_MOMENT_DECAYS = (0.5, 0.9, 0.99, 0.999)
DEFAULT_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
DEFAULT_FEATURES = ("grad", "momenta", "rsqrt_second_moment", "adam", "lion", "sign")
RSQRT_EPS = 1e-6

FeatureSpec = (str | Sequence[str | Mapping[str, GradientTransformation]]
               | Mapping[str, GradientTransformation | str])


# -- single-feature transforms ------------------------------------------------------------------
def _stateless(fn: Callable[[str, Tensor, Params | None], Tensor]) -> GradientTransformation:
    def init(params):
        return EmptyState()

    def update(updates, state, params=None, **extra):
        return {k: fn(k, g, params) for k, g in updates.items()}, state

    return GradientTransformation(init, update)


def gradient() -> GradientTransformation:
    """The gradient itself.

    Returns:
        A ``GradientTransformation``.
    """
    return _stateless(lambda k, g, params: g)


def parameter() -> GradientTransformation:
    """The current parameter value (``params`` must be passed).

    Returns:
        A ``GradientTransformation``.
    """

    def value(k: str, g: Tensor, params: Params | None) -> Tensor:
        if params is None:
            raise ValueError("the 'param' feature needs params: call features(grads, state, params)")
        return params[k].to(g.dtype)

    return _stateless(value)


def sign() -> GradientTransformation:
    """``sign(g)`` (its derivative is 0 everywhere, so no NaN at ``g == 0``).

    Returns:
        A ``GradientTransformation``.
    """
    return _stateless(lambda k, g, params: torch.sign(g))


class EmaState(NamedTuple):
    ema: Params


def ema(decay: Hyper) -> GradientTransformation:
    """Exponential moving average of the gradient, ``m <- decay m + (1 - decay) g``, zero start,
    no bias correction (``learned_optimization``'s ``vec_rolling_mom``); the feature is ``m``.

    Args:
        decay: the decay rate.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return EmaState(zeros_like(params))

    def update(updates, state, params=None, **extra):
        m = {k: decay * state.ema[k] + (1 - decay) * g for k, g in updates.items()}
        return dict(m), EmaState(m)

    return GradientTransformation(init, update)


def rsqrt_second_moment(decay: Hyper, eps: Hyper = RSQRT_EPS) -> GradientTransformation:
    """``v <- decay v + (1 - decay) g^2``; the feature is ``1 / sqrt(v + eps)``: the normaliser
    Adam-like methods divide by, finite (and smooth) at zero gradient thanks to ``eps``.

    Args:
        decay: the decay rate of ``v``.
        eps: added to ``v`` under the square root.
    Returns:
        A ``GradientTransformation``.
    """

    def init(params):
        return EmaState(zeros_like(params))

    def update(updates, state, params=None, **extra):
        v = {k: decay * state.ema[k] + (1 - decay) * g * g for k, g in updates.items()}
        return {k: torch.rsqrt(x + eps) for k, x in v.items()}, EmaState(v)

    return GradientTransformation(init, update)


def direction(optimizer: str | GradientTransformation, **kwargs: Any) -> GradientTransformation:
    """The direction an optimizer would move, pointing along the gradient: minus its update
    at ``lr=1`` (``-updates`` of ``OPTIMIZERS[name].make(1.0, **kwargs)`` for a registered name, or of
    ``optimizer`` itself when a transform is given). For optimizers linear in ``lr`` this is
    the update with ``lr=-1``; taking ``lr=+1`` keeps step-size methods (Rprop, line
    searches) in their valid range.

    Args:
        optimizer: a catalogue name or a ``GradientTransformation``.
        **kwargs: the named optimizer's hyperparameters.
    Returns:
        A ``GradientTransformation``.
    Raises:
        TypeError: keyword arguments with a transform.
        OptimizerNotAvailable: an unknown name.
    """
    if isinstance(optimizer, str):
        from learnopt.optim.registry import get_info

        tx = get_info(optimizer).make(1.0, **kwargs)  # a wrapper (lookahead) gets lr=1 for its inner one
    else:
        if kwargs:
            raise TypeError("direction: keyword arguments apply only to an optimizer given by name")
        tx = optimizer

    def update(updates, state, params=None, **extra):
        u, state = tx.update(updates, state, params, **extra)
        return {k: -x for k, x in u.items()}, state

    return GradientTransformation(tx.init, update)


def step_embedding(count: Tensor | int, timescales: Sequence[float] = DEFAULT_TIMESCALES,
                   dtype: torch.dtype | None = None) -> Tensor:
    """``tanh(t / s - 1)`` for each timescale ``s``: ``learned_optimization``'s ``_tanh_embedding``
    of the step ``t`` (0-based). Each entry goes from ``tanh(-1)`` at ``t = 0`` towards 1 once ``t``
    is several times ``s``, so together they tell the optimizer how far training has run on
    scales from 1 to 10^4 steps.

    Args:
        count: the step ``t``.
        timescales: the timescales ``s``.
        dtype: the result's dtype (None: ``count``'s if floating, else the default dtype).
    Returns:
        ``[len(timescales)]``.
    """
    count = torch.as_tensor(count)
    dtype = dtype or (count.dtype if count.is_floating_point() else torch.get_default_dtype())
    scales = torch.as_tensor(tuple(timescales), dtype=dtype, device=count.device)
    return torch.tanh(count.to(dtype) / scales - 1.0)


# -- presets --------------------------------------------------------------------------------------
# name of the group -> (transform, decays, column prefix)
_DECAYED = {"momenta": (ema, MOMENTUM_DECAYS, "momentum"),
            "rsqrt_second_moment": (rsqrt_second_moment, SECOND_MOMENT_DECAYS, "rsqrt_second_moment")}
_SINGLE = {"momentum": ema, "rsqrt_second_moment": rsqrt_second_moment}
_BUILTIN = {"grad": gradient, "param": parameter, "sign": sign}


def preset(name: str) -> dict[str, GradientTransformation]:
    """The named feature(s): ``{column name: transform}`` (see the module docstring).

    Args:
        name: a feature name (module docstring's table).
    Returns:
        ``{column name: transform}``.
    Raises:
        ValueError: an unknown name.
    """
    if name in _BUILTIN:
        return {name: _BUILTIN[name]()}
    if name in _DECAYED:
        make, decays, prefix = _DECAYED[name]
        return {f"{prefix}_{d:g}": make(d) for d in decays}
    match = re.fullmatch(r"(momentum|rsqrt_second_moment)_([0-9.eE+-]+)", name)
    if match:
        return {name: _SINGLE[match.group(1)](float(match.group(2)))}
    from learnopt.optim.registry import OPTIMIZERS

    if name in OPTIMIZERS:
        return {name: direction(name)}
    raise ValueError(
        f"unknown feature {name!r}: use 'grad', 'param', 'sign', 'momenta', 'momentum_<decay>', "
        f"'rsqrt_second_moment[_<decay>]', a registered optimizer name ({', '.join(sorted(OPTIMIZERS))}), "
        "or pass {name: GradientTransformation}"
    )


def _resolve(transforms: FeatureSpec) -> dict[str, GradientTransformation]:
    if isinstance(transforms, str):
        transforms = [transforms]
    items = transforms.items() if isinstance(transforms, Mapping) else [(None, t) for t in transforms]
    out: dict[str, GradientTransformation] = {}

    def add(name: str, tx: GradientTransformation) -> None:
        if name in out:
            raise ValueError(f"feature {name!r} given twice")
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"feature {name!r}: expected a GradientTransformation, got {type(tx).__name__}")
        out[name] = tx

    for name, spec in items:
        if isinstance(spec, Mapping):
            for n, tx in spec.items():
                add(n, tx)
        elif isinstance(spec, str):
            expanded = preset(spec)
            if name is not None and len(expanded) == 1:
                expanded = {name: next(iter(expanded.values()))}
            elif name is not None:
                expanded = {f"{name}/{n}": tx for n, tx in expanded.items()}
            for n, tx in expanded.items():
                add(n, tx)
        else:
            add(name, spec)
    if not out:
        raise ValueError("TransformFeatures needs at least one feature")
    return out


# -- the feature extractor ------------------------------------------------------------------------
class FeaturesState(NamedTuple):
    """``TransformFeatures``' state."""

    count: Tensor  # number of previous calls (the step the embedding encodes)
    states: dict  # feature name -> that transform's state


class TransformFeatures:
    """Per-coordinate features from named gradient transformations (module docstring).

    Args:
        transforms: feature names and/or ``{name: GradientTransformation}``.
        step_timescales: timescales of ``step_embedding`` columns (None: none).
    Raises:
        ValueError: an unknown or repeated feature, or none at all.
        TypeError: a value that is not a ``GradientTransformation``.
    """

    def __init__(self, transforms: FeatureSpec = DEFAULT_FEATURES,
                 step_timescales: Sequence[float] | None = None) -> None:
        self.transforms = _resolve(transforms)
        self.step_timescales = tuple(step_timescales) if step_timescales is not None else ()
        self.names = list(self.transforms) + [f"step_tanh_{s:g}" for s in self.step_timescales]

    @property
    def num_features(self) -> int:
        """``F``, the number of feature columns."""
        return len(self.names)

    def init(self, params: Params) -> FeaturesState:
        """Every transform's state for ``params``, and a zero step count.

        Args:
            params: ``{name: tensor}``.
        Returns:
            A ``FeaturesState``.
        """
        device = next(iter(params.values())).device if params else None
        count = torch.zeros((), dtype=torch.int64, device=device)
        return FeaturesState(count, {n: tx.init(params) for n, tx in self.transforms.items()})

    def features_per_tensor(self, grads: Params, state: FeaturesState, params: Params | None = None,
                            **extra: Any) -> tuple[dict[str, Tensor], FeaturesState]:
        """``{name: [*grads[name].shape, F]}`` and the new state.

        Args:
            grads: ``{name: gradient}``.
            state: the state from ``init`` or the previous call.
            params: the current parameters (needed by ``param`` and by some directions).
            **extra: forwarded to every transform.
        Returns:
            ``({name: [*grads[name].shape, F]}, state)``.
        Raises:
            ValueError: a transform's output does not broadcast to its parameter's shape.
        """
        columns: dict[str, list[Tensor]] = {k: [] for k in grads}
        new_states = {}
        for name, tx in self.transforms.items():
            out, new_states[name] = tx.update(grads, state.states[name], params, **extra)
            for k, g in grads.items():
                try:
                    columns[k].append(torch.broadcast_to(out[k].to(g.dtype), g.shape))
                except RuntimeError as e:
                    raise ValueError(
                        f"feature {name!r}: output for {k!r} has shape {tuple(out[k].shape)}, which does "
                        f"not broadcast to the parameter's shape {tuple(g.shape)}"
                    ) from e
        if self.step_timescales:
            dtype = next(iter(grads.values())).dtype
            emb = step_embedding(state.count, self.step_timescales, dtype)
            for k, g in grads.items():
                columns[k].extend(emb[i].expand(g.shape) for i in range(len(self.step_timescales)))
        feats = {k: torch.stack(cols, dim=-1) for k, cols in columns.items()}
        return feats, FeaturesState(state.count + 1, new_states)

    def __call__(self, grads: Params, state: FeaturesState, params: Params | None = None,
                 **extra: Any) -> tuple[Tensor, FeaturesState]:
        """``[N, F]`` features (rows in ``CoordinatewiseLSTM`` order) and the new state."""
        per_tensor, state = self.features_per_tensor(grads, state, params, **extra)
        flat = torch.cat([x.reshape(-1, self.num_features) for x in per_tensor.values()], dim=0)
        return flat, state

    @staticmethod
    def unflatten(flat: Tensor, like: Params) -> Params:
        """Split a per-coordinate vector ``[N]`` (e.g. a learned optimizer's output) back into
        tensors shaped like ``like``, in the same order as the feature rows.

        Args:
            flat: ``[N]`` values, ``N`` the number of coordinates of ``like``.
            like: ``{name: tensor}`` giving names, shapes and order.
        Returns:
            ``{name: tensor}`` shaped like ``like``.
        Raises:
            ValueError: ``N`` is not the number of coordinates.
        """
        total = sum(p.numel() for p in like.values())
        if flat.shape[0] != total:
            raise ValueError(f"unflatten: got {flat.shape[0]} values for {total} coordinates")
        out, offset = {}, 0
        for k, p in like.items():
            out[k] = flat[offset: offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return out
