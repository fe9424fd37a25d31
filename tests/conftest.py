import os

import pytest
import torch

# Tests never talk to W&B servers; the ones that check W&B output set "offline" themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny ops: extra threads only add contention on 2-core machines


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory so relative ``runs/`` paths stay inside the test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- finite differences
# The one place central differences are written; tests import them (``from conftest import ...``).
# Perturbed tensors are moved in place under ``no_grad`` and put back from a saved copy, so
# ``x + e - e`` rounding never leaks into the next evaluation.


def _scalar(value):
    """A float, or a detached tensor when ``value`` has several elements (derivatives of each)."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.numel() > 1 else float(value.detach())
    return float(value)


def central_difference(fn, x, eps=1e-6) -> float:
    """``(fn(x + eps) − fn(x − eps)) / (2 eps)`` for a function of one value (a float or a
    tensor, shifted as a whole)."""
    base = x.detach() if isinstance(x, torch.Tensor) else x
    return (_scalar(fn(base + eps)) - _scalar(fn(base - eps))) / (2 * eps)


def directional_derivative(fn, tensors, direction, eps=1e-6) -> float:
    """Derivative of ``fn()`` (no arguments) along ``direction`` at the current values of
    ``tensors``: both are dicts with the same keys or sequences of the same length. A float for a
    scalar ``fn``, else a tensor of the derivatives of its elements."""
    keys = list(tensors) if isinstance(tensors, dict) else range(len(tensors))
    saved = {k: tensors[k].detach().clone() for k in keys}
    values = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for k in keys:
                    tensors[k].copy_(saved[k] + sign * eps * direction[k])
            values.append(_scalar(fn()))
    finally:
        with torch.no_grad():
            for k in keys:
                tensors[k].copy_(saved[k])
    return (values[0] - values[1]) / (2 * eps)


def partial_derivatives(fn, tensors, picks, eps=1e-6) -> torch.Tensor:
    """``∂ fn() / ∂ tensors[i][idx]`` for each ``(i, idx)`` in ``picks``, in float64."""
    out = []
    for i, idx in picks:
        unit = {i: torch.zeros_like(tensors[i])}
        unit[i][idx] = 1.0
        out.append(directional_derivative(fn, {i: tensors[i]}, unit, eps))
    return torch.tensor(out, dtype=torch.float64)


def all_partial_derivatives(fn, tensor, eps=1e-6) -> torch.Tensor:
    """``∂ fn() / ∂ tensor`` element by element (for small tensors), shaped like ``tensor``."""
    import numpy as np

    picks = [(0, idx) for idx in np.ndindex(*tensor.shape)]
    return partial_derivatives(fn, [tensor], picks, eps).to(tensor.dtype).reshape(tensor.shape)


def assert_instances_independent(tx, params, grads, rtol=1e-10, atol=1e-13) -> None:
    """Steps of ``tx`` on parameters with one leading instance dimension (``batch_dims=1``) equal
    the same steps taken one instance at a time (``batch_dims=0``), for the gradients ``grads``
    (a list of dicts like ``params``)."""
    from learnopt.optim import apply_updates

    state, batched = tx.init(params, batch_dims=1), params
    for g in grads:
        u, state = tx.update(g, state, batched, batch_dims=1)
        batched = apply_updates(batched, u)
    for i in range(next(iter(params.values())).shape[0]):
        single = {k: v[i] for k, v in params.items()}
        state = tx.init(single, batch_dims=0)
        for g in grads:
            u, state = tx.update({k: v[i] for k, v in g.items()}, state, single, batch_dims=0)
            single = apply_updates(single, u)
        for k in params:
            torch.testing.assert_close(batched[k][i], single[k], rtol=rtol, atol=atol)
