"""Drop-in step of every catalogue optimizer against its torch.optim / pytorch_optimizer peer,
on MLPs of about 10k, 1M and 10M parameters.

The timed call is ``opt.step()`` alone, on fixed gradients (the backward pass is the same for
every optimizer). For each catalogue entry these contenders are timed in turn every repetition
(medians; ratios between medians of the same run):

* ``learnopt``: ``lo.as_torch_optimizer(lo.<name>(...), params)``, the drop-in as users get it
  (its multi-tensor kernel where ``learnopt.optim.foreach`` has one);
* ``unchecked`` (rows with a kernel): the same with ``check_finite=False``, which leaves out the
  finite-gradient guard (one more read of every gradient, which torch.optim does not make);
* ``functional`` (rows with a kernel): the same with ``foreach=False`` (the transform's
  functional ``update``; without a kernel that is what ``learnopt`` runs);
* ``peer``: the catalogue's reference implementation where it is a library optimizer
  (torch.optim with ``foreach=True``, pytorch_optimizer with ``foreach=True`` where it takes
  it). Where the catalogue's reference is a transcription in the tests (no library has the
  method), the peer is the library optimizer of the same per-coordinate work, named in the
  ``peer`` column (``PEERS``).

Each contender steps its own copy of the model, so no contender sees another's parameters.
Catalogue entries whose step needs more than gradients (a closure, Hessian-vector products,
per-example gradients) are listed with the reason they are not timed (``NOT_TIMED``).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/drop_in_vs_torch.py
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_optimizer as po  # noqa: E402

from learnopt import optim as lo  # noqa: E402
from learnopt.optim.foreach import kernel_for  # noqa: E402
from learnopt.optim.registry import OPTIMIZERS  # noqa: E402
from common import RESULTS, interleaved, machine, markdown_table, write_json  # noqa: E402

# width d of Linear(d, d) -> ReLU -> Linear(d, d): 2 (d² + d) parameters
WIDTHS = {"10k": 70, "1M": 707, "10M": 2236}
# repetitions per size, and steps per timed call (small models: one step is tens of µs)
REPEATS = {"10k": 100, "1M": 60, "10M": 25}
INNER = {"10k": 20, "1M": 1, "10M": 1}

Maker = Callable[[list[torch.Tensor]], object]  # a torch.optim.Optimizer or anything with step()


class _Together:
    """Several optimizers stepped as one (Keller Jordan's ``MuonWithAuxAdam`` split)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def _muon_peer(params: list[torch.Tensor]) -> _Together:
    """torch.optim.Muon for the 2-d weights and AdamW for the rest, with ``lo.muon``'s defaults."""
    matrices = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return _Together(
        torch.optim.Muon(matrices, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0),
        torch.optim.AdamW(rest, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=True),
    )


def _po_lamb(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    # pytorch_optimizer's Lamb in the configuration that computes lo.lamb(bias_correction=False)
    # (tests/test_optim_first_order.py: _po_lamb)
    return po.Lamb(params, lr=1e-3, weight_decouple=False, adam_debias=True, rectify=False, pre_norm=False,
                   adam=False, grad_averaging=True, foreach=True)


# name -> (learnopt transform, peer, peer label). The hyperparameters are each factory's defaults
# (the peer given the same ones); where a row departs from them the label says so.
PEERS: dict[str, tuple[Callable[[], lo.GradientTransformation], Maker, str]] = {
    "sgd": (lambda: lo.sgd(lr=1e-3), lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True), "torch SGD"),
    "momentum": (lambda: lo.momentum(lr=1e-3),
                 lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True), "torch SGD(momentum)"),
    "nesterov": (lambda: lo.nesterov(lr=1e-3),
                 lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True, foreach=True),
                 "torch SGD(nesterov)"),
    "rprop": (lambda: lo.rprop(), lambda ps: torch.optim.Rprop(ps, foreach=True), "torch Rprop"),
    "quickprop": (lambda: lo.quickprop(), lambda ps: torch.optim.Rprop(ps, foreach=True),
                  "torch Rprop (same per-coordinate work; no library Quickprop)"),
    "sign_sgd": (lambda: lo.sign_sgd(), lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
                 "torch Adam (same state and arithmetic; no library generalized SignSGD)"),
    "sign_sgd (signum)": (lambda: lo.sign_sgd(betas=(0.9, 0.0), eps=0.0),
                          lambda ps: po.SignSGD(ps, lr=1e-3, momentum=0.9, foreach=True), "pytorch_optimizer SignSGD"),
    "adagrad": (lambda: lo.adagrad(), lambda ps: torch.optim.Adagrad(ps, foreach=True), "torch Adagrad"),
    "adagrad_norm": (lambda: lo.adagrad_norm(), lambda ps: torch.optim.SGD(ps, lr=1.0, foreach=True),
                     "torch SGD (AdaGrad-Norm is SGD with one adaptive step size)"),
    "adadelta": (lambda: lo.adadelta(), lambda ps: torch.optim.Adadelta(ps, foreach=True), "torch Adadelta"),
    "rmsprop": (lambda: lo.rmsprop(), lambda ps: torch.optim.RMSprop(ps, foreach=True), "torch RMSprop"),
    "adam": (lambda: lo.adam(), lambda ps: torch.optim.Adam(ps, foreach=True), "torch Adam"),
    "adamw": (lambda: lo.adamw(), lambda ps: torch.optim.AdamW(ps, foreach=True), "torch AdamW"),
    "amsgrad": (lambda: lo.amsgrad(), lambda ps: torch.optim.Adam(ps, amsgrad=True, foreach=True),
                "torch Adam(amsgrad)"),
    "nadam": (lambda: lo.nadam(), lambda ps: torch.optim.NAdam(ps, foreach=True), "torch NAdam"),
    "radam": (lambda: lo.radam(), lambda ps: torch.optim.RAdam(ps, foreach=True), "torch RAdam"),
    "eadam": (lambda: lo.eadam(), lambda ps: torch.optim.Adam(ps, foreach=True),
              "torch Adam (EAdam is Adam with eps moved into v; no library EAdam)"),
    "adabelief": (lambda: lo.adabelief(),
                  lambda ps: po.AdaBelief(ps, rectify=False, ams_bound=False, foreach=True),
                  "pytorch_optimizer AdaBelief"),
    "lion": (lambda: lo.lion(), lambda ps: po.Lion(ps, foreach=True), "pytorch_optimizer Lion"),
    "lamb": (lambda: lo.lamb(bias_correction=False), _po_lamb,
             "pytorch_optimizer Lamb (both without bias correction, as the tests match them)"),
    "lookahead": (lambda: lo.lookahead(lo.adam()),
                  lambda ps: po.Lookahead(torch.optim.Adam(ps, foreach=True)),
                  "pytorch_optimizer Lookahead(torch Adam)"),
    "muon": (lambda: lo.muon(), _muon_peer, "torch Muon (2-d) + torch AdamW (rest)"),
    "muon (bfloat16 NS)": (lambda: lo.muon(ns_dtype=torch.bfloat16), _muon_peer,
                           "torch Muon (2-d, its Newton-Schulz in bfloat16 too) + torch AdamW (rest)"),
    "apollo": (lambda: lo.apollo(), lambda ps: po.ApolloDQN(ps, foreach=True), "pytorch_optimizer ApolloDQN"),
}

