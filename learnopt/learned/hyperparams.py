"""Meta-learned hyperparameters of a hand-designed optimizer: the simplest learned optimizer,
and the baseline every richer one should beat.

``LearnedHyperparameters(optimizer="adam", init={"lr": 1e-3}, learn=["lr", "betas"])`` is a
``LearnedOptimizer`` whose meta-parameters are the chosen hyperparameters of
``learnopt.optim.adam``; each ``update`` runs ``adam`` built from their current values, so
the meta-gradient (a hypergradient, Maclaurin et al. 2015, arXiv 1502.03492; Baydin et al.
2017, arXiv 1703.04782) flows into them. They are stored unconstrained, as
learned_optimization does (Metz et al. 2022, arXiv 2203.11860)::

    positive rates (lr, eps, weight_decay, ...):     raw = log x,            x = exp(raw)
    rates in (0, 1) (betas, momentum, alpha, rho):   raw = logit(1 - x),     x = 1 - sigmoid(raw)

so an unconstrained meta-optimizer (Adam on ``raw``) can never leave the valid range, and
steps are relative: a meta-step of 0.1 on ``raw.log_lr`` changes lr by about 10%.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from learnopt.learned.base import LearnedOptimizer
from learnopt.optim.base import GradientTransformation, Params

LOG = "log"
LOGIT_ONE_MINUS = "logit_one_minus"

# Hyperparameters that are rates in (0, 1): decay factors of moving averages and momenta.
# Every other learned hyperparameter is taken to be a positive number, learned in log space.
UNIT_INTERVAL = frozenset(
    {"betas", "beta", "beta1", "beta2", "beta3", "b1", "b2", "momentum", "alpha", "rho", "dampening", "decay"}
)


def parametrization_of(name: str) -> str:
    """``"logit_one_minus"`` for rates in (0, 1) (``UNIT_INTERVAL``), else ``"log"``.

    Args:
        name: a hyperparameter name.
    Returns:
        The parametrization's name.
    """
    return LOGIT_ONE_MINUS if name in UNIT_INTERVAL else LOG


def to_unconstrained(kind: str, value: Tensor | float) -> Tensor:
    """``log x`` or ``logit(1 - x) = log(1 - x) - log(x)``.

    Args:
        kind: ``"log"`` or ``"logit_one_minus"``.
        value: the constrained value.
    Returns:
        The raw value (float64 for a float).
    Raises:
        ValueError: an unknown ``kind``.
    """
    x = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, Tensor) else value
    if kind == LOG:
        return torch.log(x)
    if kind == LOGIT_ONE_MINUS:
        return torch.log1p(-x) - torch.log(x)
    raise ValueError(f"unknown parametrization {kind!r}")


def to_constrained(kind: str, raw: Tensor) -> Tensor:
    """``exp(raw)`` or ``1 - sigmoid(raw) = sigmoid(-raw)`` (the latter keeps small rates precise).

    Args:
        kind: ``"log"`` or ``"logit_one_minus"``.
        raw: the raw value.
    Returns:
        The constrained value.
    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == LOG:
        return torch.exp(raw)
    if kind == LOGIT_ONE_MINUS:
        return torch.sigmoid(-raw)
    raise ValueError(f"unknown parametrization {kind!r}")


def optimizer_names() -> list[str]:
    """The factories of ``learnopt.optim`` that take a learning rate ``lr``: what
    ``LearnedHyperparameters(optimizer=...)`` accepts.

    Returns:
        The sorted names.
    """
    import learnopt.optim as lo

    names = []
    for name in getattr(lo, "__all__", dir(lo)):
        obj = getattr(lo, name, None)
        if inspect.isfunction(obj):
            try:
                if "lr" in inspect.signature(obj).parameters:
                    names.append(name)
            except (TypeError, ValueError):
                continue
    return sorted(names)


def resolve_optimizer(name: str) -> Callable[..., GradientTransformation]:
    """``getattr(learnopt.optim, name)``, refusing anything that is not an optimizer factory.

    Args:
        name: a name from ``optimizer_names()``.
    Returns:
        The factory.
    Raises:
        ValueError: ``name`` is not such a factory.
    """
    import learnopt.optim as lo

    if not isinstance(name, str):
        raise ValueError(f"LearnedHyperparameters: optimizer must name a learnopt.optim factory, got {name!r}")
    known = optimizer_names()
    if name not in known:
        raise ValueError(
            f"LearnedHyperparameters: unknown optimizer {name!r}; "
            f"learnopt.optim factories with an lr: {', '.join(known)}"
        )
    return getattr(lo, name)


