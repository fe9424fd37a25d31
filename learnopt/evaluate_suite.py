"""``learnopt evaluate --suite``: a learned optimizer on a held-out suite of problems against
the practitioner's baselines, summarised across problems as Celo does.

Each problem (a task family with a name) is evaluated by ``learnopt.evaluate``'s protocol
(``evaluate_optimizers``: held-out ``"test"`` seeds, learning rates tuned on separate ``"tune"``
instances over a half-decade grid, diverged runs scored +30 in log10) with these optimizers:

* the learned optimizer of ``checkpoint`` as users load it (``load_optimizer``), told the run
  length (``num_steps``) where it takes one, and with ``orthogonalize=True`` also its
  composition with Newton–Schulz orthogonalization for hidden matrices and AdamW for the rest
  (``orthogonalized_learned_optimizer``), named ``<name>+ns``;
* ``adam_1e-3``: ``torch.optim.Adam`` at lr 1e-3, untuned (what a new user tries first);
* tuned: ``adam`` (constant lr), ``adam_cosine`` (``CosineAnnealingLR`` to 0 over the run),
  ``adamw`` (weight decay 0.01), ``sgd_momentum`` (momentum 0.9) and ``muon`` (learnopt's
  Muon/AdamW hybrid; the tuned rate is Muon's).

Stability: the learned optimizer is also run ``stability_factor`` times as long (told that
length) on ``stability_seeds``; it passes if the long run stays finite and ends no worse than
the ordinary run of the same seed did.

Baselines do not depend on the checkpoint: they are cached in ``baseline_cache`` (default
``<out_dir>/baselines.json``) under a hash of what they depend on (``baseline_key``), so a run
with another checkpoint trains only the learned optimizers; a stopped run resumes from the
problems it finished (``<out_dir>/<problem>/record.json``).

Across problems: the fraction of problems on which each learned optimizer ends with a lower
mean log10 training loss than ``adam_1e-3``, ``adam`` and ``adam_cosine``; the speedup over
tuned ``adam`` and over ``adam_cosine`` (``learnopt.compare.speedup``) and their interquartile
means (IQM: the mean of the middle half, as Celo and rliable report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learnopt.evaluate import (
    BASELINES,
    DEFAULT_LR_GRID,
    Evaluation,
    LearnoptBaseline,
    OptimizerResult,
    evaluate_optimizers,
    plot_curves,
    train_with_optimizer,
)
from learnopt.meta.unroll import DIVERGED_LOG10, log10_losses
from learnopt.task import TaskFamily, seeded_generator

TUNED = ("adam", "adam_cosine", "adamw", "sgd_momentum", "muon")
REFERENCES = ("adam_1e-3", "adam", "adam_cosine")  # what the summary compares the learned optimizers with
BASELINES_VERSION = 2  # bump when suite_baselines or the protocol changes: cached results are then recomputed


class ScheduledOptimizer:
    """An optimizer stepped together with its learning-rate scheduler (``opt.step()`` then
    ``scheduler.step()``), for loops that only call ``zero_grad`` and ``step``.

    Args:
        optimizer: the wrapped optimizer.
        scheduler: its learning-rate scheduler, stepped once after every optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's ``zero_grad``.

        Args:
            set_to_none: passed to ``torch.optim.Optimizer.zero_grad``.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Any:
        """One optimizer step, then one scheduler step.

        Args:
            closure: passed to the optimizer's ``step``.

        Returns:
            What the optimizer's ``step`` returns (the closure's loss, or None).
        """
        out = self.optimizer.step(closure)
        self.scheduler.step()
        return out


def suite_baselines(steps: int) -> dict[str, Callable[..., Any]]:
    """The baselines of the module docstring for runs of ``steps`` steps: ``adam_1e-3`` takes
    ``(params)``, the tuned ones ``(params, lr)``.

    Args:
        steps: the run length (the cosine schedule's ``T_max``).

    Returns:
        ``{name: factory}`` for ``adam_1e-3`` and the ``TUNED`` baselines.
    """

    def adam_cosine(ps: list[Tensor], lr: float) -> ScheduledOptimizer:
        opt = torch.optim.Adam(ps, lr=lr)
        return ScheduledOptimizer(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps))

    return {
        "adam_1e-3": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "adam": BASELINES["adam"],
        "adam_cosine": adam_cosine,
        "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01),
        "sgd_momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
        "muon": LearnoptBaseline("muon"),
    }


