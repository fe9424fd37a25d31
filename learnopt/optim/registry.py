"""The catalogue of learnopt's hand-designed optimizers, by name.

``OPTIMIZERS[name]`` is an ``OptimizerInfo``: where the factory lives, the paper, the
independent implementation its tests compare trajectories against, the extra ``update``
arguments it needs (``learnopt.optim.extra``), and whether it works on batched parameters and
with differentiable (tensor) hyperparameters::

    from learnopt.optim.registry import OPTIMIZERS, get_optimizer
    tx = get_optimizer("lion")(lr=1e-4)
    opt = make_torch_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=0.1)

``scripts/optimizer_table.py`` writes ``docs/optimizers.md`` from this table.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from learnopt.optim.base import GradientTransformation
from learnopt.optim.torch_optimizer import TransformOptimizer, as_torch_optimizer

Factory = Callable[..., GradientTransformation]


class OptimizerNotAvailable(LookupError):
    """An optimizer name that is not in the catalogue."""


@dataclass(frozen=True)
class OptimizerInfo:
    """One row of the catalogue.

    Attributes:
        name: the catalogue name.
        source: the paper (authors, year, arXiv id where there is one).
        reference: the independent implementation the tests compare trajectories against.
        extras: the ``update(..., **extra)`` keys the method cannot run without (alternatives
            joined by ``|``, e.g. ``"hvp_fn|loss_fn"``).
        batched: runs on parameters with leading task-instance dimensions (elementwise, or per
            instance through ``batch_dims``).
        differentiable_hyperparams: tensor hyperparameters receive gradients through ``update``.
        attr: the factory's attribute name in ``module`` when it differs from ``name``.
        module: the module that holds the factory.
        wraps: the factory's argument for an inner ``GradientTransformation`` (Lookahead); ``make``
            builds it around ``wraps_default`` with the given ``lr``.
        wraps_default: the catalogue name of the default inner optimizer.
        notes: a remark for ``docs/optimizers.md``.
    """

    name: str
    source: str
    reference: str
    extras: tuple[str, ...] = ()
    batched: bool = True
    differentiable_hyperparams: bool = True
    attr: str | None = None
    module: str = "learnopt.optim"
    wraps: str | None = None
    wraps_default: str = "adam"
    notes: str = ""

    @property
    def factory_name(self) -> str:
        """The factory's attribute name in ``module``."""
        return self.attr or self.name

    @property
    def factory(self) -> Factory:
        """The factory (imported from ``module``)."""
        return getattr(importlib.import_module(self.module), self.factory_name)

    def parameters(self) -> list[str]:
        """The factory's keyword arguments (hyperparameter names).

        Returns:
            The names, in signature order.
        """
        return list(inspect.signature(self.factory).parameters)

    @property
    def takes_batch_dims(self) -> bool:
        """Whether the factory reduces over tensors and takes ``batch_dims`` (else it is elementwise)."""
        return "batch_dims" in self.parameters()

    def make(self, lr: Any = None, **kwargs: Any) -> GradientTransformation:
        """``factory(lr=lr, **kwargs)``; for a wrapper, ``factory(inner, **kwargs)`` with the inner
        optimizer ``kwargs.pop(wraps)`` (a transform or a catalogue name, default
        ``wraps_default``) built with ``lr``.

        Args:
            lr: the learning rate (None: the factory's default).
            **kwargs: the factory's other arguments.
        Returns:
            The ``GradientTransformation``.
        """
        if lr is not None and not self.wraps:
            kwargs["lr"] = lr
        if self.wraps:
            inner = kwargs.pop(self.wraps, self.wraps_default)
            if isinstance(inner, str):
                inner = get_info(inner).make(lr) if lr is not None else get_optimizer(inner)()
            return self.factory(inner, **kwargs)
        return self.factory(**kwargs)


