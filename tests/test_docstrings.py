"""Every public callable of the listed packages has a Google-style docstring: an ``Args:`` section
when it takes arguments, a ``Returns:`` (or ``Yields:``) section unless it is annotated ``-> None``.

Public means: the names a package exports (``__all__``, else the functions and classes a module
defines without a leading underscore), the factories of the optimizer catalogue, and the public
methods of those classes defined in learnopt (not inherited from torch). A method that overrides
a documented one inherits its docstring, and an override of torch's (``step``, ``state_dict``)
needs only torch's. Properties need a docstring only;
classes need one, with ``Args:`` (or ``Attributes:``, for dataclasses) when their ``__init__``
takes arguments, documented on the class or on ``__init__``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest

# Packages and modules whose public API is checked; add a name to put it under the test.
# (foreach_more and foreach_torch are left out: their kernels follow foreach's documented protocol.)
MODULES = [
    "learnopt.optim",
    *(f"learnopt.optim.{name}" for name in (
        "adam_family", "alias", "base", "combinators", "extra", "foreach", "group_hyperparams", "hessian",
        "hyperparams", "muon", "newton", "numerics", "param_state", "quasi_newton", "registry", "sign_secant",
        "stochastic_lbfgs", "torch_optimizer", "transforms", "variance_reduced")),
    "learnopt.learned",
    *(f"learnopt.learned.{name}" for name in ("base", "features", "hyperparams", "lstm", "mlp_lopt", "preprocess")),
    *(f"learnopt.learned.{name}" for name in ("general", "general_lstm", "general_compact", "general_compact_kernels")),
    "learnopt.checkpoint",
    "learnopt.blackbox",
    "learnopt.blackbox.baselines",
    "learnopt.blackbox.box",
    "learnopt.blackbox.gp",
    "learnopt.blackbox.losses",
    "learnopt.blackbox.refine",
    "learnopt.blackbox.standardizer",
    "learnopt.blackbox.trend",
    "learnopt.vsml",
    "learnopt.vsml.clone",
    "learnopt.vsml.evaluate",
    "learnopt.gradient_free",
    "learnopt.task",
    "learnopt.metrics",
    "learnopt.runtime",
    "learnopt.meta",
    *(f"learnopt.meta.{name}" for name in (
        "augmentation", "base", "compiled", "episodic", "es", "pes", "schedules", "truncated_bptt", "truncation",
        "unroll")),
    *(f"learnopt.train.{name}" for name in (
        "callbacks", "checkpoint_io", "cli", "config_errors", "module", "run_lock", "wandb_logging")),
    *(f"learnopt.{name}" for name in (
        "atomic_file", "compare", "compare_output", "comparison", "evaluate", "evaluation_results", "logging_schema",
        "run_reader", "wandb_files", "evaluate_suite")),
    *(f"tasks.{name}" for name in ("blackbox_benchmarks", "blackbox_episodes", "char_lm", "cnn", "datasets",
                                   "gp_functions", "logistic", "mlp", "online", "quadratic", "rosenbrock")),
]
# Modules whose objects are skipped even when a listed package re-exports them (being rewritten).
SKIPPED_MODULES = ()


def _section(doc: str, *names: str) -> bool:
    return any(re.search(rf"^\s*{name}:\s*$", doc, re.MULTILINE) for name in names)


def _exports(module_name: str) -> Iterator[tuple[str, Any]]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module_name]
    for name in names:
        yield f"{module_name}.{name}", getattr(module, name)


def _catalogue() -> Iterator[tuple[str, Any]]:
    from learnopt.optim.registry import OPTIMIZERS

    for name, info in OPTIMIZERS.items():
        yield f"OPTIMIZERS[{name!r}]", info.factory


def _own(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.startswith(("learnopt", "tasks")) and not module.startswith(SKIPPED_MODULES)


def _takes_arguments(fn: Any, skip_first: bool) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    return len(params) > (1 if skip_first else 0)


def _returns_something(fn: Any) -> bool:
    annotation = inspect.signature(fn).return_annotation
    return annotation not in (None, "None", type(None))


def _problems_of_function(fn: Any, skip_first: bool = False, owner: type | None = None) -> list[str]:
    doc = inspect.getdoc(fn) or _inherited_doc(owner, fn.__name__)
    if not doc:
        return ["no docstring"]
    problems = []
    if _takes_arguments(fn, skip_first) and not _section(doc, "Args"):
        problems.append("no Args: section")
    if _returns_something(fn) and not _section(doc, "Returns", "Yields"):
        problems.append("no Returns: section")
    return problems


def _inherited_doc(cls: type | None, name: str) -> str | None:
    """The docstring of the nearest learnopt base of ``cls`` that documents ``name``."""
    for klass in (cls.__mro__[1:] if cls is not None else ()):
        raw = vars(klass).get(name)
        doc = getattr(getattr(raw, "__func__", raw), "__doc__", None)
        if doc and _own(klass):
            return inspect.cleandoc(doc)
    return None


def _methods(cls: type) -> Iterator[tuple[str, Any, bool]]:
    """(name, function, whether its first argument is bound) for the public methods of ``cls``
    defined in learnopt, and its properties (function None)."""
    seen = set()
    for klass in cls.__mro__:
        if not _own(klass):
            continue
        for name, raw in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(raw, property):
                yield name, None, False
            elif isinstance(raw, staticmethod):
                yield name, raw.__func__, False
            elif isinstance(raw, classmethod):
                yield name, raw.__func__, True
            elif inspect.isfunction(raw):
                yield name, raw, True


def _problems_of_class(cls: type) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    doc = inspect.getdoc(cls) or ""
    if not cls.__doc__:
        out[""] = ["no docstring"]
    init = vars(cls).get("__init__")
    is_tuple = issubclass(cls, tuple)  # a NamedTuple's fields are its documentation
    is_protocol = getattr(cls, "_is_protocol", False)  # (its __init__ is typing's)
    if (init is not None and not is_tuple and not is_protocol and not issubclass(cls, BaseException)
            and _takes_arguments(init, True)):
        init_doc = inspect.getdoc(init) or ""
        if not (_section(doc, "Args", "Attributes") or _section(init_doc, "Args")):
            out.setdefault("", []).append("no Args: section for __init__")
    if dataclasses.is_dataclass(cls) and not is_tuple and not _section(doc, "Args", "Attributes"):
        out.setdefault("", []).append("no Args:/Attributes: section for its fields")
    foreign = {name for klass in cls.__mro__ if not _own(klass) for name in vars(klass)}
    for name, fn, bound in _methods(cls):
        if fn is None or name in foreign:  # a property, or an override of torch's documented method
            if not inspect.getdoc(getattr(cls, name)):
                out[name] = ["no docstring"]
            continue
        problems = _problems_of_function(fn, skip_first=bound, owner=cls)
        if problems:
            out[name] = problems
    return out


def _public_api() -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for module_name in MODULES:
        objects.update(_exports(module_name))
    objects.update(_catalogue())
    return {k: v for k, v in objects.items() if (inspect.isfunction(v) or inspect.isclass(v)) and _own(v)}


def _all_problems() -> list[str]:
    problems, done = [], set()
    for where, obj in sorted(_public_api().items()):
        if id(obj) in done:
            continue
        done.add(id(obj))
        name = f"{obj.__module__}.{obj.__qualname__}"
        if inspect.isclass(obj):
            for member, found in _problems_of_class(obj).items():
                problems.append(f"{name}{'.' + member if member else ''}: {', '.join(found)}")
        else:
            found = _problems_of_function(obj)
            if found:
                problems.append(f"{name}: {', '.join(found)}")
    return problems


def test_the_walk_finds_the_public_api():
    api = _public_api()
    assert "learnopt.optim.adam" in api and "learnopt.blackbox.RNNProposer" in api
    assert "OPTIMIZERS['lion']" in api and "learnopt.checkpoint.load" in api
    assert len(api) > 150


@pytest.mark.parametrize("doc,args,returns", [
    ("Summary.\n\nArgs:\n    x: a thing.\n\nReturns:\n    y.", True, True),
    ("Summary.\n\nArguments x and y, returns z.", False, False),
])
def test_sections_are_found_only_as_headers(doc, args, returns):
    assert _section(doc, "Args") is args and _section(doc, "Returns") is returns


def test_public_callables_document_their_arguments_and_return_values():
    problems = _all_problems()
    assert not problems, f"{len(problems)} public callables lack docstring sections:\n" + "\n".join(problems)