NOT_TIMED = {
    "adahessian": "needs Hessian-vector products (a create_graph backward each step), which dominate its step",
    "sophia": "needs Hessian-vector products (a create_graph backward each step), which dominate its step",
    "lbfgs": "its step is closure evaluations (forward and backward passes up to max_iter), not a gradient step",
    "newton": "needs Hessian-vector products or a closure (conjugate-gradient iterations each step), and no "
              "library peer",
    "stochastic_lbfgs": "needs batch and full-gradient functions and example indices every step",
    "svrg": "needs batch and full-gradient functions and example indices every step",
    "saga": "needs per-example gradient functions and example indices every step",
    "jacsketch": "needs per-example gradient functions and example indices every step",
}


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def repeated(step: Callable[[], object], inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            step()
    return run


def time_row(name: str, width: int, repeats: int, inner: int, functional: bool, row_budget: float) -> dict:
    """Median step times of one catalogue row at one size; ``repeats`` is lowered (to 3 at least)
    where one repetition of all contenders takes longer than ``row_budget / repeats`` seconds."""
    make_tx, make_peer, label = PEERS[name]
    tx = make_tx()
    kernel = kernel_for(tx.recipe.factory) is not None
    contenders = {"learnopt": lambda ps: lo.as_torch_optimizer(tx, ps), "peer": make_peer}
    if kernel:
        # without a kernel the drop-in runs the functional path anyway; check_finite=False shows
        # what the finite-gradient guard (one more read of every gradient) costs
        if functional:
            contenders["functional"] = lambda ps: lo.as_torch_optimizer(make_tx(), ps, foreach=False)
        contenders["unchecked"] = lambda ps: lo.as_torch_optimizer(make_tx(), ps, check_finite=False)
    base = make_model(width)
    models = {k: copy.deepcopy(base) for k in contenders}
    for m in models.values():
        for p, q in zip(m.parameters(), base.parameters()):
            p.grad = q.grad.clone()
    optimizers = {k: make(list(models[k].parameters())) for k, make in contenders.items()}
    fns = {k: repeated(opt.step, inner) for k, opt in optimizers.items()}
    start = time.perf_counter()
    for fn in fns.values():  # warm-up, and the time of one repetition
        fn()
    once = time.perf_counter() - start
    repeats = max(3, min(repeats, int(row_budget / max(once, 1e-9))))
    seconds = {k: s / inner for k, s in interleaved(fns, repeats, warmup=0, desc=name).items()}
    row = {"name": name, "peer": label, "kernel": kernel, "repeats": repeats,
           "seconds": seconds, "ratio": seconds["learnopt"] / seconds["peer"]}
    for k in ("functional", "unchecked"):
        if k in seconds:
            row[f"{k}_ratio"] = seconds[k] / seconds["peer"]
    del optimizers, models, base
    gc.collect()
    return row


def finite_guard_seconds(width: int, repeats: int) -> dict[str, float]:
    """Median seconds of three ways to tell that every gradient is finite (the drop-in's
    ``check_finite`` guard, which torch.optim does not have), on the model's gradients: NaN and
    ±inf propagate into each total, so a finite total clears them all."""
    grads = [p.grad for p in make_model(width).parameters()]
    ways = {
        "sum per tensor, stacked": lambda: bool(torch.stack([g.sum() for g in grads]).sum().isfinite()),
        "foreach 1-norm": lambda: bool(torch.stack(torch._foreach_norm(grads, 1)).sum().isfinite()),
        "foreach 2-norm": lambda: bool(torch.stack(torch._foreach_norm(grads, 2)).sum().isfinite()),
    }
    return interleaved(ways, repeats, warmup=1, desc="finite guard")


def catalogue_rows() -> list[str]:
    """The timed rows in catalogue order (``sign_sgd (signum)`` right after ``sign_sgd``)."""
    missing = set(OPTIMIZERS) - set(PEERS) - set(NOT_TIMED)
    if missing:
        raise RuntimeError(f"catalogue entries with neither a peer nor a reason not to time them: {sorted(missing)}")
    return [n for n in PEERS if n.split(" ")[0] in OPTIMIZERS]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["model"] for s in results["sizes"]]
    names = [r["name"] for r in results["sizes"][0]["rows"]]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(sizes)
    for i, size in enumerate(results["sizes"]):
        ratios = {r["name"]: r["ratio"] for r in size["rows"]}
        unchecked = {r["name"]: r["unchecked_ratio"] for r in size["rows"] if "unchecked_ratio" in r}
        ax.bar([j + i * width for j in range(len(names))], [ratios.get(n, float("nan")) for n in names], width,
               label=f"{size['model']} ({size['parameters']:,} parameters)")
        ax.plot([j + i * width for j in range(len(names))], [unchecked.get(n, float("nan")) for n in names], "k_",
                ms=7, mew=2, label="check_finite=False" if i == 0 else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.25, color="tab:orange", ls="--", lw=0.8, label="1.25×")
    ax.axhline(2.0, color="tab:red", ls=":", lw=0.8, label="2×")
    ax.set_xticks([j + width * (len(sizes) - 1) / 2 for j in range(len(names))], names, rotation=60, ha="right",
                  fontsize=8)
    ax.set(ylabel="drop-in step time / peer's", yscale="log",
           title="learnopt drop-in opt.step() against its torch.optim / pytorch_optimizer peer")
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, results["command"], fontsize=6, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(results: dict) -> str:
    """Two Markdown tables: the ratios to the peer, and the peers with the absolute times."""
    sizes = results["sizes"]
    names = [r["name"] for r in sizes[0]["rows"]]
    by = [{r["name"]: r for r in s["rows"]} for s in sizes]
    labels = [s["model"] for s in sizes]

    def ratio(row: dict | None, key: str) -> str:
        return f"{row[key]:.2f}" if row is not None and key in row else "—"

    header = ["optimizer", "kernel", *[f"× peer, {m}" for m in labels], *[f"unchecked × peer, {m}" for m in labels],
              *[f"functional × peer, {m}" for m in labels]]
    rows = []
    for n in names:
        rows.append([f"`{n}`", "yes" if by[0][n]["kernel"] else "no",
                     *[ratio(b.get(n), "ratio") for b in by], *[ratio(b.get(n), "unchecked_ratio") for b in by],
                     *[ratio(b.get(n), "functional_ratio") for b in by]])
    text = markdown_table(header, rows)
    header = ["optimizer", "peer", *[f"peer ms, {m}" for m in labels], *[f"learnopt ms, {m}" for m in labels],
              *[f"repetitions, {m}" for m in labels]]
    rows = []
    for n in names:
        rows.append([f"`{n}`", by[0][n]["peer"],
                     *[f"{b[n]['seconds']['peer'] * 1e3:.3g}" if n in b else "—" for b in by],
                     *[f"{b[n]['seconds']['learnopt'] * 1e3:.3g}" if n in b else "—" for b in by],
                     *[str(b[n].get("repeats", "—")) if n in b else "—" for b in by]])
    text += "\n\n" + markdown_table(header, rows)
    guards = [(s["model"], s["finite_guard_seconds"]) for s in sizes if "finite_guard_seconds" in s]
    if guards:
        ways = list(guards[0][1])
        text += "\n\nThe finite-gradient guard alone (ms, the same gradients):\n\n" + markdown_table(
            ["model", *ways], [[m, *[f"{g[w] * 1e3:.3g}" for w in ways]] for m, g in guards])
    text += "\n\nNot timed:\n\n" + "\n".join(f"- `{n}`: {why}" for n, why in results["not_timed"].items())
    return text