_ROWS = [
    # name, source, reference used by the tests, extras
    ("sgd", "Robbins & Monro 1951", "torch.optim.SGD", ()),
    ("momentum", "Polyak 1964 (heavy ball)", "torch.optim.SGD(momentum=0.9)", ()),
    ("nesterov", "Nesterov 1983; Sutskever et al. 2013", "torch.optim.SGD(nesterov=True)", ()),
    ("rprop", "Riedmiller & Braun 1992", "torch.optim.Rprop", ()),
    ("quickprop", "Fahlman 1988", "transcription of the paper in the test", ()),
    ("sign_sgd", "Crawshaw et al. 2022 (generalized SignSGD), arXiv 2208.11195",
     "transcription of the paper in the test; pytorch_optimizer.SignSGD (signSGD, Signum cases)", ()),
    ("adagrad", "Duchi et al. 2011, JMLR", "torch.optim.Adagrad", ()),
    ("adagrad_norm", "Ward et al. 2018 (AdaGrad-Norm), arXiv 1806.01811", "transcription of the paper in the test", ()),
    ("adadelta", "Zeiler 2012, arXiv 1212.5701", "torch.optim.Adadelta", ()),
    ("rmsprop", "Hinton, Coursera lecture 6e", "torch.optim.RMSprop", ()),
    ("adam", "Kingma & Ba 2014, arXiv 1412.6980", "torch.optim.Adam", ()),
    ("adamw", "Loshchilov & Hutter 2017, arXiv 1711.05101", "torch.optim.AdamW", ()),
    ("amsgrad", "Reddi et al. 2018, ICLR", "torch.optim.Adam(amsgrad=True)", ()),
    ("nadam", "Dozat 2016, ICLR workshop", "torch.optim.NAdam", ()),
    ("radam", "Liu et al. 2020, arXiv 1908.03265", "torch.optim.RAdam", ()),
    ("eadam", "Yuan 2020, arXiv 2011.02150", "transcription of the paper in the test", ()),
    ("adabelief", "Zhuang et al. 2020, arXiv 2010.07468", "pytorch_optimizer.AdaBelief", ()),
    ("lion", "Chen et al. 2023, arXiv 2302.06675", "pytorch_optimizer.Lion", ()),
    ("lamb", "You et al. 2020, arXiv 1904.00962",
     "transcription of the paper's Algorithm 2 in the test; pytorch_optimizer.Lamb (no bias correction)", ()),
    ("lookahead", "Zhang et al. 2019, arXiv 1907.08610", "pytorch_optimizer.Lookahead", ()),
    ("muon", "Jordan et al. 2024 (Muon), kellerjordan.github.io/posts/muon",
     "torch.optim.Muon + torch.optim.AdamW; Keller Jordan's zeropower_via_newtonschulz5 transcribed", ()),
    ("apollo", "Ma 2021, arXiv 2009.13586", "pytorch_optimizer.ApolloDQN", ()),
    ("adahessian", "Yao et al. 2020, arXiv 2006.00719", "pytorch_optimizer.AdaHessian", ("hvp_fn|loss_fn",)),
    ("sophia", "Liu et al. 2023, arXiv 2305.14342", "pytorch_optimizer.SophiaH", ("hvp_fn|loss_fn",)),
    ("lbfgs", "Liu & Nocedal 1989", "torch.optim.LBFGS", ("value_and_grad_fn|loss_fn",)),
    ("newton", "Newton–CG with Levenberg–Marquardt damping (Marquardt 1963; Nocedal & Wright 2006, ch. 7.1, 10.3)",
     "hand transcription in the test (explicit Hessian, linalg.solve)", ("hvp_fn|loss_fn|value_and_grad_fn",)),
    ("stochastic_lbfgs", "Moritz et al. 2016, AISTATS, arXiv 1508.02087",
     "transcription of the paper in the test",
     ("indices", "batch_grad_fn", "full_grad_fn", "num_examples", "loss_fn")),
    ("svrg", "Johnson & Zhang 2013, NeurIPS", "transcription of the paper in the test",
     ("indices", "batch_grad_fn", "full_grad_fn", "num_examples")),
    ("saga", "Defazio et al. 2014, NeurIPS, arXiv 1407.0202", "transcription of the paper in the test",
     ("indices", "example_grads_fn")),
    ("jacsketch", "Gower et al. 2018, Math. Programming, arXiv 1805.02632", "transcription of the paper in the test",
     ("indices", "example_grads_fn")),
]

# Per-row departures from the defaults above.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "lookahead": {"wraps": "optimizer", "wraps_default": "adam"},
    "muon": {"notes": "`lr` is the rate of the 2-d (hidden) weight matrices; every other tensor goes to "
                      "AdamW with `adamw_lr`, which `make(lr)`, evaluate's tuning and the feature direction "
                      "(`lr=1`) leave at its default."},
    "lbfgs": {"notes": "one `update` is one `torch.optim.LBFGS.step` (up to `max_iter` evaluations); with "
                       "`batch_dims` the loss must be per instance. Hypergradients flow with the default "
                       "`line_search_fn=None`, not through the strong-Wolfe search's choice of step."},
    "stochastic_lbfgs": {"notes": "`num_examples` only without `epoch_length`; `loss_fn` (the Hessian "
                                  "subsample's loss) only every `hessian_period`-th update."},
    "svrg": {"notes": "`num_examples` only without `epoch_length`."},
    "saga": {"notes": "`num_examples` (the size of the gradient table) is a constructor argument."},
    "jacsketch": {"notes": "`num_examples` (the size of the gradient table) is a constructor argument."},
}

