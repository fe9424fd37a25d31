"""Problems and runners shared by the optimizer test files (imported as a plain module)."""

from __future__ import annotations

import torch
from torch import nn

from learnopt import optim as lo

DT = torch.float64


def problem(seed: int = 0):
    """A small smooth non-quadratic float64 problem on two tensors of different shapes."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 4, generator=g, dtype=DT) / 2
    b = torch.randn(6, 3, generator=g, dtype=DT)
    c = torch.randn(4, generator=g, dtype=DT)

    def loss_fn(params):
        W, v = params["W"], params["v"]  # W: [3, 4], v: [4]
        z = torch.tanh(A.to(W.dtype) @ (W.T + v[:, None]) - b.to(W.dtype))
        return (z**2).sum() + 0.1 * (W**4).sum() + 0.1 * ((v - c.to(v.dtype)) ** 4).sum()

    start = {"W": torch.randn(3, 4, generator=g, dtype=DT), "v": torch.randn(4, generator=g, dtype=DT)}
    return loss_fn, start


def grads(loss_fn, params, create_graph=False):
    if not create_graph:
        params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    loss = loss_fn(params)
    gs = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return dict(zip(params.keys(), gs))


def run_functional(tx, loss_fn, start, steps):
    params = {k: v.clone() for k, v in start.items()}
    state = tx.init(params)
    traj = []
    for _ in range(steps):
        updates, state = tx.update(grads(loss_fn, params), state, params)
        params = lo.apply_updates(params, updates)
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


def tiny_model(seed: int = 2):
    torch.manual_seed(seed)
    return nn.Linear(4, 3).to(DT)


def model_loss(model, X, Y):
    return ((torch.tanh(model(X)) - Y) ** 2).mean() + 0.05 * (model.weight**4).sum()