def _plain(value: Any) -> Any:
    """Tuples (``betas``) as lists, tensors as floats: JSON-able."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.item()
    return value


def _floats(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_floats(v) for v in value)
    return value.item() if isinstance(value, Tensor) else value


def _from_config(value: Any) -> Any:
    """JSON/YAML lists back to the tuples the factories take."""
    return tuple(_from_config(v) for v in value) if isinstance(value, list) else value


def _leaf_names(name: str, value: Any) -> list[str]:
    if not isinstance(value, tuple):
        return [name]
    base = name[:-1] if name.endswith("s") else name  # betas -> beta1, beta2 (as in the Adam paper)
    return [f"{base}{i + 1}" for i in range(len(value))]


class LearnedHyperparameters(LearnedOptimizer):
    """A hand-designed optimizer from ``learnopt.optim`` whose hyperparameters are meta-learned.

    Each learned value is an ``nn.Parameter`` ``raw.<parametrization>_<name>``, e.g.
    ``raw.log_lr``, ``raw.logit_one_minus_beta1`` (see the module docstring).
    ``hyperparameters()`` gives the current values as floats.

    Args:
        optimizer: the factory's name (``"adam"``, ``"sgd"``, ``"nesterov"``, ``"rmsprop"``, ...;
            see ``optimizer_names()``).
        init: initial hyperparameter values (keyword arguments of the factory, named as in
            ``torch.optim``); those not in ``learn`` stay fixed at these values. Learned ones not
            given start at the factory's default.
        learn: which hyperparameters are meta-parameters (None: ``["lr"]``); a tuple such as
            ``betas`` is learned element by element.
    Raises:
        ValueError: an unknown optimizer or hyperparameter, an empty or repeated ``learn``, a
            learned value outside its range or without a default, or a factory that fails.
    References:
        Maclaurin et al. 2015, arXiv 1502.03492; Baydin et al. 2017, arXiv 1703.04782.
    """

    def __init__(self, optimizer: str = "adam", init: dict[str, Any] | None = None, learn: list[str] | None = None):
        super().__init__()
        factory = resolve_optimizer(optimizer)
        init = {k: _from_config(v) for k, v in (init or {}).items()}
        learn = ["lr"] if learn is None else list(learn)
        if not learn:
            raise ValueError("LearnedHyperparameters: learn must name at least one hyperparameter")
        if len(set(learn)) != len(learn):
            raise ValueError(f"LearnedHyperparameters: learn lists a hyperparameter twice: {learn}")
        signature = inspect.signature(factory).parameters
        for what, names in (("init", list(init)), ("learn", learn)):
            unknown = [n for n in names if n not in signature]
            if unknown:
                raise ValueError(
                    f"LearnedHyperparameters: {what} names {unknown}, which {optimizer} does not take "
                    f"(its hyperparameters: {', '.join(signature)})"
                )
        self.optimizer = optimizer
        self.factory = factory
        self.learn = learn
        self.fixed = {k: v for k, v in init.items() if k not in learn}
        self.initial: dict[str, Any] = {}
        self.raw = nn.ParameterDict()
        self._slots: dict[str, list[tuple[str, str]]] = {}  # name -> [(parameter key, parametrization)]
        for name in learn:
            value = init[name] if name in init else signature[name].default
            self.initial[name] = self._add(optimizer, name, value)
        try:
            built = factory(**self.fixed, **self._constrained())
        except (TypeError, ValueError) as e:
            raise ValueError(f"LearnedHyperparameters: {optimizer}(**{self.config()['init']}) fails: {e}") from e
        if not isinstance(built, GradientTransformation):
            raise ValueError(f"LearnedHyperparameters: {optimizer} does not return a GradientTransformation")

    def _add(self, optimizer: str, name: str, value: Any) -> Any:
        if value is inspect.Parameter.empty:
            raise ValueError(
                f"LearnedHyperparameters: {optimizer}'s {name!r} has no default; give its initial value in init"
            )
        leaves = value if isinstance(value, tuple) else (value,)
        if not leaves or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves
        ):
            raise ValueError(
                f"LearnedHyperparameters: cannot learn {optimizer}'s {name!r} = {value!r}; learned hyperparameters "
                "are positive numbers or tuples of them"
            )
        kind = parametrization_of(name)
        for leaf in leaves:
            ok = 0 < leaf < 1 if kind == LOGIT_ONE_MINUS else 0 < leaf and math.isfinite(leaf)
            if not ok:
                bound = "in (0, 1)" if kind == LOGIT_ONE_MINUS else "positive and finite"
                raise ValueError(
                    f"LearnedHyperparameters: {name}={value!r} cannot be learned: it is stored as "
                    f"{kind} and must be {bound} (a hyperparameter that is 0 is a switched-off stage; keep it fixed)"
                )
        slots = []
        for leaf_name, leaf in zip(_leaf_names(name, value), leaves):
            key = f"{kind}_{leaf_name}"
            self.raw[key] = nn.Parameter(to_unconstrained(kind, float(leaf)).to(torch.get_default_dtype()))
            slots.append((key, kind))
        self._slots[name] = slots
        return tuple(float(v) for v in leaves) if isinstance(value, tuple) else float(value)

    def _constrained(self) -> dict[str, Tensor | tuple[Tensor, ...]]:
        out: dict[str, Any] = {}
        for name, slots in self._slots.items():
            values = tuple(to_constrained(kind, self.raw[key]) for key, kind in slots)
            out[name] = values if isinstance(self.initial[name], tuple) else values[0]
        return out

    def set_hyperparameters(self, **values: Any) -> None:
        """Set learned hyperparameters to the given constrained values (e.g. a tuned lr), computed
        in float64 and stored in the raw parameters' dtype.

        Args:
            **values: constrained values by hyperparameter name (a tuple or list for ``betas``).
        Raises:
            KeyError: a name is not learned.
            ValueError: the wrong number of values, or a value outside its range.
        """
        for name, value in values.items():
            if name not in self._slots:
                raise KeyError(f"LearnedHyperparameters: {name!r} is not learned (learned: {self.learn})")
            value = _from_config(value)
            leaves = value if isinstance(value, tuple) else (value,)
            if len(leaves) != len(self._slots[name]):
                raise ValueError(f"LearnedHyperparameters: {name} takes {len(self._slots[name])} values, got {value!r}")
            raws = [to_unconstrained(kind, float(leaf)) for (_, kind), leaf in zip(self._slots[name], leaves)]
            if not all(torch.isfinite(r) for r in raws):
                raise ValueError(f"LearnedHyperparameters: {name}={value!r} is outside its range")
            with torch.no_grad():
                for (key, _), raw in zip(self._slots[name], raws):
                    self.raw[key].copy_(raw)

    def current_transform(self) -> GradientTransformation:
        """The hand-designed optimizer built from the current hyperparameters (differentiable
        with respect to the raw meta-parameters).

        Returns:
            A ``GradientTransformation``.
        """
        return self.factory(**self.fixed, **self._constrained())

    def init(self, params: Params) -> Any:
        """The hand-designed optimizer's state for ``params``.

        Args:
            params: ``{name: tensor}``.
        Returns:
            ``current_transform().init(params)``.
        """
        return self.current_transform().init(params)

    def update(self, grads: Params, state: Any, params: Params | None = None, **extra: Any):
        """One step of the hand-designed optimizer at the current hyperparameters.

        Args:
            grads: ``{name: gradient}``.
            state: the state from ``init`` or the previous ``update``.
            params: the current parameters.
            **extra: passed to the optimizer's ``update``.
        Returns:
            ``(updates, state)``, differentiable in the raw meta-parameters.
        """
        return self.current_transform().update(grads, state, params, **extra)

    def hyperparameters(self) -> dict[str, Any]:
        """All hyperparameters given to the factory, as floats (tuples for ``betas``): the
        fixed ones and the learned ones at their current values.

        Returns:
            ``{name: value}``.
        """
        with torch.no_grad():
            learned = self._constrained()
        return {k: _floats(v) for k, v in {**self.fixed, **learned}.items()}

    def config(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "init": {k: _plain(v) for k, v in {**self.fixed, **self.initial}.items()},
            "learn": list(self.learn),
        }

    def extra_repr(self) -> str:
        """The optimizer, the learned names and the current values, for ``repr``."""
        return f"optimizer={self.optimizer!r}, learn={self.learn}, hyperparameters={self.hyperparameters()}"