OPTIMIZERS: dict[str, OptimizerInfo] = {
    name: OptimizerInfo(name, source, reference, tuple(extras), **_OVERRIDES.get(name, {}))
    for name, source, reference, extras in _ROWS
}


def get_info(name: str) -> OptimizerInfo:
    """The catalogue row for ``name`` (``OptimizerNotAvailable`` with suggestions if unknown).

    Args:
        name: a catalogue name (``OPTIMIZERS``).
    Returns:
        Its ``OptimizerInfo``.
    Raises:
        OptimizerNotAvailable: ``name`` is not in the catalogue.
    """
    info = OPTIMIZERS.get(name)
    if info is None:
        close = difflib.get_close_matches(name, list(OPTIMIZERS), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise OptimizerNotAvailable(
            f"unknown optimizer {name!r}{hint} (known: {', '.join(OPTIMIZERS)})"
        )
    return info


def get_optimizer(name: str) -> Factory:
    """The factory of ``name``; ``OptimizerNotAvailable`` if unknown.

    Args:
        name: a catalogue name (``OPTIMIZERS``).
    Returns:
        The factory, e.g. ``learnopt.optim.lion``.
    Raises:
        OptimizerNotAvailable: ``name`` is not in the catalogue.
    """
    return get_info(name).factory


def make_torch_optimizer(
    name: str, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]], lr: Any, **kwargs: Any
) -> TransformOptimizer:
    """``as_torch_optimizer(factory(lr=lr, **kwargs), params)``: a registered optimizer as a
    drop-in ``torch.optim.Optimizer``. Options of ``TransformOptimizer`` (``check_finite``) may
    be passed as ``options={...}``.

    Args:
        name: a catalogue name.
        params: tensors or ``(name, tensor)`` pairs.
        lr: the learning rate (for a wrapper, its inner optimizer's).
        **kwargs: the factory's other hyperparameters, and ``options``.
    Returns:
        A ``TransformOptimizer``.
    Raises:
        OptimizerNotAvailable: ``name`` is not in the catalogue.
    """
    options = kwargs.pop("options", {})
    return as_torch_optimizer(get_info(name).make(lr, **kwargs), params, **options)


def markdown_table() -> str:
    """``docs/optimizers.md``: the catalogue as a Markdown table (``scripts/optimizer_table.py``).

    Returns:
        The page's Markdown text.
    """
    lines = [
        "# Hand-designed optimizers",
        "",
        "Generated from `learnopt.optim.registry.OPTIMIZERS` by `python scripts/optimizer_table.py`;",
        "do not edit by hand. Every optimizer is `learnopt.optim.<name>(lr=..., ...)`, a",
        "`GradientTransformation`; `make_torch_optimizer(name, params, lr)` gives a `torch.optim.Optimizer`,",
        "and `learnopt evaluate --baselines '[<name>]'` tunes it as a baseline (`lo:<name>` for",
        "learnopt's `sgd`, `rmsprop`, `adam`, whose plain names mean torch.optim's).",
        "",
        "- **reference**: the independent implementation whose trajectory the tests match step by step.",
        "- **extras**: `update(..., **extra)` arguments it needs (`learnopt.optim.extra`).",
        "- **differentiable hyperparameters**: tensor hyperparameters (e.g. `lr`) get gradients through `update`.",
        "- **feature**: usable as a learned optimizer's input by `TransformFeatures([name])`",
        "  (`learnopt.learned.features`): its direction, minus its update at `lr=1`.",
        "- **batching**: parameters with leading task-instance dimensions: `elementwise` (nothing to do) or",
        "  `batch_dims` (pass `batch_dims=<number of leading instance dimensions>`; reductions stay per instance).",
        "",
        ("| optimizer | source | reference in the tests | extras | differentiable hyperparameters | feature "
         "| batching |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in OPTIMIZERS.items():
        extras = ", ".join(" or ".join(f"`{k}`" for k in e.split("|")) for e in info.extras) or "—"
        batching = "`batch_dims`" if info.takes_batch_dims else "elementwise"
        if info.wraps:
            batching += " (as its inner optimizer)"
        if not info.batched:
            batching = "no"
        feature = "yes" if not info.extras else "with extras"
        if info.wraps:
            name_cell = f"`{name}` (wraps `{info.wraps}`, default {info.wraps_default})"
        else:
            name_cell = f"`{name}`"
        lines.append(
            f"| {name_cell} | {info.source} | {info.reference} | {extras} | "
            f"{'yes' if info.differentiable_hyperparams else 'no'} | {feature} | {batching} |"
        )
    notes = [(n, i.notes) for n, i in OPTIMIZERS.items() if i.notes]
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{n}`: {text}" for n, text in notes]
    return "\n".join(lines) + "\n"
