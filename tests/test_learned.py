"""Tests of ``learnopt.learned``: gradient preprocessing and the coordinate-wise LSTM optimizer
of Andrychowicz et al. 2016 (arXiv 1606.04474).

References: the paper's preprocessing formula evaluated with ``math`` one number at a time; the
parameter count of a 2-layer, 20-unit LSTM worked out by hand; an LSTM written out gate by gate
(the i, f, g, o layout of ``torch.nn.LSTMCell``) using the module's weights; the same problem
run one instance at a time; the functional update loop written by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from learnopt.learned import CoordinatewiseLSTM, LSTMOptimizerState, log_and_sign
from learnopt.optim import GradientTransformation, TransformOptimizer
from tasks.quadratic import QuadraticFamily

DT = torch.float64


# --------------------------------------------------------------------------- log_and_sign


def _ref_log_and_sign(g: float, p: float) -> tuple[float, float]:
    """The paper's appendix A, one coordinate at a time."""
    if abs(g) >= math.exp(-p):
        sign = 0.0 if g == 0 else math.copysign(1.0, g)
        return math.log(abs(g)) / p, sign
    return -1.0, math.exp(p) * g


def _values(p: float) -> list[float]:
    t = math.exp(-p)
    return [
        0.0,
        t,  # exactly at the threshold: log branch, log(e^-p)/p = -1
        -t,
        t * (1 + 1e-6),
        t * (1 - 1e-6),  # just below: linear branch
        -t * (1 - 1e-6),
        t / 7,
        -t / 3,
        1e-30,
        -1e-12,
        3e-3,
        -4e-2,
        1.0,
        -1.0,
        2.5,
        -123.4,
        1e8,
    ]


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_log_and_sign_matches_paper_formula(p):
    vals = _values(p)
    g = torch.tensor(vals, dtype=DT)
    out = log_and_sign(g, p)
    assert out.shape == (len(vals), 2)
    expected = torch.tensor([_ref_log_and_sign(v, p) for v in vals], dtype=DT)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # The threshold itself takes the log branch and gives (-1, sign): continuous with the other branch.
    t = math.exp(-p)
    at = log_and_sign(torch.tensor([t, -t], dtype=DT), p)
    torch.testing.assert_close(at, torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=DT), rtol=1e-14, atol=1e-14)
    # Both branches reached in the test values.
    assert (out[:, 0] == -1.0).sum() >= 5 and (out[:, 0] > -1.0).sum() >= 5


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_log_and_sign_keeps_shape(p):
    g = torch.randn(3, 4, 5, dtype=DT)
    out = log_and_sign(g, p)
    assert out.shape == (3, 4, 5, 2)
    flat = log_and_sign(g.reshape(-1), p).reshape(3, 4, 5, 2)
    torch.testing.assert_close(out, flat, rtol=0, atol=0)


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_log_and_sign_derivatives(p):
    t = math.exp(-p)
    vals = [0.0, t / 4, -t / 2, 0.3, -2.0, t, -t]
    g = torch.tensor(vals, dtype=DT, requires_grad=True)
    out = log_and_sign(g, p)
    d_first = torch.autograd.grad(out[:, 0].sum(), g, retain_graph=True)[0]
    d_second = torch.autograd.grad(out[:, 1].sum(), g)[0]
    assert torch.isfinite(d_first).all() and torch.isfinite(d_second).all()
    # Hand derivatives: linear branch (-1, e^p g) -> (0, e^p); log branch (|g| >= e^-p, the
    # threshold included) -> (1/(p g), 0).
    exp_first = [0.0, 0.0, 0.0, 1 / (p * 0.3), 1 / (p * -2.0), 1 / (p * t), -1 / (p * t)]
    exp_second = [math.exp(p)] * 3 + [0.0] * 4
    torch.testing.assert_close(d_first, torch.tensor(exp_first, dtype=DT), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_second, torch.tensor(exp_second, dtype=DT), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- CoordinatewiseLSTM


def _lstm(seed=0, **kw) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(**kw).double()


def _lstm_cell_params(in_features: int, hidden: int) -> int:
    # W_ih [4H, in], W_hh [4H, H], b_ih [4H], b_hh [4H]
    return 4 * hidden * in_features + 4 * hidden * hidden + 4 * hidden + 4 * hidden


@pytest.mark.parametrize("preprocess,in_features", [("none", 1), ("log_sign", 2)])
def test_parameter_count(preprocess, in_features):
    lopt = CoordinatewiseLSTM(hidden_size=20, num_layers=2, preprocess=preprocess)
    n = sum(p.numel() for p in lopt.parameters())
    # Worked out: layer 1: 80*in + 1600 + 160; layer 2: 1600 + 1600 + 160; linear 20 -> 1: 21.
    expected = {1: 80 + 1600 + 160 + 3360 + 21, 2: 160 + 1600 + 160 + 3360 + 21}[in_features]
    assert expected == _lstm_cell_params(in_features, 20) + _lstm_cell_params(20, 20) + 21
    assert n == expected
    assert {1: 5221, 2: 5301}[in_features] == n


def test_update_shapes_and_state_shape():
    lopt = _lstm(hidden_size=20, num_layers=2)
    g = torch.Generator().manual_seed(1)
    grads = {
        "w": torch.randn(2, 3, generator=g, dtype=DT),
        "b": torch.randn(4, generator=g, dtype=DT),
        "s": torch.randn((), generator=g, dtype=DT),
        "k": torch.randn(2, 1, 3, generator=g, dtype=DT),
    }
    state = lopt.init(grads)
    assert isinstance(state, LSTMOptimizerState)
    n = 6 + 4 + 1 + 6
    assert state.h.shape == (2, 20, n) and state.c.shape == (2, 20, n)
    assert (state.h == 0).all() and (state.c == 0).all()
    updates, state = lopt.update(grads, state, grads)
    assert list(updates) == list(grads)
    for k in grads:
        assert updates[k].shape == grads[k].shape
        assert updates[k].dtype == DT
    assert state.h.shape == (2, 20, n) and state.c.shape == (2, 20, n)
    # A state for another number of coordinates is refused.
    with pytest.raises(ValueError, match="coordinates"):
        lopt.update({"w": torch.zeros(3, dtype=DT)}, state)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="preprocess"):
        CoordinatewiseLSTM(preprocess="sign_log")
    with pytest.raises(ValueError):
        CoordinatewiseLSTM(hidden_size=0)
    with pytest.raises(ValueError):
        CoordinatewiseLSTM(num_layers=0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="preprocess_p"):
            CoordinatewiseLSTM(preprocess="log_sign", preprocess_p=bad)
    with pytest.raises(ValueError, match="output_scale"):
        CoordinatewiseLSTM(output_scale=float("nan"))


