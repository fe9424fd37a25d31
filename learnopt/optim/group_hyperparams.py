"""A transform's hyperparameters as the keys of a ``torch.optim`` param group.

A catalogue transform carries its ``Recipe`` (``factory`` and arguments, ``base.rebuildable``).
``GroupHyperparameters`` lists the arguments a param group shows (``lr``, ``betas``, ``eps``, ...:
numbers, bools, strings, tensors and tuples of them), with the values the transform was built
with as defaults, and builds the transform again from a group's current values, so a scheduler
that writes ``group["lr"]`` changes the next step. A wrapper's inner transform (``lookahead``'s
``optimizer``) shows its own hyperparameters in the same group; a wrapper argument whose name
the inner one takes too is shown as ``<wrapper>_<name>``. Arguments that are not values
(callables, ``is_matrix``) stay as built.

A transform without a recipe (put together by hand, or a learned optimizer) shows one key, ``lr``,
a multiplier of its update (1.0: the update as it is; 0: the parameters do not move).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from learnopt.optim.base import GradientTransformation, Recipe

# Keys that torch.optim's schedulers and torch itself add to param groups; a group may hold them.
BOOKKEEPING_KEYS = frozenset({
    "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "param_names",
})


def _is_value(x: Any) -> bool:
    if isinstance(x, (tuple, list)):
        return all(_is_value(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str, Tensor))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _non_finite(x: Any) -> bool:
    if isinstance(x, (tuple, list)):
        return any(_non_finite(v) for v in x)
    if isinstance(x, bool) or not isinstance(x, (int, float, Tensor)):
        return False
    if isinstance(x, Tensor):
        return x.is_floating_point() and not bool(x.detach().isfinite().all())
    return not math.isfinite(x)


class Resolved(NamedTuple):
    """A group's hyperparameter ``values``, the transform ``tx`` they build and the ``layout``
    (``structure_key``) of the state that transform keeps."""

    values: dict[str, Any]
    tx: GradientTransformation
    layout: tuple


class GroupHyperparameters:
    """The param-group view of ``tx``'s hyperparameters (module docstring).

    ``defaults``: ``{key: value}`` as ``tx`` was built; ``resolve(group)``: ``tx`` built again
    from a group's values (kept while they stay the same); ``multiplier``: whether ``lr`` is a
    multiplier of a recipe-less transform's update rather than an argument of its factory.

    Args:
        tx: the transform.
    """

    def __init__(self, tx: GradientTransformation) -> None:
        self.tx = tx
        self.multiplier = tx.recipe is None
        self.factory_name = "transform" if tx.recipe is None else getattr(tx.recipe.factory, "__name__", "transform")
        # key -> path of argument names through nested recipes
        self.paths: dict[str, tuple[str, ...]] = {}
        self.defaults: dict[str, Any] = {}
        if self.multiplier:
            self.paths["lr"] = ()
            self.defaults["lr"] = 1.0
        else:
            self._collect(tx.recipe, ())
        self._resolved: dict[int, Resolved] = {}  # id(group) -> its last resolution

    def _collect(self, recipe: Recipe, prefix: tuple[str, ...]) -> None:
        own = {}
        for name, value in recipe.arguments.items():
            if isinstance(value, GradientTransformation) and value.recipe is not None:
                self._collect(value.recipe, prefix + (name,))
            elif _is_value(value):
                own[name] = value
        for name, value in own.items():
            key = name if name not in self.paths else f"{getattr(recipe.factory, '__name__', 'wrapper')}_{name}"
            self.paths[key] = prefix + (name,)
            self.defaults[key] = value

    def check(self, group: dict[str, Any], where: str, new: bool) -> None:
        """Refuse unknown keys (only in a group being added: schedulers add their own later) and
        non-finite numbers, naming the group ``where`` and the key.

        Args:
            group: a param group.
            where: the group's name, for messages.
            new: the group is being added (refuse unknown keys).
        Raises:
            ValueError: an unknown key (``new`` only) or a non-finite value.
        """
        if new:
            unknown = set(group) - {"params"} - set(self.paths) - BOOKKEEPING_KEYS
            if unknown:
                raise ValueError(
                    f"{where}: unknown option(s) {sorted(unknown)} for {self.factory_name}; "
                    f"its param groups take {sorted(self.paths)}"
                )
        for key in self.paths:
            if key in group and _non_finite(group[key]):
                raise ValueError(f"{where}: {key}={group[key]!r} is not finite")

    def values(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's current values of the transform's hyperparameters.

        Args:
            group: a param group.
        Returns:
            ``{key: value}``.
        """
        return {key: group[key] for key in self.paths}

    def resolve(self, group: dict[str, Any], where: str) -> Resolved:
        """The group's current values, checked (``check``), and the transform and state layout
        they give. The result is kept per group and reused while the values stay the same (the
        same numbers, the same tensor objects), so an unchanged group costs one comparison.

        Args:
            group: a param group.
            where: the group's name, for messages.
        Returns:
            A ``Resolved``.
        Raises:
            ValueError: a non-finite value.
        """
        cached = self._resolved.get(id(group))
        if cached is not None and all(_same(group.get(k), v) for k, v in cached.values.items()):
            return cached
        self.check(group, where, new=False)
        values = self.values(group)
        resolved = Resolved(values, self.transform(values), self.structure_key(values))
        self._resolved[id(group)] = resolved
        return resolved

    def transform(self, values: dict[str, Any]) -> GradientTransformation:
        """``tx`` with the group's ``values`` (for a multiplier, ``tx`` itself).

        Args:
            values: ``{key: value}`` from ``values``.
        Returns:
            A ``GradientTransformation``.
        """
        if self.multiplier:
            return self.tx
        # Factories may compute with a hyperparameter (``-lr``); a tensor that requires grad must keep
        # its graph even when this is called from a no-grad optimizer step.
        with torch.enable_grad():
            return self._build(self.tx.recipe, (), values)

    def _build(self, recipe: Recipe, prefix: tuple[str, ...], values: dict[str, Any]) -> GradientTransformation:
        arguments = dict(recipe.arguments)
        for name, value in recipe.arguments.items():
            if isinstance(value, GradientTransformation) and value.recipe is not None:
                arguments[name] = self._build(value.recipe, prefix + (name,), values)
        for key, path in self.paths.items():
            if path[:-1] == prefix:
                old = arguments[path[-1]]
                new = values[key]
                # schedulers write lists where a tuple was (OneCycleLR's betas); keep the factory's type
                arguments[path[-1]] = tuple(new) if isinstance(old, tuple) and isinstance(new, list) else new
        return recipe.factory(**arguments)

    def structure_key(self, values: dict[str, Any]) -> tuple:
        """What decides the layout of the transform's state: factories add or drop a stage for a
        literal zero (``sgd``'s momentum), a flag or ``None``; other values only change numbers.

        Args:
            values: ``{key: value}`` from ``values``.
        Returns:
            A hashable key; equal keys give states of one layout.
        """

        def key(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return tuple(key(x) for x in v)
            if isinstance(v, bool) or v is None or isinstance(v, str):
                return v
            if isinstance(v, (int, float)):
                return v == 0
            return "tensor"

        return tuple(key(values[k]) for k in sorted(self.paths))

    def factory_of(self) -> Callable[..., GradientTransformation] | None:
        """The catalogue factory ``tx`` was built by.

        Returns:
            The factory, or None for a recipe-less transform.
        """
        return None if self.multiplier else self.tx.recipe.factory