def learned_factories(checkpoint: str, steps: int, orthogonalize: bool) -> dict[str, Callable[..., Any]]:
    """``{name: (params) -> optimizer}`` for the checkpoint's learned optimizer (and its
    orthogonalized composition), told the run length ``steps`` where it takes one.

    Args:
        checkpoint: path of the learned optimizer's checkpoint; its stem names the optimizer.
        steps: the run length passed as ``num_steps`` to a rule whose config has one.
        orthogonalize: also add ``<name>+ns`` (``orthogonalized_learned_optimizer``, ``batch_dims=1``).

    Returns:
        ``{name: factory}``: the learned optimizer and, with ``orthogonalize``, its composition.
    """
    from learnopt.checkpoint import load
    from learnopt.evaluate import learned_optimizer_factory
    from learnopt.optim.torch_optimizer import as_torch_optimizer

    lopt = load(checkpoint)
    name = Path(checkpoint).stem
    options = {"num_steps": steps} if getattr(lopt, "num_steps", None) is not None else {}
    out = {name: learned_optimizer_factory(checkpoint, **options)}
    if orthogonalize:
        from learnopt.learned.general import orthogonalized_learned_optimizer

        tx = lambda: orthogonalized_learned_optimizer(lopt, batch_dims=1, **options)  # noqa: E731
        out[f"{name}+ns"] = lambda ps: as_torch_optimizer(tx(), ps, check_finite=False)
    return out


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% of ``values`` (``scipy.stats.trim_mean``
    cutting 25% at each end; infinities count by their rank).

    Args:
        values: the numbers; NaNs are left out.

    Returns:
        The interquartile mean, NaN when no value is left.
    """
    from scipy.stats import trim_mean

    x = [v for v in values if not math.isnan(v)]
    return float(trim_mean(x, 0.25)) if x else math.nan


def stability(make: Callable[..., Any], family: TaskFamily, steps: int, factor: int, num_instances: int,
              seed: int) -> dict[str, float]:
    """Mean log10 training loss of a ``factor × steps`` run at step ``steps`` and at its end, and
    how many instances diverged.

    Args:
        make: the optimizer factory, ``(params) -> optimizer``.
        family: the task family; instances are drawn from the ``"test"`` generator of ``seed``.
        steps: the ordinary run length.
        factor: the long run is ``factor × steps`` steps.
        num_instances: instances trained at once.
        seed: the ``"test"`` seed.

    Returns:
        ``{"log10_at_1x", "log10_final", "diverged"}``.
    """
    generator = seeded_generator("test", seed)
    task = family.sample(num_instances, generator)
    losses = log10_losses(train_with_optimizer(make, task, factor * steps, generator))
    return {"log10_at_1x": float(losses[steps].mean()), "log10_final": float(losses[-1].mean()),
            "diverged": int((losses[-1] >= DIVERGED_LOG10).sum())}


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON description of ``obj`` that is the same in every process: public attributes of
    objects (recursively), tensors by shape, dtype and sum, callables by qualified name.

    Args:
        obj: what to describe.
        depth: the recursion depth so far; objects deeper than 4 are described by type name.

    Returns:
        JSON-serializable data: scalars, lists, dicts and strings.
    """
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, Tensor):
        return {"shape": list(obj.shape), "dtype": str(obj.dtype), "sum": float(obj.detach().double().sum())}
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if not hasattr(obj, "__dict__") or depth > 4:
        return name
    return {"type": name, **{k: describe(v, depth + 1) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}}


