"""A transform's state split by parameter, the way ``torch.optim`` keeps it (``opt.state[p]``).

A transform's state is a tree (``NamedTuple``s, tuples, dicts) whose per-parameter parts are
dicts keyed by parameter name (``ScaleByAdamState(count, mu={name: ...}, nu={name: ...})``); the
other leaves (``count``) are shared by the parameters the transform was run on together. The
drop-in optimizer keeps, for every parameter, the state ``tx.init({name: p})`` gives, flattened
into ``{key: leaf}`` (``{"count": ..., "mu": ..., "nu": ...}``), and a ``Skeleton`` that says
where each key sits. ``gather`` assembles the state of several parameters, as ``tx.init`` of all
of them would lay it out, and ``scatter`` writes an updated joint state back:

    flat, skeleton = split_parameter_state(tx.init({"w": w}), "w")
    joint = gather([skeleton_w, skeleton_b], [flat_w, flat_b], ["w", "b"])
    updates, joint = tx.update(grads, joint, params)
    scatter(joint, [skeleton_w, skeleton_b], [flat_w, flat_b], ["w", "b"])

A shared leaf is taken from the first parameter: only parameters updated together so far (whose
shared leaves are equal) may be gathered together. ``check_splittable`` verifies, on a group's
initial state, that a transform's state splits this way at all, and ``unaliased`` copies the
tensors a state shares with the parameters or gradients, which the optimizer changes in place.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


class Slot(NamedTuple):
    """A leaf of the state: ``flat[key]``; ``shared`` when it is not in a per-parameter dict."""

    key: str
    shared: bool


class PerParameter(NamedTuple):
    """A dict keyed by parameter name; ``inner`` is the skeleton of this parameter's entry, or
    ``None`` where the dict has none for it (a ``partition`` member the parameter is not routed to)."""

    inner: Any


Skeleton = Any


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _walk(x: Any, name: str, path: tuple, shared: bool, leaves: list) -> Skeleton:
    if _is_namedtuple(x):
        return type(x)(*[_walk(v, name, path + (f,), shared, leaves) for f, v in zip(x._fields, x)])
    if isinstance(x, (tuple, list)):
        return type(x)(_walk(v, name, path + (str(i),), shared, leaves) for i, v in enumerate(x))
    if isinstance(x, dict):
        if set(x) <= {name}:
            return PerParameter(_walk(x[name], name, path, False, leaves) if name in x else None)
        return {k: _walk(v, name, path + (str(k),), shared, leaves) for k, v in x.items()}
    if x is None:
        return None
    slot = Slot(path, shared)
    leaves.append((slot, x))
    return slot


def _short_keys(paths: list[tuple]) -> list[str]:
    """The shortest dotted suffix of each path that no other path of the same parameter takes."""
    length = [1] * len(paths)
    while True:
        names = [".".join(p[-n:]) if p else "value" for p, n in zip(paths, length)]
        clashes = {k for k in names if names.count(k) > 1}
        grow = [i for i, k in enumerate(names) if k in clashes and length[i] < len(paths[i])]
        if not grow:
            return names
        for i in grow:
            length[i] += 1


def split_parameter_state(state: Any, name: str) -> tuple[dict[str, Any], Skeleton]:
    """``state`` (of one parameter, ``name``) as ``({key: leaf}, skeleton)``.

    Args:
      state: ``tx.init({name: p})`` or a later state of that parameter alone.
      name: the parameter's name in the transform's dicts.
    Returns:
      The flat state with short, readable keys, and the skeleton that ``gather``/``scatter`` use.
    """
    leaves: list = []
    skeleton = _walk(state, name, (), True, leaves)
    keys = _short_keys([slot.key for slot, _ in leaves])
    renamed = {slot.key: Slot(k, slot.shared) for (slot, _), k in zip(leaves, keys)}
    skeleton = _rename(skeleton, renamed)
    return {k: leaf for k, (_, leaf) in zip(keys, leaves)}, skeleton


def _rename(skel: Skeleton, renamed: dict[tuple, Slot]) -> Skeleton:
    if isinstance(skel, Slot):
        return renamed[skel.key]
    if isinstance(skel, PerParameter):
        return PerParameter(None if skel.inner is None else _rename(skel.inner, renamed))
    if _is_namedtuple(skel):
        return type(skel)(*[_rename(v, renamed) for v in skel])
    if isinstance(skel, (tuple, list)):
        return type(skel)(_rename(v, renamed) for v in skel)
    if isinstance(skel, dict):
        return {k: _rename(v, renamed) for k, v in skel.items()}
    return skel


def shared_keys(skeleton: Skeleton) -> list[str]:
    """The keys of the leaves shared by parameters updated together (step counts and the like).

    Args:
        skeleton: a parameter's skeleton.
    Returns:
        The keys.
    """
    out: list[str] = []

    def visit(s: Skeleton) -> None:
        if isinstance(s, Slot):
            if s.shared:
                out.append(s.key)
        elif isinstance(s, PerParameter):
            if s.inner is not None:
                visit(s.inner)
        elif isinstance(s, (tuple, list)):
            for v in s:
                visit(v)
        elif isinstance(s, dict):
            for v in s.values():
                visit(v)

    visit(skeleton)
    return out


def gather(skeletons: list[Skeleton], flats: list[dict[str, Any]], names: list[str]) -> Any:
    """The joint state of the parameters ``names`` (see the module docstring).

    Args:
        skeletons: each parameter's skeleton from ``split_parameter_state``.
        flats: each parameter's flat state (``opt.state[p]``).
        names: the parameters' names.
    Returns:
        The joint state, as ``tx.init`` of those parameters would give.
    """
    s0 = skeletons[0]
    if isinstance(s0, Slot):
        return flats[0][s0.key]
    if isinstance(s0, PerParameter):
        return {n: gather([s.inner], [f], [n]) for s, f, n in zip(skeletons, flats, names) if s.inner is not None}
    if _is_namedtuple(s0):
        return type(s0)(*[gather([s[i] for s in skeletons], flats, names) for i in range(len(s0))])
    if isinstance(s0, (tuple, list)):
        return type(s0)(gather([s[i] for s in skeletons], flats, names) for i in range(len(s0)))
    if isinstance(s0, dict):
        return {k: gather([s[k] for s in skeletons], flats, names) for k in s0}
    return s0


def scatter(state: Any, skeletons: list[Skeleton], flats: list[dict[str, Any]], names: list[str]) -> None:
    """Write the joint ``state`` of the parameters ``names`` back into their flat states.

    Args:
        state: the joint state.
        skeletons: each parameter's skeleton from ``split_parameter_state``.
        flats: each parameter's flat state (``opt.state[p]``).
        names: the parameters' names.
    Raises:
        ValueError: the state's structure changed.
    """
    s0 = skeletons[0]
    if isinstance(s0, Slot):
        for s, f in zip(skeletons, flats):
            f[s.key] = state
    elif isinstance(s0, PerParameter):
        for s, f, n in zip(skeletons, flats, names):
            if s.inner is not None:
                scatter(state[n], [s.inner], [f], [n])
    elif isinstance(s0, (tuple, list)):
        if len(state) != len(s0):
            raise ValueError(f"the transform's state changed shape: {len(state)} entries where it had {len(s0)}")
        for i, x in enumerate(state):
            scatter(x, [s[i] for s in skeletons], flats, names)
    elif isinstance(s0, dict):
        for k in s0:
            scatter(state[k], [s[k] for s in skeletons], flats, names)


def same_state(a: Any, b: Any) -> bool:
    """Whether two states have the same structure (dict keys in any order) and equal leaves.

    Args:
        a: a state.
        b: another.
    Returns:
        Whether they are the same.
    """
    if _is_namedtuple(a) or isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, Tensor):
        return (isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(a, b.to(a.device))))
    return type(a) is type(b) and a == b


def check_splittable(joint: Any, skeletons: list[Skeleton], flats: list[dict[str, Any]], names: list[str]) -> bool:
    """Whether the per-parameter states, gathered, equal ``joint`` (``tx.init`` of all of them).

    Args:
        joint: ``tx.init`` of the parameters together.
        skeletons: each parameter's skeleton from ``split_parameter_state``.
        flats: each parameter's flat state (``opt.state[p]``).
        names: the parameters' names.
    Returns:
        Whether the split states gather back to ``joint``.
    """
    try:
        return same_state(gather(skeletons, flats, names), joint)
    except (KeyError, IndexError, TypeError):
        return False


def unaliased(state: Any, tensors: Iterable[Tensor]) -> Any:
    """``state`` with copies of its tensors that share memory with ``tensors`` (the parameters and
    gradients, which change in place after a step; a transform may keep what it was given, e.g. an
    SVRG snapshot or a previous gradient). Only aliased tensors are copied.

    Args:
        state: a transform's state (any tree of tensors).
        tensors: the tensors the drop-in optimizer changes in place.
    Returns:
        ``state`` with the aliased tensors replaced by copies.
    """
    storages = {t.untyped_storage().data_ptr() for t in tensors}

    def copy_if_aliased(x: Any) -> Any:
        if isinstance(x, Tensor) and x.numel() and x.untyped_storage().data_ptr() in storages:
            return x.clone()
        return x

    return pytree.tree_map(copy_if_aliased, state)