def _manual_update(lopt: CoordinatewiseLSTM, flat_grad, h, c, p):
    """The LSTM written out gate by gate (torch.nn.LSTMCell's i, f, g, o layout), with the
    paper's preprocessing from ``_ref_log_and_sign``."""
    if lopt.preprocess == "log_sign":
        x = torch.tensor([_ref_log_and_sign(v, p) for v in flat_grad.tolist()], dtype=DT)
    else:
        x = flat_grad[:, None]
    hs, cs = [], []
    for layer, cell in enumerate(lopt.cells):
        W_ih, W_hh, b_ih, b_hh = (t.detach() for t in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))
        H = lopt.hidden_size
        gates = x @ W_ih.T + b_ih + h[layer] @ W_hh.T + b_hh
        i = torch.sigmoid(gates[:, 0:H])
        f = torch.sigmoid(gates[:, H : 2 * H])
        gg = torch.tanh(gates[:, 2 * H : 3 * H])
        o = torch.sigmoid(gates[:, 3 * H : 4 * H])
        c_new = f * c[layer] + i * gg
        h_new = o * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        x = h_new
    out = (x @ lopt.output.weight.detach().T + lopt.output.bias.detach()).squeeze(-1)
    return out * lopt.output_scale, torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize(
    "kw",
    [
        dict(hidden_size=20, num_layers=2, preprocess="none", output_scale=0.37),
        dict(hidden_size=7, num_layers=3, preprocess="log_sign", preprocess_p=10.0, output_scale=0.01),
        dict(hidden_size=5, num_layers=1, preprocess="log_sign", preprocess_p=5.0, output_scale=2.0),
    ],
)
def test_update_equals_hand_written_lstm(kw):
    lopt = _lstm(seed=3, **kw)
    g = torch.Generator().manual_seed(4)
    shapes = {"a": (3, 2), "b": (5,)}
    params = {k: torch.randn(s, generator=g, dtype=DT) for k, s in shapes.items()}
    state = lopt.init(params)
    n = 11
    h = torch.zeros(lopt.num_layers, n, lopt.hidden_size, dtype=DT)
    c = torch.zeros_like(h)
    for step in range(3):
        # Gradients spanning many magnitudes, zero included, so both preprocessing branches are hit.
        flat = torch.randn(n, generator=g, dtype=DT) * torch.logspace(-8, 1, n, dtype=DT)
        flat[step] = 0.0
        grads = {"a": flat[:6].reshape(3, 2), "b": flat[6:]}
        with torch.no_grad():
            updates, state = lopt.update(grads, state, params)
        expected, h, c = _manual_update(lopt, flat, h, c, lopt.preprocess_p)
        got = torch.cat([updates["a"].reshape(-1), updates["b"]])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
        # the state is feature-major: [layers, hidden, coordinates]
        torch.testing.assert_close(state.h, h.transpose(1, 2), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(state.c, c.transpose(1, 2), rtol=1e-12, atol=1e-15)
    assert got.abs().max() > 0


def test_output_scale_multiplies_update():
    a = _lstm(seed=5, hidden_size=6, output_scale=1.0)
    b = _lstm(seed=5, hidden_size=6, output_scale=0.125)
    grads = {"x": torch.linspace(-2, 2, 9, dtype=DT)}
    ua, _ = a.update(grads, a.init(grads))
    ub, _ = b.update(grads, b.init(grads))
    torch.testing.assert_close(ub["x"], 0.125 * ua["x"], rtol=1e-14, atol=0)


@pytest.mark.parametrize("preprocess", ["none", "log_sign"])
def test_coordinatewise_permutation_equivariance(preprocess):
    lopt = _lstm(seed=6, hidden_size=8, num_layers=2, preprocess=preprocess)
    g = torch.Generator().manual_seed(7)
    n = 13
    perm = torch.randperm(n, generator=g)
    s = lopt.init({"x": torch.zeros(n, dtype=DT)})
    sp = lopt.init({"x": torch.zeros(n, dtype=DT)})
    for _ in range(3):
        grad = torch.randn(n, generator=g, dtype=DT)
        u, s = lopt.update({"x": grad}, s)
        up, sp = lopt.update({"x": grad[perm]}, sp)
        torch.testing.assert_close(up["x"], u["x"][perm], rtol=0, atol=1e-14)
        torch.testing.assert_close(sp.h, s.h[:, :, perm], rtol=0, atol=1e-14)
    # A coordinate's update depends only on its own gradient history: changing another
    # coordinate's gradient leaves it unchanged.
    grad = torch.randn(n, generator=g, dtype=DT)
    grad2 = grad.clone()
    grad2[0] += 10.0
    u1, _ = lopt.update({"x": grad}, s)
    u2, _ = lopt.update({"x": grad2}, s)
    torch.testing.assert_close(u1["x"][1:], u2["x"][1:], rtol=0, atol=0)
    assert (u1["x"][0] - u2["x"][0]).abs() > 0


def test_batched_instances_equal_individual_runs():
    lopt = _lstm(seed=8, hidden_size=10, num_layers=2, output_scale=0.1)
    B, d = 4, 5
    task = QuadraticFamily(d, dtype=DT).sample(B, torch.Generator().manual_seed(9))
    theta0 = task.init(torch.Generator().manual_seed(10))["theta"]

    def grad_of(W, y, theta):
        return 2 * torch.einsum("nji,nj->ni", W, torch.einsum("nij,nj->ni", W, theta) - y)

    with torch.no_grad():
        theta = theta0.clone()
        state = lopt.init({"theta": theta})
        batched = []
        for _ in range(4):
            u, state = lopt.update({"theta": grad_of(task.W, task.y, theta)}, state)
            theta = theta + u["theta"]
            batched.append(u["theta"])
        for b in range(B):
            W, y = task.W[b : b + 1], task.y[b : b + 1]
            th = theta0[b : b + 1].clone()
            st = lopt.init({"theta": th})
            for t in range(4):
                u, st = lopt.update({"theta": grad_of(W, y, th)}, st)
                th = th + u["theta"]
                torch.testing.assert_close(u["theta"], batched[t][b : b + 1], rtol=1e-12, atol=1e-14)


def test_update_is_differentiable_in_meta_parameters():
    lopt = _lstm(seed=11, hidden_size=4, num_layers=2, preprocess="log_sign")
    grads = {"x": torch.tensor([0.5, -1e-6, 3.0, 0.0], dtype=DT), "y": torch.tensor([[-0.2, 7.0]], dtype=DT)}
    state = lopt.init(grads)
    total = 0.0
    for _ in range(2):  # two steps, so the recurrent weights (which multiply h = 0 at step 1) matter
        updates, state = lopt.update(grads, state)
        total = total + sum((u**2).sum() for u in updates.values())
    names = [n for n, _ in lopt.named_parameters()]
    meta_grads = torch.autograd.grad(total, list(lopt.parameters()))
    assert len(meta_grads) == len(names) == 2 * 4 + 2
    for n, mg in zip(names, meta_grads):
        assert torch.isfinite(mg).all(), n
        assert mg.abs().max() > 0, f"zero meta-gradient for {n}"


def test_config_round_trips_constructor_arguments():
    kw = dict(hidden_size=7, num_layers=3, preprocess="log_sign", preprocess_p=5.0, output_scale=0.01)
    lopt = CoordinatewiseLSTM(**kw)
    assert lopt.config() == kw
    clone = CoordinatewiseLSTM(**lopt.config())
    assert [p.shape for p in clone.parameters()] == [p.shape for p in lopt.parameters()]
    tx = lopt.transform()
    assert isinstance(tx, GradientTransformation)


# --------------------------------------------------------------------------- drop-in torch optimizer


def _linear_problem():
    g = torch.Generator().manual_seed(12)
    X = torch.randn(16, 3, generator=g, dtype=DT)
    Y = torch.randn(16, 2, generator=g, dtype=DT)
    torch.manual_seed(13)
    model = nn.Linear(3, 2).double()
    return model, X, Y


def _mse(W, b, X, Y):
    return ((X @ W.T + b - Y) ** 2).mean()


@pytest.mark.parametrize("named", [False, True])
def test_as_torch_optimizer_matches_functional_updates(named):
    lopt = _lstm(seed=14, hidden_size=6, num_layers=2, preprocess="log_sign", preprocess_p=5.0, output_scale=0.1)
    model, X, Y = _linear_problem()
    start = {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone()}

    opt = lopt.as_torch_optimizer(model.named_parameters() if named else model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, TransformOptimizer)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _mse(model.weight, model.bias, X, Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = _mse(model.weight, model.bias, X, Y).item()
    assert final != losses[0]
    assert model.weight.grad is not None

    # The same three steps written out with the functional protocol.
    W, b = start["weight"].clone(), start["bias"].clone()
    state = lopt.init({"weight": W, "bias": b})
    ref_losses = []
    for _ in range(3):
        Wr, br = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = _mse(Wr, br, X, Y)
        gW, gb = torch.autograd.grad(loss, [Wr, br])
        ref_losses.append(loss.item())
        with torch.no_grad():
            upd, state = lopt.update({"weight": gW, "bias": gb}, state)
        W, b = W + upd["weight"], b + upd["bias"]
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    torch.testing.assert_close(model.weight.detach(), W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(W, start["weight"])
    # The meta-parameters got no gradient from the inner steps.
    assert all(p.grad is None for p in lopt.parameters())
