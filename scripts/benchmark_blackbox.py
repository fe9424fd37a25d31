"""Benchmark of the RNN proposers (Chen et al. 2017) against random search, GP-EI and optuna.

For every problem and method: best-so-far normalised regret versus evaluations (median and
quartiles over runs) and wall-clock time per proposal, written to ``docs/blackbox/``
(README.md tables, results.json with every run's curve, regret.png).

Problems, each run for the training horizon of the proposer of its dimension:
* held-out GP-prior functions (RFF samples of the training prior, seed stream "test"), D = 2, 3, 6;
* Branin and Goldstein–Price (D = 2), Hartmann3, Hartmann6: every method sees the same ``runs``
  variants of each function, made by random symmetries of the box (coordinate flips and
  permutations), which keep the problem and its difficulty but change the path of a
  deterministic method such as the proposer.

Normalised regret = (best so far − minimum) / (median of f over the box − minimum).

    scripts/benchmark_blackbox                   # the full benchmark (about 30 min on 2 cores)
    scripts/benchmark_blackbox --quick           # a smoke run with few runs
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import learnopt  # noqa: E402
from learnopt.blackbox.baselines import gp_ei, optuna_minimize, random_search  # noqa: E402
from learnopt.blackbox.gp import GPHyperparameters  # noqa: E402
from learnopt.blackbox.session import training_horizon  # noqa: E402
from learnopt.task import seeded_generator  # noqa: E402
from tasks.blackbox_benchmarks import BENCHMARKS  # noqa: E402
from tasks.blackbox_episodes import held_out_gp, normalized_regret  # noqa: E402
from tasks.gp_functions import GPFunctionFamily  # noqa: E402

METHODS = ["lstm_oi", "random", "gp_ei_fixed", "gp_ei_fit", "optuna_tpe", "optuna_gp", "optuna_cmaes"]
LABELS = {"lstm_oi": "LSTM (L_OI)", "random": "random search", "gp_ei_fixed": "GP-EI, true hyperparameters",
          "gp_ei_fit": "GP-EI, fitted hyperparameters", "optuna_tpe": "optuna TPE", "optuna_gp": "optuna GP",
          "optuna_cmaes": "optuna CMA-ES"}


class SymmetricBenchmark:
    """``runs`` variants of a benchmark on the unit box: ``f(from_unit(P(flip(u))))``."""

    def __init__(self, bench, runs: int, seed: int) -> None:
        self.bench, self.dim = bench, bench.dim
        g = seeded_generator("bench-symmetry", bench.name, seed)
        self.flips = torch.rand((runs, bench.dim), generator=g) < 0.5
        self.perms = torch.stack([torch.randperm(bench.dim, generator=g) for _ in range(runs)])
        self.flips[0] = False
        self.perms[0] = torch.arange(bench.dim)  # run 0 is the benchmark as published
        self.minimum = torch.full((runs,), bench.minimum, dtype=torch.float64)
        g2 = seeded_generator("bench-median", bench.name)
        u = torch.rand((100_000, bench.dim), generator=g2, dtype=torch.float64)
        self.median = torch.full((runs,), float(bench.unit(u).median()), dtype=torch.float64)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(torch.float64)
        u = torch.where(self.flips[:, None, :], 1 - u, u)
        u = torch.gather(u, 2, self.perms[:, None, :].expand_as(u))
        return self.bench.unit(u)

    def normalized_regret(self, best: torch.Tensor) -> torch.Tensor:
        return normalized_regret(best, self.minimum, self.median)


def best_so_far(ys: torch.Tensor) -> torch.Tensor:
    return torch.cummin(ys, dim=1).values


def single(problem, i: int):
    """Problem ``i`` of a batched problem as a function of one point in the unit box."""
    n = len(problem.minimum)

    def f(x: np.ndarray) -> float:
        u = torch.as_tensor(x, dtype=torch.float64)[None, None].expand(n, 1, -1).contiguous()
        return float(problem(u)[i, 0])

    return f


def run_problem(name: str, problem, dim: int, horizon: int, proposer, true_ls, args, bar) -> dict:
    n = len(problem.minimum)
    curves: dict[str, np.ndarray] = {}
    g = seeded_generator("bench-methods", name)
    with torch.no_grad():
        _, ys = proposer.rollout(problem, n, horizon)
    curves["lstm_oi"] = problem.normalized_regret(best_so_far(ys.double())).numpy()
    bar.update()
    _, ys, _ = random_search(problem, n, dim, horizon, g)
    curves["random"] = problem.normalized_regret(best_so_far(ys)).numpy()
    bar.update()
    if true_ls is not None:
        hp = GPHyperparameters(true_ls, torch.ones(n, dtype=torch.float64), torch.full((n,), 1e-6, dtype=torch.float64))
        _, ys, _ = gp_ei(problem, n, dim, horizon, g, hyperparameters=hp)
        curves["gp_ei_fixed"] = problem.normalized_regret(best_so_far(ys)).numpy()
    bar.update()
    _, ys, _ = gp_ei(problem, n, dim, horizon, g)
    curves["gp_ei_fit"] = problem.normalized_regret(best_so_far(ys)).numpy()
    bar.update()
    for sampler in ("tpe", "gp", "cmaes"):
        runs = min(n, args.optuna_gp_runs if sampler == "gp" else n)
        rows = []
        for i in range(runs):
            _, y, _ = optuna_minimize(single(problem, i), dim, horizon, sampler, seed=i)
            rows.append(np.minimum.accumulate(y))
        best = torch.tensor(np.stack(rows))
        curves[f"optuna_{sampler}"] = normalized_regret(best, problem.minimum[:runs], problem.median[:runs]).numpy()
        bar.update()
    return curves


def time_per_proposal(dim: int, horizon: int, proposer, prior: tuple[float, float], repeats: int = 5
                      ) -> dict[str, float]:
    """Seconds per proposal at the horizon (the last proposal of a run of ``horizon``), one
    problem at a time, every method in this one process: the median over ``repeats`` runs
    (each a different seed where the method has one)."""
    problem = held_out_gp(GPFunctionFamily(dim, prior), 1, "timing", 0)
    f = single(problem, 0)
    samples: dict[str, list[float]] = defaultdict(list)
    hp = GPHyperparameters(problem.functions.lengthscales, torch.ones(1, dtype=torch.float64),
                           torch.full((1,), 1e-6, dtype=torch.float64))
    for rep in range(repeats):
        session = proposer.ask_tell([(0.0, 1.0)] * dim, seed=rep)
        stamps = []
        for _ in range(horizon):
            x = session.ask()
            stamps.append(session.proposal_seconds)
            session.tell(x, f(x))
        samples["lstm_oi"].append(stamps[-1] - stamps[-2])
        g = torch.Generator().manual_seed(rep)
        samples["gp_ei_fixed"].append(float(gp_ei(problem, 1, dim, horizon, g, hyperparameters=hp)[2][-1]))
        samples["gp_ei_fit"].append(float(gp_ei(problem, 1, dim, horizon, g)[2][-1]))
        samples["random"].append(float(random_search(problem, 1, dim, horizon, g)[2][-1]))
        for sampler in ("tpe", "gp", "cmaes"):
            samples[f"optuna_{sampler}"].append(float(optuna_minimize(f, dim, horizon, sampler, seed=rep)[2][-1]))
    return {method: float(np.median(s)) for method, s in samples.items()}


def median_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: the order statistics
    ``[x_(j), x_(n−j+1)]`` with the largest ``j`` whose coverage ``1 − 2·P(B ≤ j − 1)``,
    ``B ~ Binomial(n, 1/2)``, is at least ``level`` (the whole range when no ``j`` reaches it)."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values, dtype=np.float64))
    n, j = len(x), 0
    while j + 1 <= n // 2 and binom.cdf(j, n, 0.5) <= (1 - level) / 2:
        j += 1
    j = max(j, 1)
    return float(x[j - 1]), float(x[n - j])


def summarize(curves: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    table = {}
    for method, c in curves.items():
        final = np.asarray(c)[:, -1]
        lo, hi = median_interval(final)
        table[method] = {"median": float(np.median(final)), "q25": float(np.quantile(final, 0.25)),
                         "q75": float(np.quantile(final, 0.75)), "runs": int(len(final)),
                         "median_lo": lo, "median_hi": hi}
    return table


def plot(results: dict, horizons: dict, path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for method in METHODS:
            if method not in results[name]:
                continue
            c = np.asarray(results[name][method])
            t = np.arange(1, c.shape[1] + 1)
            med = np.median(c, 0)
            color = f"C{METHODS.index(method)}"  # one colour per method in every panel
            ax.plot(t, np.maximum(med, 1e-6), label=LABELS[method], color=color, lw=2 if method == "lstm_oi" else 1.2)
            ax.fill_between(t, np.maximum(np.quantile(c, 0.25, 0), 1e-6), np.maximum(np.quantile(c, 0.75, 0), 1e-6),
                            color=color, alpha=0.12)
        ax.set_yscale("log")
        ax.set_title(f"{name} (horizon {horizons[name]})")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("normalised regret")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Best-so-far normalised regret: median and quartiles over runs", fontsize=11)
    fig.text(0.5, 0.005, command, ha="center", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def write_readme(out: Path, results: dict, tables: dict, timings: dict, horizons: dict, priors: dict, args,
                 command: str, seconds: float | None) -> None:
    if seconds is None:  # --render
        written = f"Measured by `{command}`; tables and plot re-rendered from `results.json` by " \
                  "`scripts/benchmark_blackbox --render`."
    else:
        written = (f"Written by `{command}` (the last command took {seconds / 60:.1f} min) on "
                   f"{platform.processor() or platform.machine()} "
                   f"({torch.get_num_threads()} torch threads), torch {torch.__version__}.")
    lines = ["# Black-box proposers: benchmark", "", written, "",
             "Normalised regret = (best so far − minimum) / (median of f over the box − minimum); "
             "0 is the minimum, 1 a typical point. Each problem runs for the training horizon of the "
             "proposer of its dimension. Held-out GP functions: RFF samples of the proposer's training prior "
             f"(SE kernel, lengthscales U{list(priors.values())} for D = 2, 3, 6) from a seed stream never "
             "used in meta-training; "
             "benchmarks: the published function under random symmetries of the box (run 0 as published). "
             f"optuna's GP sampler runs on the first {args.optuna_gp_runs} runs of each problem (it is slow). "
             "GP-EI with true hyperparameters exists only for the GP functions.", "",
             "![regret curves](regret.png)", "",
             "## Median normalised regret at the horizon (quartiles in brackets)", ""]
    header = "| problem | horizon | " + " | ".join(LABELS[m] for m in METHODS) + " |"
    lines += [header, "|" + "---|" * (len(METHODS) + 2)]
    for name, table in tables.items():
        cells = []
        for m in METHODS:
            if m in table:
                t = table[m]
                cells.append(f"{fmt(t['median'])} [{fmt(t['q25'])}, {fmt(t['q75'])}] (n={t['runs']})")
            else:
                cells.append("—")
        lines.append(f"| {name} | {horizons[name]} | " + " | ".join(cells) + " |")
    lines += ["", "## Must-show checks", "",
              "The LSTM's median regret at the horizon against the better GP-EI variant (+0.01 allowed) "
              "and against random search. The interval is a distribution-free 95% confidence interval "
              "for the LSTM's median (order statistics; `median_interval`): where it straddles GP-EI + "
              "0.01, the verdict could flip on another sample of functions.", "",
              "| problem | LSTM | LSTM median, 95% interval | best GP-EI | within 0.01 of GP-EI | "
              "better than random |", "|---|---|---|---|---|---|"]
    for name, table in tables.items():
        t = table["lstm_oi"]
        lstm = t["median"]
        gp = min(table[m]["median"] for m in ("gp_ei_fixed", "gp_ei_fit") if m in table)
        rnd = table["random"]["median"]
        lines.append(f"| {name} | {fmt(lstm)} | [{fmt(t['median_lo'])}, {fmt(t['median_hi'])}] | {fmt(gp)} | "
                     f"{'yes' if lstm <= gp + 0.01 else 'no'} | {'yes' if lstm < rnd else 'no'} |")
    lines += ["", "## Seconds per proposal at the horizon (one problem, this process, median of 5 runs)", "",
              "| D | horizon | " + " | ".join(LABELS[m] for m in METHODS)
              + " | GP-EI (true hyperparameters) / LSTM | GP-EI (fitted) / LSTM |",
              "|" + "---|" * (len(METHODS) + 4)]
    for dim, t in timings.items():
        lines.append(f"| {dim} | {horizons[f'gp{dim}']} | " + " | ".join(f"{t[m]:.2e}" for m in METHODS)
                     + f" | {t['gp_ei_fixed'] / t['lstm_oi']:.0f}× | {t['gp_ei_fit'] / t['lstm_oi']:.0f}× |")
    lines += ["", "Raw curves (every run, every method): `results.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def log_to_wandb(results: dict, tables: dict, timings: dict, horizons: dict, dims: dict[str, int],
                 command: str) -> None:
    """One run per (problem, method) in the project's W&B schema (offline unless set up):
    job type ``benchmark``, group ``blackbox``; the median regret curve keyed by evaluation and
    the median/quartiles at the horizon and the time per proposal in the summary."""
    from learnopt import logging_schema as ls

    for name, curves in results.items():
        dim = dims[name]
        for method, c in curves.items():
            run = ls.init_run("benchmark", group="blackbox", tags=["blackbox", name], name=f"blackbox/{name}/{method}",
                              config={"optimizer": method, "task": name, "kind": "blackbox", "horizon": horizons[name],
                                      "command": command})
            ls.log_inner_curve(run, np.median(np.asarray(c), 0), key="inner/median_normalized_regret")
            t = tables[name][method]
            ls.log_final(run, {"final/median_normalized_regret": t["median"], "final/q25": t["q25"],
                               "final/q75": t["q75"], "final/runs": t["runs"],
                               ls.TIME_PER_STEP: timings[dim][method]})
            ls.finish_run(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/blackbox")
    parser.add_argument("--functions", type=int, default=64, help="held-out GP functions per dimension")
    parser.add_argument("--runs", type=int, default=32, help="symmetry variants per benchmark function")
    parser.add_argument("--optuna-gp-runs", type=int, default=16)
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 functions/runs")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the runs to W&B (offline by default)")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rebuild the tables, README and plot from the existing results.json")
    parser.add_argument("--dims", default="2,3,6",
                        help="re-run only the problems of these dimensions (e.g. 6 after retraining "
                             "rnn_proposer_d6.pt) and keep the others from the existing results.json")
    args = parser.parse_args()
    if args.quick:
        args.functions = args.runs = args.optuna_gp_runs = 4
    command = "scripts/benchmark_blackbox " + " ".join(sys.argv[1:])
    command = command.strip()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    proposers, horizons, priors = {}, {}, {}
    for dim in (2, 3, 6):
        p = learnopt.load(ROOT / args.checkpoints / f"rnn_proposer_d{dim}.pt")
        proposers[dim] = p
        horizons[f"gp{dim}"] = training_horizon(p)
        family_args = p.checkpoint_metadata["config"]["model"]["task_family"]["init_args"]
        priors[dim] = tuple(family_args.get("lengthscale_range", (0.1, 0.5)))  # the training prior
    problems = []
    for dim in (2, 3, 6):
        fam = GPFunctionFamily(dim, priors[dim])  # held-out functions from the training prior
        problems.append((f"gp{dim}", dim, lambda fam=fam: held_out_gp(fam, args.functions, "test", 0), True))
    for bname in ("branin", "goldstein_price", "hartmann3", "hartmann6"):
        b = BENCHMARKS[bname]
        problems.append((bname, b.dim, lambda b=b: SymmetricBenchmark(b, args.runs, 0), False))
    for name, dim, _, _ in problems:
        horizons[name] = horizons[f"gp{dim}"]
    dims = [] if args.render else sorted(int(d) for d in args.dims.split(","))
    results, tables, timings = {}, {}, {}
    previous = out / "results.json"
    if dims != [2, 3, 6]:
        if not previous.is_file():
            raise SystemExit(f"--dims {args.dims}: no earlier {previous} to keep the other problems from")
        old = json.loads(previous.read_text())
        keep = [name for name, dim, _, _ in problems if dim not in dims]
        results = {name: old["curves"][name] for name in keep}
        tables = {name: summarize(old["curves"][name]) for name in keep}  # (recomputed: the same medians)
        timings = {int(d): t for d, t in old["seconds_per_proposal"].items() if int(d) not in dims}
        command = old["command"] if args.render else old["command"] + f"; then {command}"
    todo = [p for p in problems if p[1] in dims]
    with tqdm(total=len(todo) * 7 + len(dims), desc="benchmark", unit="method") as bar:
        for name, dim, make, is_gp in todo:
            bar.set_postfix_str(name)
            problem = make()
            true_ls = problem.functions.lengthscales if is_gp else None
            curves = run_problem(name, problem, dim, horizons[name], proposers[dim], true_ls, args, bar)
            results[name] = {m: c.tolist() for m, c in curves.items()}
            tables[name] = summarize(curves)
        for dim in dims:
            bar.set_postfix_str(f"timing D={dim}")
            timings[dim] = time_per_proposal(dim, horizons[f"gp{dim}"], proposers[dim], priors[dim])
            bar.update()
    seconds = time.time() - start
    order = [name for name, _, _, _ in problems]
    results = {name: results[name] for name in order}
    tables = {name: tables[name] for name in order}
    timings = {d: timings[d] for d in (2, 3, 6)}
    (out / "results.json").write_text(json.dumps({"command": command, "horizons": horizons, "tables": tables,
                                                 "seconds_per_proposal": timings, "curves": results}))
    plot(results, horizons, out / "regret.png", command)
    write_readme(out, results, tables, timings, horizons, priors, args, command, None if args.render else seconds)
    if not args.no_wandb and not args.render:
        fresh = {name for name, dim, _, _ in todo}
        problem_dims = {name: dim for name, dim, _, _ in problems}
        log_to_wandb({k: v for k, v in results.items() if k in fresh}, tables, timings, horizons, problem_dims,
                     command)
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
