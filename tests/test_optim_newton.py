"""``lo.newton``: damped Newton–CG. References: a hand transcription with the explicit Hessian
(``torch.func.hessian``) and ``torch.linalg.solve``; the closed form of quadratic convergence;
central finite differences for hypergradients; the same instances solved one at a time."""

from __future__ import annotations

import pytest
import torch

from learnopt import optim as lo
from conftest import central_difference

DT = torch.float64


def _logistic(seed: int = 0, n: int = 40, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, dim, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g) > 0.5).to(DT)

    def loss(p):  # strongly convex: L2-regularised logistic regression
        z = A @ p["w"] + p["b"]
        return (torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
                + 0.5 * (p["w"] ** 2).sum() + 0.5 * p["b"] ** 2)

    return loss, {"w": torch.zeros(dim, dtype=DT), "b": torch.zeros((), dtype=DT)}


def _grads(loss, params):
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    return dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))


def _transcribed_step(loss, params, lr, damping):
    """p <- p - lr (H + damping I)^-1 g, with H and g of the flattened parameters."""
    names = list(params)
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def f(x):
        parts = dict(zip(names, [c.reshape(params[k].shape) for k, c in zip(names, torch.split(x, sizes))]))
        return loss(parts)

    g = torch.func.grad(f)(flat)
    H = torch.func.hessian(f)(flat)
    d = torch.linalg.solve(H + damping * torch.eye(len(flat), dtype=DT), g)
    new = flat - lr * d
    return {k: c.reshape(params[k].shape) for k, c in zip(names, torch.split(new, sizes))}


def test_trajectory_matches_the_hand_transcription_step_for_step():
    loss, params = _logistic()
    ref = dict(params)
    tx = lo.newton(lr=0.7, damping=1e-2)
    state = tx.init(params)
    for _ in range(6):
        updates, state = tx.update(_grads(loss, params), state, params, loss_fn=loss)
        params = lo.apply_updates(params, updates)
        ref = _transcribed_step(loss, ref, 0.7, 1e-2)
        for k in params:
            torch.testing.assert_close(params[k], ref[k], rtol=1e-10, atol=1e-12)


def test_converges_quadratically_on_a_strongly_convex_problem():
    loss, params = _logistic(seed=3)
    opt = dict(params)
    for _ in range(30):  # x*: Newton in float64 from the transcription, run to convergence
        opt = _transcribed_step(loss, opt, 1.0, 0.0)
    tx = lo.newton(damping=0.0)
    state = tx.init(params)
    errors = []
    for _ in range(6):
        errors.append(float(torch.sqrt(sum(((params[k] - opt[k]) ** 2).sum() for k in params))))
        updates, state = tx.update(_grads(loss, params), state, params, loss_fn=loss)
        params = lo.apply_updates(params, updates)
    ratios = [b / a**2 for a, b in zip(errors, errors[1:]) if a > 1e-6]
    # e_{k+1} <= C e_k^2 with C bounded (quadratic), not e_{k+1} <= c e_k (linear)
    assert len(ratios) >= 3 and max(ratios) < 1.0, (errors, ratios)
    assert errors[-1] < 1e-12 and errors[0] > 0.1


