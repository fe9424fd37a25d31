"""Quadratic convergence of ``lo.newton`` on L2-regularised logistic regression (breast cancer,
standardised, float64): the distance to the optimum at every step and the ratios
``e_{k+1} / e_k`` (linear rate) and ``e_{k+1} / e_k²`` (quadratic constant), for the undamped
step and for fixed and Levenberg–Marquardt damping. Prints the Markdown table of
``docs/newton.md``::

    .venv/bin/python scripts/newton_convergence.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler

from learnopt import optim as lo

DT = torch.float64


def problem():
    X, y = load_breast_cancer(return_X_y=True)
    A = torch.tensor(StandardScaler().fit_transform(X), dtype=DT)
    t = torch.tensor(y, dtype=DT)

    def loss(p):
        z = A @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum") + 0.5 * (p["w"] ** 2).sum()

    return loss, {"w": torch.zeros(A.shape[1], dtype=DT), "b": torch.zeros((), dtype=DT)}


def run(tx, loss, params, steps):
    state = tx.init(params)
    out = [params]
    for _ in range(steps):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
        updates, state = tx.update(grads, state, params, loss_fn=loss)
        params = lo.apply_updates(params, updates)
        out.append(params)
    return out


def main() -> None:
    loss, start = problem()
    optimum = run(lo.newton(damping=0.0), loss, start, 40)[-1]
    settings = {"undamped (λ = 0)": lo.newton(damping=0.0), "fixed λ = 1": lo.newton(damping=1.0),
                "Levenberg–Marquardt, λ₀ = 1": lo.newton(damping=1.0, adaptive=True)}
    print("| setting | step k | ‖x_k − x*‖ | e_k / e_{k−1} | e_k / e_{k−1}² |")
    print("|---|---|---|---|---|")
    for name, tx in settings.items():
        errors = [float(torch.sqrt(sum(((p[k] - optimum[k]) ** 2).sum() for k in p))) for p in run(tx, loss, start, 10)]
        for k, e in enumerate(errors):
            if k and errors[k - 1] < 1e-13:
                break
            linear = f"{e / errors[k - 1]:.2e}" if k else ""
            quadratic = f"{e / errors[k - 1] ** 2:.2e}" if k else ""
            print(f"| {name} | {k} | {e:.3e} | {linear} | {quadratic} |")


if __name__ == "__main__":
    main()
