"""Plots of the benchmark results in ``docs/benchmarks/*.json`` (each plot names the command
that measured it).

    .venv/bin/python scripts/benchmarks/plot_results.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def footer(fig, command: str) -> None:
    fig.text(0.01, 0.01, command, fontsize=6, family="monospace")


def drop_in(path: Path) -> None:
    data = json.loads(path.read_text())
    sizes = data["sizes"]
    n = [s["parameters"] for s in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in [("adam", "o-"), ("lstm", "s-"), ("lstm torch ops", "x-"), ("lstm functional", "s--"),
                        ("lstm compiled", "s:"), ("mlp_lopt", "^-")]:
        pts = [(s["parameters"], s["seconds"][name]) for s in sizes if name in s["seconds"]]
        if pts:
            ax.plot(*zip(*pts), style, label=name)
    ax.plot(n, [s["lstm_lower_bound_seconds"] for s in sizes], "k:", label="LSTM lower bound (matmul FLOPs)")
    if all("lstm_lower_bound_all_flops_seconds" in s for s in sizes):
        ax.plot(n, [s["lstm_lower_bound_all_flops_seconds"] for s in sizes], "k--", lw=0.8,
                label="LSTM lower bound (every FLOP)")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds per step",
           title="drop-in optimizer step (median, interleaved)")
    ax.legend(fontsize=8)
    footer(fig, data["command"])
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path.with_suffix(".png"), dpi=120)


def memory(path: Path) -> None:
    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for ck, label in [(False, "plain"), (True, "activation checkpointing")]:
        runs = [r for r in data["runs"] if r["checkpointing"] == ck]
        ax.plot([r["k"] for r in runs], [r["peak_bytes"] / 2**20 for r in runs], "o-", label=label)
    ax.set(xlabel="truncation length K (unrolled steps)", ylabel="peak memory above start (MiB)",
           title="truncated BPTT, digits MLP, one meta-gradient")
    ax.legend()
    footer(fig, data["command"])
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path.with_suffix(".png"), dpi=120)


def throughput(path: Path) -> None:
    data = json.loads(path.read_text())
    problems = data["problems"]
    names = list(problems[0]["inner_steps_per_second"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(problems))],
               [p["inner_steps_per_second"].get(name, 0) for p in problems], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(problems))], [p["problem"] for p in problems])
    ax.set(yscale="log", ylabel="inner steps per second", title="meta-training throughput (truncated BPTT)")
    ax.legend(fontsize=8)
    footer(fig, data["command"])
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path.with_suffix(".png"), dpi=120)


# the throughput runs under each thread count and allocator setting (docs/benchmarks/README.md)
SETTINGS = {
    "meta_training_throughput": "2 threads, freed memory kept (the CLI's default)",
    "meta_training_throughput_2_threads_default_allocator": "2 threads, glibc default",
    "meta_training_throughput_1_thread": "1 thread, freed memory kept",
    "meta_training_throughput_1_thread_default_allocator": "1 thread, glibc default",
}


def throughput_settings(path: Path) -> None:
    """learnopt's speed-up over the reference per problem, one bar per setting."""
    runs = {label: json.loads((RESULTS / f"{name}.json").read_text())
            for name, label in SETTINGS.items() if (RESULTS / f"{name}.json").exists()}
    problems = [p["problem"] for p in next(iter(runs.values()))["problems"]]
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 4))
    for ax, problem in zip(axes, problems):
        labels, values = [], []
        for label, data in runs.items():
            (p,) = [p for p in data["problems"] if p["problem"] == problem]
            labels.append(label)
            values.append(p["speedup_vs_reference"]["learnopt"])
        ax.barh(labels, values, color="tab:blue")
        ax.axvline(3.0, color="k", ls=":", label="target 3×")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}×", va="center", fontsize=8)
        ax.set(title=problem, xlabel="learnopt speed ÷ reference speed")
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=8, loc="lower right")
    footer(fig, "OMP_NUM_THREADS={1,2} .venv/bin/python scripts/benchmarks/meta_training_throughput.py "
                "--repeats 7 [--default-allocator] --out <file>")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    for name, fn in [("drop_in_step", drop_in), ("bptt_memory", memory), ("meta_training_throughput", throughput)]:
        path = RESULTS / f"{name}.json"
        if path.exists():
            fn(path)
            print(f"wrote {path.with_suffix('.png')}")
    if (RESULTS / "meta_training_throughput.json").exists():
        throughput_settings(RESULTS / "meta_training_throughput_settings.png")
        print(f"wrote {RESULTS / 'meta_training_throughput_settings.png'}")


if __name__ == "__main__":
    main()