def test_batched_instances_are_solved_independently():
    losses, starts = zip(*[_logistic(seed=s) for s in range(3)])

    def batched_loss(p):  # per-instance losses
        return torch.stack([f({"w": p["w"][i], "b": p["b"][i]}) for i, f in enumerate(losses)])

    params = {"w": torch.stack([s["w"] for s in starts]) + 0.1, "b": torch.stack([s["b"] for s in starts])}
    tx = lo.newton(lr=0.8, damping=1e-3, batch_dims=1, adaptive=True)
    state = tx.init(params)
    one = [dict(w=params["w"][i], b=params["b"][i]) for i in range(3)]
    tx1 = lo.newton(lr=0.8, damping=1e-3, adaptive=True)
    states1 = [tx1.init(p) for p in one]
    for _ in range(4):
        g = _grads(lambda p: batched_loss(p).sum(), params)
        updates, state = tx.update(g, state, params, loss_fn=batched_loss)
        params = lo.apply_updates(params, updates)
        for i in range(3):
            u, states1[i] = tx1.update(_grads(losses[i], one[i]), states1[i], one[i], loss_fn=losses[i])
            one[i] = lo.apply_updates(one[i], u)
    for i in range(3):
        torch.testing.assert_close(params["w"][i], one[i]["w"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(state.damping[i], states1[i].damping)


@pytest.mark.parametrize("which", ["lr", "damping"])
def test_hypergradient_matches_finite_differences(which):
    loss, start = _logistic(seed=1)

    def final_loss(value):
        kwargs = {"lr": 0.5, "damping": 0.3, which: value}
        tx = lo.newton(**kwargs)
        params = {k: v.clone() for k, v in start.items()}
        state = tx.init(params)
        for _ in range(3):
            with torch.enable_grad():
                p = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in params.items()}
                g = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()), create_graph=True)))
            updates, state = tx.update(g, state, p, loss_fn=loss)
            params = lo.apply_updates(p, updates)
        return loss(params)

    x = torch.tensor(0.5 if which == "lr" else 0.3, dtype=DT, requires_grad=True)
    (analytic,) = torch.autograd.grad(final_loss(x), [x])
    numeric = torch.tensor(central_difference(final_loss, x), dtype=DT)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert abs(float(analytic)) > 1e-3


def test_adaptive_damping_never_increases_the_loss_on_rosenbrock():
    def rosenbrock(p):
        x, y = p["xy"][0], p["xy"][1]
        return (1 - x) ** 2 + 100 * (y - x * x) ** 2

    params = {"xy": torch.tensor([-1.2, 1.0], dtype=DT)}
    tx = lo.newton(damping=1.0, adaptive=True)
    state = tx.init(params)
    values = [float(rosenbrock(params))]
    dampings = []
    for _ in range(60):
        updates, state = tx.update(_grads(rosenbrock, params), state, params, loss_fn=rosenbrock)
        params = lo.apply_updates(params, updates)
        values.append(float(rosenbrock(params)))
        dampings.append(float(state.damping))
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
    assert values[-1] < 1e-12 and max(dampings) > 1.0 and min(dampings) < 1e-3


def test_drop_in_with_a_closure_and_with_create_graph():
    loss, start = _logistic(seed=2)
    ref = {k: v.clone() for k, v in start.items()}
    tx = lo.newton(damping=1e-3)
    state = tx.init(ref)
    for mode in ("closure", "create_graph"):
        w = torch.nn.Parameter(start["w"].clone())
        b = torch.nn.Parameter(start["b"].clone())
        opt = lo.as_torch_optimizer(lo.newton(damping=1e-3), [("w", w), ("b", b)])

        def closure():
            opt.zero_grad()
            value = loss({"w": w, "b": b})
            value.backward(create_graph=mode == "create_graph")
            return value

        for _ in range(5):
            if mode == "closure":
                opt.step(closure)  # Hessian-vector products by finite differences of gradients
            else:
                closure()
                opt.step()  # exact Hessian-vector products through the gradients' graph
        grad = _grads(loss, {"w": w.detach(), "b": b.detach()})
        assert float(torch.sqrt(sum((g**2).sum() for g in grad.values()))) < 1e-8
    for _ in range(5):
        updates, state = tx.update(_grads(loss, ref), state, ref, loss_fn=loss)
        ref = lo.apply_updates(ref, updates)
    torch.testing.assert_close(w.detach(), ref["w"], rtol=1e-7, atol=1e-9)


def test_without_curvature_information_the_error_names_what_is_needed():
    loss, params = _logistic()
    tx = lo.newton()
    with pytest.raises(lo.MissingExtraArgument, match="hvp_fn.*loss_fn.*value_and_grad_fn"):
        tx.update(_grads(loss, params), tx.init(params), params)