def baseline_key(name: str, family: TaskFamily, steps: int, seeds: Sequence[int], num_instances: int,
                 tune_instances: int, lr_grid: Sequence[float]) -> str:
    """SHA-256 of what one problem's baseline results depend on (module docstring).

    Args:
        name: the problem's name.
        family: its task family (``describe``d).
        steps, seeds, num_instances, tune_instances, lr_grid: the evaluation's settings.

    Returns:
        The hex digest.
    """
    spec = {"problem": name, "family": describe(family), "steps": steps, "seeds": list(seeds),
            "num_instances": num_instances, "tune_instances": tune_instances, "lr_grid": list(lr_grid),
            "baselines": sorted(suite_baselines(steps)), "tuned": list(TUNED), "version": BASELINES_VERSION,
            "torch": torch.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def baseline_results(cache: Path | None, key: str, run: Callable[[], Evaluation]) -> list[OptimizerResult]:
    """The baselines' results under ``key`` in the JSON file ``cache``, or ``run()``'s, which
    are then added to the file (None: no cache).

    Args:
        cache: the JSON file ``{key: [result, ...]}``, or None.
        key: the problem's ``baseline_key``.
        run: evaluates the baselines when the cache lacks ``key``.

    Returns:
        The baselines' results.
    """
    stored = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if key in stored:
        return [OptimizerResult(**r) for r in stored[key]]
    results = run().results
    if cache is not None:
        stored = json.loads(cache.read_text()) if cache.exists() else {}  # another run may have added some
        stored[key] = [dataclasses.asdict(r) for r in results]
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(cache)
    return results


def evaluate_problem(checkpoint: str, name: str, family: TaskFamily, steps: int, seeds: Sequence[int],
                     num_instances: int, tune_instances: int, lr_grid: Sequence[float], orthogonalize: bool,
                     stability_factor: int, stability_seeds: Sequence[int], out_dir: Path,
                     baseline_cache: Path | None = None) -> dict[str, Any]:
    """One problem of the suite: the evaluation (``table.md``, ``results.json``, ``curves.png``
    in ``out_dir / name``) and the stability runs; returns the problem's record, also kept in
    ``out_dir / name / record.json`` so that a suite run that was stopped resumes where it was
    (the record is reused while the learned optimizer and the settings are the same). The
    baselines come from ``baseline_cache`` where it holds them (``baseline_results``).

    Args:
        checkpoint: the learned optimizer's checkpoint.
        name: the problem's name (its folder under ``out_dir``).
        family: the problem's task family.
        steps, seeds, num_instances, tune_instances, lr_grid, orthogonalize, stability_factor,
            stability_seeds: as ``evaluate_suite``.
        out_dir: the suite's output folder.
        baseline_cache: the JSON file of cached baseline results (None: no cache).

    Returns:
        ``{"family", "results": {optimizer: {"lr", "mean_log10_final_loss", "seed_means", ...}}}``,
        the learned optimizers' entries with their comparisons and ``"stability"`` records.
    """
    key = baseline_key(name, family, steps, seeds, num_instances, tune_instances, lr_grid)
    done = out_dir / name / "record.json"
    settings = [key, Path(checkpoint).stem, _optimizer_digest(checkpoint), orthogonalize, stability_factor,
                list(stability_seeds)]
    record_key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    if done.exists() and (stored := json.loads(done.read_text())).get("key") == record_key:
        return stored["record"]
    learned = learned_factories(checkpoint, steps, orthogonalize)
    evaluate = lambda optimizers: evaluate_optimizers(  # noqa: E731
        optimizers, family, steps, num_instances, seeds, tune=TUNED, lr_grid=lr_grid, tune_instances=tune_instances,
        progress=False)
    baselines = baseline_results(baseline_cache, key, lambda: evaluate(suite_baselines(steps)))
    evaluation = evaluate(learned)
    evaluation.results += baselines
    evaluation.task = name
    out = out_dir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(evaluation.table() + "\n")
    (out / "results.json").write_text(json.dumps(evaluation.to_json(), indent=1))
    plot_curves(evaluation, out / "curves.png", title=f"{name} ({getattr(family, 'name', '')})",
                command=f"learnopt evaluate --suite --checkpoint {checkpoint}")
    record = {"family": getattr(family, "name", type(family).__name__), "results": {}}
    for r in evaluation.results:
        record["results"][r.name] = {"lr": r.lr, "mean_log10_final_loss": r.summary()["mean_log10_final_loss"],
                                     "seed_means": r.seed_means, "test_metrics": r.mean_test_metrics()}
    for lname in learned:
        record["results"][lname].update(_comparisons(evaluation, lname))
    long = learned_factories(checkpoint, stability_factor * steps, orthogonalize)
    for lname, make in long.items():
        ordinary = dict(zip(seeds, evaluation.result(lname).seed_means))
        record["results"][lname]["stability"] = [
            _stability_record(make, family, steps, stability_factor, num_instances, seed, ordinary[seed])
            for seed in stability_seeds
        ]
    done.with_suffix(".tmp").write_text(json.dumps({"key": record_key, "record": record}))
    done.with_suffix(".tmp").replace(done)
    return record


def _optimizer_digest(path: str) -> str:
    """SHA-256 of the checkpoint's learned optimizer (class, config, weights), not of its metadata."""
    from learnopt.checkpoint import load

    lopt = load(path)
    h = hashlib.sha256(json.dumps([type(lopt).__qualname__, lopt.config()], sort_keys=True).encode())
    for k, v in lopt.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _stability_record(make: Callable[..., Any], family: TaskFamily, steps: int, factor: int, num_instances: int,
                      seed: int, ordinary: float) -> dict[str, Any]:
    """``stability`` of one seed, with the ordinary run's final mean log10 loss and the verdict:
    no instance diverged and the run ends no worse than the ordinary run."""
    s = stability(make, family, steps, factor, num_instances, seed)
    return {"seed": seed, **s, "ordinary_log10_final": ordinary,
            "stable": bool(s["diverged"] == 0 and s["log10_final"] <= ordinary)}


def _comparisons(evaluation: Evaluation, name: str) -> dict[str, Any]:
    """Wins against the reference baselines and speedups over tuned Adam (constant, cosine)."""
    from learnopt.compare import speedup

    mine = evaluation.result(name)
    final = mine.summary()["mean_log10_final_loss"]
    out: dict[str, Any] = {}
    for ref in REFERENCES:
        other = evaluation.result(ref)
        out[f"beats_{ref}"] = bool(final < other.summary()["mean_log10_final_loss"])
    out["speedup_vs_adam"] = speedup(mine.curve, evaluation.result("adam").curve)
    out["speedup_vs_adam_cosine"] = speedup(mine.curve, evaluation.result("adam_cosine").curve)
    return out


def summarize(problems: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per learned optimizer, across problems: the fraction of problems beating each reference,
    the speedup IQMs and whether every stability run passed.

    Args:
        problems: ``{problem: record}`` as ``evaluate_problem`` returns them (at least one).

    Returns:
        ``{learned optimizer: {"fraction_beating_<ref>", "speedup_iqm_vs_adam",
        "speedup_iqm_vs_adam_cosine", "stable_everywhere", "problems"}}``.
    """
    names = [n for n, r in next(iter(problems.values()))["results"].items() if "speedup_vs_adam" in r]
    summary = {}
    for name in names:
        rows = [p["results"][name] for p in problems.values()]
        summary[name] = {
            **{f"fraction_beating_{ref}": sum(r[f"beats_{ref}"] for r in rows) / len(rows) for ref in REFERENCES},
            "speedup_iqm_vs_adam": iqm([r["speedup_vs_adam"] for r in rows]),
            "speedup_iqm_vs_adam_cosine": iqm([r["speedup_vs_adam_cosine"] for r in rows]),
            "stable_everywhere": all(s["stable"] for r in rows for s in r.get("stability", [])),
            "problems": len(rows),
        }
    return summary


def suite_table(problems: dict[str, dict[str, Any]], summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: mean log10 final training loss per problem and optimizer, then the summary.

    Args:
        problems: ``{problem: record}`` as ``evaluate_problem`` returns them.
        summary: as ``summarize`` returns it.

    Returns:
        The two Markdown tables.
    """
    names = list(next(iter(problems.values()))["results"])
    lines = ["| problem | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for pname, p in problems.items():
        cells = []
        for n in names:
            r = p["results"][n]
            lr = "" if r["lr"] is None else f" (lr {r['lr']:.3g})"
            cells.append(f"{r['mean_log10_final_loss']:.3f}{lr}")
        lines.append(f"| {pname} | " + " | ".join(cells) + " |")
    lines += ["", "| learned optimizer | beats Adam 1e-3 | beats tuned Adam | beats tuned cosine Adam "
                  "| speedup IQM vs Adam | vs cosine Adam | stable at 10× |", "|---|---|---|---|---|---|---|"]
    for n, s in summary.items():
        lines.append(f"| {n} | {s['fraction_beating_adam_1e-3']:.0%} | {s['fraction_beating_adam']:.0%} "
                     f"| {s['fraction_beating_adam_cosine']:.0%} | {s['speedup_iqm_vs_adam']:.2f} "
                     f"| {s['speedup_iqm_vs_adam_cosine']:.2f} | {s['stable_everywhere']} |")
    return "\n".join(lines)


def evaluate_suite(
    checkpoint: str,
    problems: dict[str, TaskFamily],
    steps: int = 500,
    seeds: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse reads the default)
    num_instances: int = 4,
    tune_instances: int = 4,
    lr_grid: list[float] | None = None,
    orthogonalize: bool = True,
    stability_factor: int = 10,
    stability_seeds: list[int] = [0],  # noqa: B006
    out_dir: str = "runs/evaluate_suite",
    record_in_checkpoint: bool = False,
    baseline_cache: str | None = "",
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every problem of ``problems`` (``{name: task family}``), each for
    ``steps`` steps on the ``"test"`` seeds ``seeds`` × ``num_instances`` instances, with the
    baselines of the module docstring tuned on ``tune_instances`` ``"tune"`` instances over
    ``lr_grid`` (default: half decades 1e-4 … 10). Writes per-problem results under ``out_dir``
    and ``suite.md`` / ``suite.json`` there; ``record_in_checkpoint`` stores the summary in the
    checkpoint's metadata (``evaluation_suite``). Baseline results are read from and added to
    ``baseline_cache`` (``""``: ``<out_dir>/baselines.json``; None: no cache).

    Args:
        checkpoint: the learned optimizer's checkpoint.
        problems: ``{name: task family}``, at least one.
        steps: the run length.
        seeds: the ``"test"`` seeds.
        num_instances: instances per seed.
        tune_instances: ``"tune"`` instances for the learning-rate search.
        lr_grid: the learning rates tried (None or empty: ``DEFAULT_LR_GRID``).
        orthogonalize: also evaluate the learned rule with Newton–Schulz orthogonalization.
        stability_factor: the stability runs are this many times as long.
        stability_seeds: the seeds of the stability runs, among ``seeds``.
        out_dir: where the results are written.
        record_in_checkpoint: store the result in the checkpoint's metadata.
        baseline_cache: the cache of baseline results.

    Returns:
        ``{"checkpoint", "steps", "seeds", "num_instances", "problems", "summary"}``.

    Raises:
        ValueError: no problem, or a stability seed not among ``seeds``.
    """
    from learnopt.checkpoint import read_checkpoint, update_metadata

    read_checkpoint(checkpoint)  # fail early, naming the file
    if not problems:
        raise ValueError("evaluate_suite needs at least one problem")
    if not set(stability_seeds) <= set(seeds):
        raise ValueError(f"stability_seeds {stability_seeds} must be among the seeds {seeds}")
    out = Path(out_dir)
    grid = tuple(lr_grid) if lr_grid else DEFAULT_LR_GRID
    cache = None if baseline_cache is None else Path(baseline_cache or out / "baselines.json")
    records = {}
    for name, family in problems.items():
        print(f"[suite] {name}", file=sys.stderr, flush=True)
        records[name] = evaluate_problem(checkpoint, name, family, steps, seeds, num_instances, tune_instances, grid,
                                         orthogonalize, stability_factor, stability_seeds, out, cache)
    summary = summarize(records)
    result = {"checkpoint": str(checkpoint), "steps": steps, "seeds": list(seeds), "num_instances": num_instances,
              "problems": records, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(result, indent=1))
    table = suite_table(records, summary)
    (out / "suite.md").write_text(table + "\n")
    if record_in_checkpoint:
        update_metadata(checkpoint, evaluation_suite={k: v for k, v in result.items()})
    print(table)
    return result


def evaluate_suite_cli(args: list[str] | None = None) -> dict[str, Any]:
    """``learnopt evaluate --suite --config configs/evaluate_general_suite.yaml --checkpoint FILE``

    Args:
        args: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        What ``evaluate_suite`` returns.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="learnopt evaluate --suite", description=evaluate_suite.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate_suite)
    cfg = parser.instantiate_classes(parser.parse_args(list(sys.argv[1:] if args is None else args)))
    kwargs = {k: v for k, v in vars(cfg).items() if k not in ("config", "__path__")}
    return evaluate_suite(**kwargs)
