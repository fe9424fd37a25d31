"""0/1 training and test error of linear classifiers on scikit-learn's bundled binary tasks:
the 0/1-loss RCD perceptron (Li & Lin 2007) and MERT on a two-class argmax model (Och 2003),
both from ``learnopt.gradient_free``, against the perceptron, logistic regression and a linear
SVM from scikit-learn.

Tasks: breast cancer; digits "3" against the rest; wine class 0 against the rest. Each task is
split 70/30 (stratified) at five seeds; features are standardised on the training part. The
scikit-learn models use their defaults (``C = 1``, ``max_iter`` raised until they converge);
RCD starts from the averaged perceptron and from logistic regression's weights; MERT from zero.
Writes ``docs/gradient_free/results.json`` and ``errors.png`` and prints the table of
``docs/gradient_free/README.md``::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_zero_one.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression, Perceptron
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from tqdm import tqdm

from learnopt.gradient_free import MERTClassifier, RCDPerceptron

OUT = Path(__file__).resolve().parents[1] / "docs" / "gradient_free"


def tasks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    X, y = load_breast_cancer(return_X_y=True)
    out = {"breast cancer": (X, y)}
    X, y = load_digits(return_X_y=True)
    out["digits 3 vs rest"] = (X, (y == 3).astype(int))
    X, y = load_wine(return_X_y=True)
    out["wine 0 vs rest"] = (X, (y == 0).astype(int))
    return out


def methods(iterations: int, seed: int) -> dict:
    def rcd_from_lr(Xtr, ytr):
        lr = LogisticRegression(max_iter=10000).fit(Xtr, ytr)
        return RCDPerceptron(iterations=iterations, init=np.append(lr.coef_[0], lr.intercept_[0]),
                             seed=seed).fit(Xtr, ytr)

    return {
        "RCD-0/1 (perceptron init)": lambda X, y: RCDPerceptron(iterations=iterations, seed=seed).fit(X, y),
        "RCD-0/1 (logistic init)": rcd_from_lr,
        "MERT (argmax, zero init)": lambda X, y: MERTClassifier(max_sweeps=10, restarts=2, seed=seed).fit(X, y),
        "perceptron": lambda X, y: Perceptron(random_state=seed).fit(X, y),
        "logistic regression": lambda X, y: LogisticRegression(max_iter=10000).fit(X, y),
        "linear SVM": lambda X, y: LinearSVC(max_iter=100000, random_state=seed).fit(X, y),
    }


def run(seeds: list[int], iterations: int) -> dict:
    results: dict = {}
    jobs = [(t, s) for t in tasks() for s in seeds]
    data = tasks()
    for task, seed in tqdm(jobs, desc="task x seed"):
        X, y = data[task]
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)
        scaler = StandardScaler().fit(Xtr)
        Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
        for name, fit in methods(iterations, seed).items():
            start = time.perf_counter()
            model = fit(Xtr, ytr)
            seconds = time.perf_counter() - start
            row = results.setdefault(task, {}).setdefault(name, {"train": [], "test": [], "seconds": []})
            row["train"].append(float(np.mean(model.predict(Xtr) != ytr)))
            row["test"].append(float(np.mean(model.predict(Xte) != yte)))
            row["seconds"].append(seconds)
    return results


def table(results: dict) -> str:
    lines = ["| task | method | train 0/1 error (%) | test 0/1 error (%) | fit seconds |", "|---|---|---|---|---|"]
    for task, rows in results.items():
        for name, r in rows.items():
            tr, te = 100 * np.array(r["train"]), 100 * np.array(r["test"])
            lines.append(f"| {task} | {name} | {tr.mean():.2f} ± {tr.std(ddof=1):.2f} "
                         f"| {te.mean():.2f} ± {te.std(ddof=1):.2f} "
                         f"| {np.mean(r['seconds']):.2f} |")
    return "\n".join(lines)


def comparison(results: dict) -> list[str]:
    """Per task: does RCD (perceptron init) reach a lower mean training error than logistic regression?"""
    out = []
    for task, rows in results.items():
        rcd = np.mean(rows["RCD-0/1 (perceptron init)"]["train"])
        lr = np.mean(rows["logistic regression"]["train"])
        wins = sum(a < b for a, b in zip(rows["RCD-0/1 (perceptron init)"]["train"],
                                         rows["logistic regression"]["train"]))
        out.append(f"- {task}: RCD-0/1 {100 * rcd:.2f}% vs logistic regression {100 * lr:.2f}% training error "
                   f"(lower at {wins} of {len(rows['logistic regression']['train'])} seeds)")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks_ = list(results)
    names = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    width = 0.8 / len(names)
    for k, split in enumerate(("train", "test")):
        ax = axes[k]
        for j, name in enumerate(names):
            means = [100 * np.mean(results[t][name][split]) for t in tasks_]
            stds = [100 * np.std(results[t][name][split], ddof=1) for t in tasks_]
            ax.bar(np.arange(len(tasks_)) + j * width, means, width, yerr=stds, label=name, capsize=2)
        ax.set_xticks(np.arange(len(tasks_)) + 0.4 - width / 2)
        ax.set_xticklabels(tasks_)
        ax.set_ylabel(f"{split} 0/1 error (%)")
        ax.set_title(f"{split} error, mean ± sd over seeds")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=2000, help="RCD line searches per fit")
    args = parser.parse_args()
    results = run(list(range(args.seeds)), args.iterations)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, OUT / "errors.png")
    text = table(results)
    print(text)
    print("\n".join(comparison(results)))


if __name__ == "__main__":
    main()