def markdown_page(results: dict, name: str) -> str:
    m = results["machine"]
    sizes = ", ".join(f"{s['model']} = {s['parameters']:,} ({s['width']}-wide)" for s in results["sizes"])
    return "\n".join([
        "# Drop-in step against torch.optim / pytorch_optimizer",
        "",
        "Written by `scripts/benchmarks/drop_in_vs_torch.py` (its docstring says what each contender is);",
        "the analysis is in `README.md`, section 5. Command:",
        "",
        f"    {results['command']}",
        *(["", "and for the finite-gradient guard table (into the same .json):", "",
            f"    {results['guard_command']}"] if "guard_command" in results else []),
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['torch_threads']} thread(s); "
        f"load average at the start {m.get('load_average_at_start')}. Models: `Linear(d,d)–ReLU–Linear(d,d)`, {sizes} "
        "parameters. Each figure is a ratio of medians over interleaved repetitions of the same run;",
        "`× peer` is the drop-in as users get it, `unchecked` the same with `check_finite=False`,",
        "`functional` the same with `foreach=False`.",
        "",
        f"![ratios]({name}.png)",
        "",
        results["table"],
        "",
    ])


def write_outputs(results: dict, name: str) -> None:
    results["table"] = tables(results)
    write_json(name, results)
    (RESULTS / f"{name}.md").write_text(markdown_page(results, name))
    plot(results, RESULTS / f"{name}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--only", nargs="+", default=None, help="rows to time (default: every catalogue drop-in)")
    parser.add_argument("--repeat-scale", type=float, default=1.0, help="multiply every size's repetitions")
    parser.add_argument("--no-functional", action="store_true", help="skip the foreach=False contender")
    parser.add_argument("--row-budget", type=float, default=40.0,
                        help="seconds of timing per row and size at most (fewer repetitions, 3 at least)")
    parser.add_argument("--out", default="drop_in_vs_torch")
    parser.add_argument("--render", action="store_true",
                        help="only write the .md, .png and table again from the existing .json")
    parser.add_argument("--guard-only", action="store_true",
                        help="only time the finite-gradient guard, into the existing .json, and render")
    args = parser.parse_args(argv)
    if args.render or args.guard_only:
        results = json.loads((RESULTS / f"{args.out}.json").read_text())
        if args.guard_only:
            for size in results["sizes"]:
                size["finite_guard_seconds"] = finite_guard_seconds(size["width"], REPEATS[size["model"]])
            results["guard_command"] = (
                "OMP_NUM_THREADS=%d .venv/bin/python scripts/benchmarks/drop_in_vs_torch.py %s" % (
                    torch.get_num_threads(), " ".join(argv if argv is not None else sys.argv[1:])))
        write_outputs(results, args.out)
        print(results["table"])
        return results
    names = args.only or catalogue_rows()
    results = {"machine": machine(),
               "command": "OMP_NUM_THREADS=%d .venv/bin/python scripts/benchmarks/drop_in_vs_torch.py %s" % (
                   torch.get_num_threads(), " ".join(argv if argv is not None else sys.argv[1:])),
               "not_timed": NOT_TIMED, "sizes": []}
    work = [(label, n) for label in args.sizes for n in names]
    bar = tqdm(work, desc="drop-in vs peer")
    current: dict | None = None
    for label, name in bar:
        bar.set_postfix_str(f"{label} {name}")
        if current is None or current["model"] != label:
            width = WIDTHS[label]
            current = {"model": label, "width": width, "parameters": 2 * (width * width + width), "rows": [],
                       "finite_guard_seconds": finite_guard_seconds(width, REPEATS[label])}
            results["sizes"].append(current)
        repeats = max(3, round(REPEATS[label] * args.repeat_scale))
        current["rows"].append(time_row(name, WIDTHS[label], repeats, INNER[label], not args.no_functional,
                                       args.row_budget))
        write_json(args.out, results)
    write_outputs(results, args.out)
    print(results["table"])
    return results


if __name__ == "__main__":
    main()
