"""``learnopt evaluate``: a learned optimizer against tuned baselines, by the project's protocol.

Protocol (``shared/DESIGN.md``): held-out task instances and seeds (split ``"test"``), never
those of meta-training (``"train"``/``"val"``) or tuning (``"tune"``); each baseline's learning
rate chosen on a half-decade log grid by mean log10 final loss on separate ``"tune"``
instances; a baseline that diverges at a rate scores as diverged (log10 loss +30), not as
missing; mean and 95% t-interval of log10 final loss over instances; the raw per-instance
numbers saved beside the table; speedup against tuned Adam from the mean log10 loss curves
(``learnopt.metrics.speedup``: steps Adam needs ÷ steps the optimizer needs to reach the worse of
their two final losses), with the number of Adam steps needed to reach each optimizer's final
loss beside it.

W&B (``learnopt.logging_schema``): one run per optimizer in one group (job type ``evaluate``,
the full resolved configuration, the inner-loss curve keyed by inner step, the summary metrics,
the learned optimizer's checkpoint as an artifact), and one more run (config ``kind: summary``)
holding the whole table as a W&B Table with the curves as a W&B line plot and the PNG.

Learning-rate tuning as a W&B sweep (``configs/sweeps/tune_baseline_lr.yaml``): ``--lr`` runs
the baselines at a fixed rate instead of tuning them, and ``--split tune`` reports on the
tuning instances, so one sweep run per grid point scores exactly what ``tune_learning_rate``
scores.

Every optimizer runs as a plain ``torch.optim.Optimizer`` (the learned optimizer comes from
``learnopt.load_optimizer``) on the task's batched parameters. Instances are independent, so
one batched run follows each instance's own trajectory: elementwise optimizers need nothing,
and learnopt optimizers that reduce over tensors get ``batch_dims=1`` (the task's instance
dimension) so their norms, trust ratios and line searches stay per instance.

Baseline names (``--baselines '[sgd, adam, lion, lo:adam]'``):

* ``sgd``, ``nag``, ``rmsprop``, ``adam``: ``torch.optim``'s own classes (``BASELINES``), the
  independent references of the headline tables. These four names always mean torch.optim.
* ``lo:<name>``: the learnopt optimizer ``<name>`` of ``learnopt.optim.registry.OPTIMIZERS``
  (``lo:adam`` is learnopt's Adam), run through ``as_torch_optimizer``.
* a plain ``<name>`` that is not one of the four above: the same as ``lo:<name>``
  (``lion``, ``adabelief``, ``momentum``, ``nesterov``, ``lbfgs``, ...).

Optimizers whose ``update`` needs a loss closure or Hessian-vector products (``lbfgs``,
``adahessian``, ``sophia``) are stepped with ``opt.step(closure)`` (one ``lbfgs`` step is one
``torch.optim.LBFGS.step``, up to ``max_iter`` loss evaluations, so its steps cost more than the
others' and the table compares it per step, not per evaluation); the finite-sum methods
(``svrg``, ``saga``, ``jacsketch``, ``stochastic_lbfgs``) need example indices and per-example
gradients that a task family does not provide, and are refused with that reason.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from learnopt.meta.unroll import DIVERGED_LOG10, log10_losses  # noqa: F401 (DIVERGED_LOG10: public here too)
from learnopt.evaluation_results import (  # noqa: F401 (public here too)
    Evaluation, OptimizerResult, add_test_metrics, check_sweep_run, log_to_wandb, plot_curves)
from learnopt.metrics import speedup, t_interval  # noqa: F401 (public here too)
from learnopt.task import TaskFamily, normalize_loss, seeded_generator

MakeOptimizer = Callable[[list[Tensor], float], torch.optim.Optimizer]

# torch.optim's own implementations, the independent references the learned optimizer is
# measured against (Andrychowicz et al. 2016 compare with SGD, NAG, RMSprop and Adam).
BASELINES: dict[str, MakeOptimizer] = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "nag": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
}

DEFAULT_LR_GRID = tuple(10 ** (k / 2) for k in range(-8, 3))  # 1e-4 ... 10 in half decades

LEARNOPT_PREFIX = "lo:"
# Extras that ``TransformOptimizer.step(closure)`` can supply from a loss closure.
_CLOSURE_EXTRAS = {"loss_fn", "value_and_grad_fn", "hvp_fn"}


class LearnoptBaseline:
    """``(params, lr) -> torch.optim.Optimizer`` for the learnopt optimizer ``name``: the registry's
    factory with ``lr`` (and ``batch_dims=1`` where the factory reduces over tensors) wrapped by
    ``as_torch_optimizer``. ``needs_closure``: step it with ``opt.step(closure)``.

    Args:
        name: the registry name.
        label: the name given by the user, for error messages (default ``name``).
        **kwargs: further arguments of the factory.
    """

    def __init__(self, name: str, label: str | None = None, **kwargs: Any) -> None:
        from learnopt.optim.registry import OptimizerNotAvailable, get_info

        label = label or name
        try:
            self.info = get_info(name)
            self.info.factory  # noqa: B018 (fails early if the implementation is missing)
        except OptimizerNotAvailable as e:
            raise ValueError(f"unknown baseline {label!r}: {e}") from e
        unsupported = [x for x in self.info.extras if not set(x.split("|")) & _CLOSURE_EXTRAS]
        if unsupported:
            raise ValueError(
                f"baseline {label!r} needs the extra update argument(s) {', '.join(unsupported)} "
                "(example indices / per-example gradients of a finite-sum task), which learnopt evaluate "
                "cannot supply from a task family; run it through the functional API instead"
            )
        self.name = name
        self.kwargs = kwargs
        self.needs_closure = bool(self.info.extras)
        self.needs_hessian = any("hvp_fn" in x.split("|") for x in self.info.extras)

    def __call__(self, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
        from learnopt.optim.torch_optimizer import as_torch_optimizer

        kwargs = dict(self.kwargs)
        if self.info.takes_batch_dims:
            kwargs.setdefault("batch_dims", 1)  # tasks carry one leading instance dimension
        # check_finite off: one diverging instance scores as diverged without stopping the others
        return as_torch_optimizer(self.info.make(lr, **kwargs), params, check_finite=False)

    def __repr__(self) -> str:
        return f"LearnoptBaseline({self.name!r})"


def baseline_factory(name: str) -> MakeOptimizer:
    """The ``(params, lr)`` factory for a baseline name (naming rule in the module docstring).

    Args:
        name: ``sgd``, ``nag``, ``rmsprop``, ``adam``, ``lo:<name>`` or another registry name.

    Returns:
        ``BASELINES[name]`` or a ``LearnoptBaseline``.
    """
    if name.startswith(LEARNOPT_PREFIX):
        return LearnoptBaseline(name[len(LEARNOPT_PREFIX):], label=name)
    if name in BASELINES:
        return BASELINES[name]
    return LearnoptBaseline(name)


def train_with_optimizer(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], task: Any, steps: int, generator: torch.Generator,
    closure: bool = False, create_graph: bool = False, on_end: Callable[[dict[str, Tensor]], None] | None = None,
) -> Tensor:
    """Train ``task`` with an ordinary torch optimizer loop. A non-finite loss, or a step that
    raises ``FloatingPointError`` (a non-finite gradient), ends the run as diverged.

    Args:
        make: builds the optimizer from the parameter list.
        task: the tasks (parameters with a leading instance dimension).
        steps: the optimizer steps.
        generator: the source of the initialization and the minibatches.
        closure: call ``opt.step(closure)`` with a closure that recomputes the loss and its
            gradients on this step's batch (line searches need it).
        create_graph: those gradients carry a graph (Hessian-vector products need it).
        on_end: called once with the final (detached) parameters when the run ends, finished or diverged.

    Returns:
        Per-instance losses ``[steps + 1, n]`` (+inf after a divergence), on the whole training set when
        the task has ``full_loss`` (what "training loss" means in the tables), else on the minibatch.
    """
    params = {k: p.detach().clone().requires_grad_(True) for k, p in task.init(generator).items()}
    opt = make(list(params.values()))
    full_loss = getattr(task, "full_loss", None)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        batch = task.sample_batch(generator)
        loss = task.loss(params, batch)
        if full_loss is None:
            losses.append(loss.detach().clone())
        else:
            with torch.no_grad():
                losses.append(full_loss(params).detach().clone())
        if not bool(torch.isfinite(loss).all()):
            break
        try:
            if closure:
                opt.step(_loss_closure(opt, task, params, batch, create_graph))
            else:
                loss.sum().backward()
                opt.step()
        except FloatingPointError:
            break
    else:
        with torch.no_grad():
            last = full_loss(params) if full_loss is not None else task.loss(params, task.sample_batch(generator))
            losses.append(last.detach().clone())
    if on_end is not None:
        on_end({k: p.detach() for k, p in params.items()})
    while len(losses) < steps + 1:
        losses.append(torch.full_like(losses[0], math.inf))
    return torch.stack(losses)


def _loss_closure(opt: torch.optim.Optimizer, task: Any, params: dict[str, Tensor], batch: Any,
                  create_graph: bool = False) -> Callable[[], Tensor]:
    """torch.optim's closure protocol: recompute the loss and its gradients at the current
    parameters. It returns the per-instance losses (what batched line searches compare); the
    gradient is that of their sum, i.e. each instance's own. ``create_graph`` keeps the
    gradients differentiable, from which ``TransformOptimizer`` builds Hessian-vector products."""

    def closure() -> Tensor:
        opt.zero_grad()
        losses = task.loss(params, batch)
        leaves = list(params.values())
        # autograd.grad rather than backward(create_graph=True), which would tie each parameter
        # and its .grad in a reference cycle
        grads = torch.autograd.grad(losses.sum(), leaves, create_graph=create_graph)
        for p, g in zip(leaves, grads):
            p.grad = g
        return losses.detach()

    return closure


def _step_mode(make: Any) -> dict[str, bool]:
    """How ``train_with_optimizer`` must step what ``make`` builds (``LearnoptBaseline`` flags)."""
    return {"closure": getattr(make, "needs_closure", False), "create_graph": getattr(make, "needs_hessian", False)}


def score(losses: Tensor) -> float:
    """Mean log10 final loss (diverged instances count +30): the tuning and ranking criterion.

    Args:
        losses: ``[steps + 1, n]`` from ``train_with_optimizer``.

    Returns:
        The score (lower is better).
    """
    return float(log10_losses(losses[-1]).mean())


def tune_learning_rate(
    make: MakeOptimizer,
    family: TaskFamily,
    steps: int,
    num_instances: int,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """Choose the rate with the lowest mean log10 final loss on ``"tune"`` instances.

    Args:
        make: the ``(params, lr)`` factory.
        family, steps: the task family and the inner steps of each run.
        num_instances, seed: the number and the seed of the tuning instances (the same for every rate).
        lr_grid: the rates to try.

    Returns:
        The best rate, and the score (``score``) of every rate.
    """
    scores = {}
    for lr in lr_grid:
        generator = seeded_generator("tune", seed)
        task = family.sample(num_instances, generator)
        scores[lr] = score(train_with_optimizer(lambda ps: make(ps, lr), task, steps, generator, **_step_mode(make)))
    best = min(scores, key=scores.get)
    return best, scores


def evaluate_optimizers(
    optimizers: dict[str, MakeOptimizer | Callable[[list[Tensor]], torch.optim.Optimizer]],
    family: TaskFamily,
    steps: int = 100,
    num_instances: int = 128,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    tune: Sequence[str] = ("sgd", "nag", "rmsprop", "adam"),
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    tune_instances: int = 128,
    progress: bool = True,
    fixed_lr: float | None = None,
    split: str = "test",
) -> Evaluation:
    """Run every optimizer on the held-out instances (split ``split``); those named in ``tune``
    take ``(params, lr)`` and get their rate tuned first (or run at ``fixed_lr`` when given), the
    others take ``(params)``.

    Args:
        optimizers: the factories by name.
        family, steps: the task family and the inner steps of each run.
        num_instances, seeds: the instances per seed and the seeds of the held-out instances.
        tune, lr_grid, tune_instances: the names whose rate is tuned, the rates tried, the tuning instances.
        progress: show a progress bar.
        fixed_lr: run the ``tune`` optimizers at this rate instead of tuning them.
        split: the instances' split, ``"test"`` or ``"tune"``.

    Returns:
        The ``Evaluation``, one ``OptimizerResult`` per optimizer in order.
    """
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(total=len(optimizers), desc="evaluate", disable=not progress)
    for name, make in optimizers.items():
        lr, tuning, edge = None, {}, False
        if name in tune:
            if fixed_lr is None:
                bar.set_postfix_str(f"tuning {name}")
                lr, scores = tune_learning_rate(make, family, steps, tune_instances, lr_grid)
                tuning = {f"{k:.4g}": v for k, v in scores.items()}
                edge = lr in (min(lr_grid), max(lr_grid))
            else:
                lr = fixed_lr
            run = lambda ps, make=make, lr=lr: make(ps, lr)  # noqa: E731
        else:
            run = make
        bar.set_postfix_str(f"testing {name}")
        finals, normalized, seed_means, curves, seconds, tested = [], [], [], [], [], {}
        for seed in seeds:
            generator = seeded_generator(split, seed)
            task = family.sample(num_instances, generator)
            start, ends = time.perf_counter(), []
            losses = train_with_optimizer(run, task, steps, generator, on_end=ends.append, **_step_mode(make))
            seconds.append(time.perf_counter() - start)
            add_test_metrics(tested, task, ends[0])  # after the timer: not part of a step's cost
            finals.append(losses[-1])
            normalized.append(normalize_loss(task, losses[-1]))
            seed_means.append(score(losses))
            curves.append(log10_losses(losses))
        curve, per_step = torch.cat(curves, dim=1).mean(dim=1), statistics.median(seconds) / max(1, steps)
        results.append(OptimizerResult(name, lr, torch.cat(finals).tolist(), seed_means, curve.tolist(), tuning, edge,
                                       torch.cat(normalized).tolist(), per_step, tested))
        bar.update()
    bar.close()
    return Evaluation(getattr(family, "name", type(family).__name__), steps, num_instances, list(seeds), results)


def learned_optimizer_factory(checkpoint: str, **options: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """The drop-in path users take: ``learnopt.load_optimizer`` on each fresh set of parameters.
    ``check_finite`` is off so one diverging instance scores as diverged without stopping the others.
    The task's parameters carry one leading instance dimension, which learned optimizers that
    reduce over tensors (``takes_batch_dims``) are told, as in meta-training.

    Args:
        checkpoint, **options: the exported learned optimizer, and further ``load_optimizer`` arguments.

    Returns:
        A function of the parameter list that builds the optimizer.
    """
    from learnopt.checkpoint import load, load_optimizer

    options.setdefault("check_finite", False)
    if getattr(load(checkpoint), "takes_batch_dims", False):
        options.setdefault("batch_dims", 1)
    return lambda ps: load_optimizer(checkpoint, ps, **options)


def evaluate(
    checkpoint: str | None = None,
    task_family: TaskFamily | None = None,
    steps: int = 100,
    num_instances: int = 128,
    seeds: list[int] = [0, 1, 2, 3, 4],  # noqa: B006 (jsonargparse reads the default)
    baselines: list[str] = ["sgd", "nag", "rmsprop", "adam"],  # noqa: B006
    lr_grid: list[float] | None = None,
    tune_instances: int = 128,
    lr: float | None = None,
    split: Literal["test", "tune"] = "test",
    name: str | None = None,
    out_dir: str = "runs/evaluate",
    wandb: bool = True,
    group: str | None = None,
    tags: list[str] = [],  # noqa: B006
    project: str = "learnopt",
    command: str | None = None,
    record_in_checkpoint: bool = False,
    compare_checkpoints: list[str] = [],  # noqa: B006
) -> Evaluation:
    """Evaluate the learned optimizer in ``checkpoint`` against tuned baselines on held-out
    instances of ``task_family``; write ``table.md``, ``results.json`` (raw per-instance numbers)
    and ``curves.png`` to ``out_dir``; log to W&B (``learnopt.logging_schema``).

    Args:
        checkpoint: the learned optimizer; may be left out to evaluate baselines only.
        task_family: the task family (required).
        steps: the inner steps of each run.
        num_instances: the held-out instances per seed.
        seeds: the seeds of the held-out instances.
        baselines: torch.optim's sgd, nag, rmsprop, adam, or any learnopt optimizer by name (``lion``,
            ``lo:adam``; see the module docstring).
        lr_grid: the tuning grid (None: ``DEFAULT_LR_GRID``).
        tune_instances: the tuning instances.
        lr: run the baselines at this rate instead of tuning them on ``lr_grid``.
        split: ``"test"`` (held-out instances) or ``"tune"`` (the tuning instances, needs ``lr``: the
            sweep form of tuning, one rate per run).
        name: the learned optimizer's name in the table (default: the checkpoint's file stem).
        out_dir: where the files go.
        wandb: log to W&B, one run per optimizer.
        group: the W&B runs' group (default ``evaluate-<name>``).
        tags: the W&B runs' tags.
        project: the W&B project.
        command: printed under the plot (default: the command line).
        record_in_checkpoint: store the summary in the checkpoint's metadata.
        compare_checkpoints: more learned optimizers run side by side (named by file stem).

    Returns:
        The ``Evaluation``.

    Raises:
        ValueError: a missing task family, a bad split, rate or baseline, or nothing to evaluate.
    """
    config = {k: v for k, v in locals().items() if k not in ("task_family", "command")}
    if task_family is None:
        raise ValueError("evaluate needs a task_family (e.g. tasks.quadratic.QuadraticFamily())")
    if split not in ("test", "tune"):
        raise ValueError(f"split must be 'test' or 'tune', got {split!r}")
    if split == "tune" and baselines and lr is None:
        raise ValueError("split='tune' reports on the instances the learning rate is tuned on; give a fixed lr "
                         "(one rate per run, as a sweep does) or evaluate on split='test'")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    factories, problems = {}, []
    for b in baselines:
        try:
            factories[b] = baseline_factory(b)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems) + f" (torch.optim baselines: {sorted(BASELINES)}; learnopt ones: "
                         "any registered name or lo:<name>)")
    if len(set(baselines)) != len(baselines):
        raise ValueError(f"baselines {baselines} name one optimizer twice")
    if checkpoint is None and compare_checkpoints:
        raise ValueError("compare_checkpoints needs a checkpoint to compare with")
    if checkpoint is None and not baselines:
        raise ValueError("nothing to evaluate: give a checkpoint, baselines, or both")
    from learnopt.checkpoint import read_checkpoint

    learned = [checkpoint, *compare_checkpoints] if checkpoint is not None else []
    for path in learned:
        read_checkpoint(path)  # fail early, with the file named, on a bad checkpoint
    check_sweep_run(len(learned) + len(baselines), wandb)
    optimizers: dict[str, Any] = {}
    checkpoints: dict[str, str] = {}
    if checkpoint is not None:
        name = name or Path(checkpoint).stem
        optimizers[name] = learned_optimizer_factory(checkpoint)
        checkpoints[name] = str(checkpoint)
    for path in compare_checkpoints:
        if Path(path).stem in optimizers or Path(path).stem in factories:
            raise ValueError(f"compare_checkpoints: the name {Path(path).stem!r} ({path}) is taken")
        optimizers[Path(path).stem] = learned_optimizer_factory(path)
        checkpoints[Path(path).stem] = str(path)
    optimizers.update(factories)
    evaluation = evaluate_optimizers(
        optimizers, task_family, steps, num_instances, seeds, tune=baselines,
        lr_grid=tuple(lr_grid) if lr_grid else DEFAULT_LR_GRID, tune_instances=tune_instances,
        fixed_lr=lr, split=split,
    )
    evaluation.checkpoint = None if checkpoint is None else str(checkpoint)
    command = command or "learnopt evaluate" + (f" --checkpoint {checkpoint}" if checkpoint else "")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(evaluation.table() + "\n")
    (out / "results.json").write_text(json.dumps(evaluation.to_json(), indent=1))
    plot_curves(evaluation, out / "curves.png", command=command)
    if record_in_checkpoint and checkpoint is not None:
        from learnopt.checkpoint import update_metadata

        update_metadata(checkpoint, evaluation={
            "command": command, "task": evaluation.task, "steps": steps, "seeds": list(seeds),
            "num_instances": num_instances,
            "results": {r.name: {**r.summary(), "lr": r.lr} for r in evaluation.results},
        })
    if wandb:
        from learnopt.train.module import family_spec

        config = {**config, "task_family": family_spec(task_family), "command": command}
        log_to_wandb(evaluation, group or f"evaluate-{name or 'baselines'}", project=project, config=config,
                     tags=tags, checkpoints=checkpoints, plot=out / "curves.png", split=split, fixed_lr=lr is not None)
    print(evaluation.table())
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return evaluation


def evaluate_cli(args: list[str] | None = None) -> Evaluation:
    """``learnopt evaluate --checkpoint FILE [--config YAML] [--task_family CLASS_PATH] ...``

    Args:
        args: the arguments after ``evaluate`` (``None``: ``sys.argv[1:]``): ``evaluate``'s, as options.

    Returns:
        The ``Evaluation``.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="learnopt evaluate", description=evaluate.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate)
    parser.set_defaults({"task_family": {"class_path": "tasks.quadratic.QuadraticFamily"}})
    args = list(sys.argv[1:] if args is None else args)
    cfg = parser.instantiate_classes(parser.parse_args(args))
    cfg.pop("config", None)
    kwargs = {k: v for k, v in vars(cfg).items() if k != "__path__"}
    kwargs["command"] = kwargs.get("command") or " ".join(["learnopt evaluate", *args])
    return evaluate(**kwargs)
