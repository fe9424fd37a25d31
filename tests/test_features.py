"""``learnopt.learned.features``: per-coordinate input features from gradient transformations.

References: hand computations written out here (EMAs, rsqrt, sign, the tanh step embedding of
learned_optimization), torch.optim.Adam's own step for the Adam direction, a transcription of
Lion's update (Chen et al. 2023, Algorithm 2), per-instance runs for batching, and central
finite differences for derivatives.
"""

from __future__ import annotations

import math

import pytest
import torch

from learnopt import optim as lo
from learnopt.learned import CoordinatewiseLSTM
from learnopt.learned.features import (
    DEFAULT_FEATURES,
    DEFAULT_TIMESCALES,
    MOMENTUM_DECAYS,
    RSQRT_EPS,
    SECOND_MOMENT_DECAYS,
    TransformFeatures,
    direction,
    step_embedding,
)
from learnopt.optim.base import EmptyState, GradientTransformation
from learnopt.optim.combinators import instance_norm
from conftest import all_partial_derivatives, central_difference

DT = torch.float64


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W": torch.randn(3, 4, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT),
            "s": torch.randn((), generator=g, dtype=DT)}


def _grad_sequence(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in params.items()} for _ in range(steps)]


def _flat(tree):
    return torch.cat([x.reshape(-1) for x in tree.values()])


def _run(feats, params, grads_seq):
    state = feats.init(params)
    out = []
    for grads in grads_seq:
        x, state = feats(grads, state, params)
        out.append(x)
    return out


def test_shapes_names_and_row_order_follow_the_coordinatewise_lstm():
    params = _params()
    feats = TransformFeatures(["grad", "momenta", "rsqrt_second_moment", "sign", "param"],
                              step_timescales=DEFAULT_TIMESCALES)
    assert feats.names == (["grad"] + [f"momentum_{b:g}" for b in MOMENTUM_DECAYS]
                           + [f"rsqrt_second_moment_{b:g}" for b in SECOND_MOMENT_DECAYS]
                           + ["sign", "param"] + [f"step_tanh_{s:g}" for s in DEFAULT_TIMESCALES])
    grads = _grad_sequence(params, 1)[0]
    x, state = feats(grads, feats.init(params), params)
    assert x.shape == (12 + 4 + 1, feats.num_features) and x.dtype == DT
    # column "grad" is exactly the LSTM's flattening of the gradients: cat of reshape(-1) in dict order
    torch.testing.assert_close(x[:, feats.names.index("grad")], _flat(grads), rtol=0, atol=0)
    torch.testing.assert_close(x[:, feats.names.index("param")], _flat(params), rtol=0, atol=0)
    per_tensor, _ = feats.features_per_tensor(grads, feats.init(params), params)
    assert per_tensor["W"].shape == (3, 4, feats.num_features) and per_tensor["s"].shape == (feats.num_features,)
    torch.testing.assert_close(torch.cat([v.reshape(-1, feats.num_features) for v in per_tensor.values()]), x)
    assert int(state.count) == 1
    # unflatten inverts the row order
    back = feats.unflatten(x[:, 0], params)
    for k in params:
        torch.testing.assert_close(back[k], grads[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="17 coordinates"):
        feats.unflatten(x[:-1, 0], params)


def test_momentum_and_second_moment_features_equal_hand_computed_emas():
    params = _params()
    seq = _grad_sequence(params, 6)
    feats = TransformFeatures(["momenta", "rsqrt_second_moment", "grad", "sign"])
    outs = _run(feats, params, seq)
    m = {b: torch.zeros(17, dtype=DT) for b in MOMENTUM_DECAYS}
    v = {b: torch.zeros(17, dtype=DT) for b in SECOND_MOMENT_DECAYS}
    for grads, x in zip(seq, outs):
        g = _flat(grads)
        for b in MOMENTUM_DECAYS:
            m[b] = b * m[b] + (1 - b) * g
            torch.testing.assert_close(x[:, feats.names.index(f"momentum_{b:g}")], m[b], rtol=1e-14, atol=0)
        for b in SECOND_MOMENT_DECAYS:
            v[b] = b * v[b] + (1 - b) * g * g
            expected = 1 / torch.sqrt(v[b] + RSQRT_EPS)
            torch.testing.assert_close(x[:, feats.names.index(f"rsqrt_second_moment_{b:g}")], expected,
                                       rtol=1e-13, atol=0)
        torch.testing.assert_close(x[:, feats.names.index("grad")], g, rtol=0, atol=0)
        torch.testing.assert_close(x[:, feats.names.index("sign")], torch.sign(g), rtol=0, atol=0)
    # custom decays by name
    x = _run(TransformFeatures(["momentum_0.7"]), params, seq[:2])[-1]
    g0, g1 = _flat(seq[0]), _flat(seq[1])
    torch.testing.assert_close(x[:, 0], 0.7 * 0.3 * g0 + 0.3 * g1, rtol=1e-14, atol=0)


def test_adam_direction_equals_learnopt_adam_with_lr_minus_one_and_torch_adam_step():
    params = _params()
    seq = _grad_sequence(params, 8)
    feats = TransformFeatures(["adam"])
    outs = _run(feats, params, seq)
    tx = lo.adam(lr=-1.0)
    state = tx.init(params)
    ref_params = [p.clone().requires_grad_(True) for p in params.values()]
    torch_adam = torch.optim.Adam(ref_params, lr=1.0)
    for grads, x in zip(seq, outs):
        updates, state = tx.update(grads, state, params)
        torch.testing.assert_close(x[:, 0], _flat(updates), rtol=0, atol=0)
        # independent reference: torch.optim.Adam's own step at lr 1, sign flipped
        before = [p.detach().clone() for p in ref_params]
        for p, g in zip(ref_params, grads.values()):
            p.grad = g.clone()
        torch_adam.step()
        step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, ref_params)])
        torch.testing.assert_close(x[:, 0], step, rtol=1e-9, atol=1e-12)


def test_lion_direction_equals_a_transcription_of_the_paper():
    """Chen et al. 2023 (arXiv 2302.06675), Algorithm 2 with lr 1, no weight decay:
    u = sign(b1 m + (1 - b1) g);  m <- b2 m + (1 - b2) g;  defaults b1 = 0.9, b2 = 0.99."""
    params = _params()
    seq = _grad_sequence(params, 6)
    outs = _run(TransformFeatures(["lion"]), params, seq)
    m = torch.zeros(17, dtype=DT)
    for grads, x in zip(seq, outs):
        g = _flat(grads)
        expected = torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        torch.testing.assert_close(x[:, 0], expected, rtol=0, atol=0)


def test_direction_of_registered_and_given_transforms():
    params = _params()
    seq = _grad_sequence(params, 4)
    outs = _run(TransformFeatures({"sgd": "sgd", "heavy": direction("momentum", momentum=0.5),
                                   "mine": direction(lo.sgd(lr=2.0))}), params, seq)
    buf = torch.zeros(17, dtype=DT)
    for t, (grads, x) in enumerate(zip(seq, outs)):
        g = _flat(grads)
        buf = g if t == 0 else 0.5 * buf + g  # torch.optim.SGD's momentum buffer
        torch.testing.assert_close(x[:, 0], g, rtol=0, atol=0)
        torch.testing.assert_close(x[:, 1], buf, rtol=1e-14, atol=0)
        torch.testing.assert_close(x[:, 2], 2 * g, rtol=0, atol=0)


def _tensor_norm(batch_dims=0) -> GradientTransformation:
    """A reducing transform: each tensor's gradient norm per instance (smaller than the tensor)."""

    def update(updates, state, params=None, **extra):
        return {k: instance_norm({k: g}, batch_dims).reshape(g.shape[:batch_dims] + (1,) * (g.dim() - batch_dims))
                for k, g in updates.items()}, state

    return GradientTransformation(lambda p: EmptyState(), update)


def test_scalar_features_are_broadcast_per_tensor():
    params = _params()
    grads = _grad_sequence(params, 1)[0]
    feats = TransformFeatures({"norm": _tensor_norm()}, step_timescales=(1, 10))
    x, _ = feats(grads, feats.init(params), params)
    expected = torch.cat([torch.full((g.numel(),), float(g.norm()), dtype=DT) for g in grads.values()])
    torch.testing.assert_close(x[:, 0], expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(x[:, 1:], step_embedding(0, (1, 10), DT).expand(17, 2), rtol=0, atol=0)

    bad = GradientTransformation(lambda p: EmptyState(),
                                 lambda u, s, p=None, **e: ({k: torch.zeros(7, dtype=DT) for k in u}, s))
    with pytest.raises(ValueError, match="does not broadcast"):
        TransformFeatures({"bad": bad})(grads, TransformFeatures({"bad": bad}).init(params), params)


def test_batched_features_equal_per_instance_features():
    B = 3
    g = torch.Generator().manual_seed(2)
    batched = {"w": torch.randn(B, 5, generator=g, dtype=DT)}
    seq = [{"w": torch.randn(B, 5, generator=g, dtype=DT)} for _ in range(4)]

    def make(batch_dims):
        return TransformFeatures({**{n: n for n in ("grad", "momentum_0.9", "rsqrt_second_moment_0.99", "adam")},
                                  "norm": _tensor_norm(batch_dims)}, step_timescales=(1, 3))

    together = _run(make(1), batched, seq)
    for i in range(B):
        alone = _run(make(0), {"w": batched["w"][i]}, [{"w": s["w"][i]} for s in seq])
        for x, y in zip(together, alone):
            torch.testing.assert_close(x[i * 5:(i + 1) * 5], y, rtol=1e-13, atol=0)


def test_step_embedding_values():
    assert DEFAULT_TIMESCALES == (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
    e0 = step_embedding(0)
    torch.testing.assert_close(e0, torch.full((9,), math.tanh(-1.0)), rtol=1e-7, atol=0)
    e = step_embedding(torch.tensor(30), (1, 10, 30, 300), DT)
    expected = torch.tensor([math.tanh(29.0), math.tanh(2.0), math.tanh(0.0), math.tanh(-0.9)], dtype=DT)
    torch.testing.assert_close(e, expected, rtol=1e-15, atol=1e-15)
    # inside TransformFeatures the embedding encodes the number of previous calls
    params = _params()
    outs = _run(TransformFeatures(["grad"], step_timescales=(1, 3)), params, _grad_sequence(params, 3))
    for t, x in enumerate(outs):
        torch.testing.assert_close(x[0, 1:], torch.tanh(torch.tensor([t / 1 - 1, t / 3 - 1], dtype=DT)))


def test_unknown_and_duplicate_feature_names_are_refused():
    with pytest.raises(ValueError, match="unknown feature 'momentun'"):
        TransformFeatures(["momentun"])
    with pytest.raises(ValueError, match="unknown feature 'momentum_x'"):
        TransformFeatures(["momentum_x"])
    with pytest.raises(ValueError, match="given twice"):
        TransformFeatures(["grad", {"grad": lo.sgd(lr=-1.0)}])
    with pytest.raises(TypeError, match="GradientTransformation"):
        TransformFeatures({"x": 3})
    with pytest.raises(ValueError, match="needs params"):
        feats = TransformFeatures(["param"])
        p = _params()
        feats(p, feats.init(p))


def _zero_grad_double_backward(names):
    """Features at a gradient that is exactly zero (x[2] == 0, x[3] unused by the loss), through a
    linear head, differentiated twice."""
    x = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=DT, requires_grad=True)
    feats = TransformFeatures(names, step_timescales=(1, 10))
    head = torch.linspace(-1, 1, feats.num_features, dtype=DT).requires_grad_(True)
    moving = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DT)
    params = {"x": x}
    state = feats.init(params)
    for _ in range(2):
        y = params["x"]
        loss = (y[:3] ** 2).sum() + y[0] ** 3 * y[1]
        (g,) = torch.autograd.grad(loss, [params["x"]], create_graph=True)
        assert g[2] == 0 and g[3] == 0
        f, state = feats({"x": g}, state, params)
        assert torch.isfinite(f).all()
        # only the coordinates with nonzero gradient move, so g[2] and g[3] stay exactly 0
        params = {"x": params["x"] - 0.01 * (f @ head) * moving}
    final = (params["x"] ** 2).sum()
    first = torch.autograd.grad(final, [x, head], create_graph=True)
    second = torch.autograd.grad(first[0].sum() + first[1].sum(), [x, head], allow_unused=True)
    return [t for t in (*first, *second) if t is not None]


def test_no_nan_at_zero_gradient_in_values_and_double_backward():
    for t in _zero_grad_double_backward(list(DEFAULT_FEATURES) + ["param"]):
        assert torch.isfinite(t).all(), t


def test_zero_gradient_check_detects_plain_rsqrt_and_sqrt():
    """Controls: a plain rsqrt is infinite at zero gradient; a plain sqrt is finite there but its
    derivative is NaN, which the double backward above exposes."""
    rsqrt = GradientTransformation(lambda p: EmptyState(),
                                   lambda u, s, p=None, **e: ({k: torch.rsqrt(g * g) for k, g in u.items()}, s))
    with pytest.raises(AssertionError):
        _zero_grad_double_backward([{"bad": rsqrt}])
    sqrt = GradientTransformation(lambda p: EmptyState(),
                                  lambda u, s, p=None, **e: ({k: torch.sqrt(g * g) for k, g in u.items()}, s))
    out = _zero_grad_double_backward(["grad", {"bad": sqrt}])
    assert any(not torch.isfinite(t).all() for t in out)


def _unrolled_meta_loss(head: torch.nn.Linear, decay, steps=5):
    """A tiny learned optimizer: a linear layer over the features, on a non-quadratic problem."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 4, generator=g, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)
    params = {"w": torch.randn(4, generator=g, dtype=DT) * 0.5, "c": torch.zeros((), dtype=DT)}
    feats = TransformFeatures({"grad": "grad", "m": lo.chain(lo.trace(decay)), "adam": "adam", "sign": "sign"},
                              step_timescales=(1, 10))
    state = feats.init(params)
    total = 0.0
    for _ in range(steps):
        p = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in params.items()}
        loss = torch.tanh(A @ p["w"] + p["c"] - b).pow(2).sum() + 0.1 * (p["w"] ** 4).sum()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()), create_graph=True)))
        x, state = feats(grads, state, p)
        step = feats.unflatten(head(x).squeeze(-1), p)
        params = {k: p[k] - 0.05 * step[k] for k in p}
        total = total + loss
    return total


def test_a_linear_learned_optimizer_over_features_is_differentiable_end_to_end():
    torch.manual_seed(0)
    head = torch.nn.Linear(4 + 2, 1).to(DT)
    decay = torch.tensor(0.8, dtype=DT, requires_grad=True)
    grads = torch.autograd.grad(_unrolled_meta_loss(head, decay), [head.weight, head.bias, decay])
    for tensor, grad in ((head.weight, grads[0]), (head.bias, grads[1])):
        numeric = all_partial_derivatives(lambda: _unrolled_meta_loss(head, decay), tensor)
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)
    numeric = central_difference(lambda v: _unrolled_meta_loss(head, v), torch.tensor(0.8, dtype=DT))
    assert grads[2].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert grads[0].abs().max() > 1e-3 and abs(grads[2].item()) > 1e-6


def test_features_feed_the_lstm_order():
    """The rows line up with CoordinatewiseLSTM's flattening, so per-coordinate LSTM outputs and
    feature rows refer to the same coordinates."""
    params = _params()
    grads = _grad_sequence(params, 1)[0]
    lstm = CoordinatewiseLSTM(hidden_size=2).to(DT)
    updates, _ = lstm.update(grads, lstm.init(params), params)
    x, _ = TransformFeatures(["grad"])(grads, TransformFeatures(["grad"]).init(params), params)
    # the LSTM is coordinatewise: the same input row gives the same output, so reordering would show
    single = {"only": x[:, 0]}
    out, _ = lstm.update(single, lstm.init(single), single)
    torch.testing.assert_close(out["only"], _flat(updates), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", [n for n, info in __import__("learnopt.optim.registry", fromlist=["x"])
                                  .OPTIMIZERS.items() if not info.extras])
def test_every_registered_optimizer_without_extras_is_a_feature(name):
    """What docs/optimizers.md claims in its "feature" column: the direction by name runs, and
    for one step from a zero state it is minus the optimizer's own update at lr = 1."""
    from learnopt.optim.registry import get_info

    params = {"W": torch.randn(3, 4, dtype=DT), "b": torch.randn(4, dtype=DT)}
    seq = _grad_sequence(params, 3)
    outs = _run(TransformFeatures([name]), params, seq)
    assert all(x.shape == (16, 1) and torch.isfinite(x).all() for x in outs)
    tx = get_info(name).make(1.0)
    updates, _ = tx.update(seq[0], tx.init(params), params)
    torch.testing.assert_close(outs[0][:, 0], -_flat(updates), rtol=0, atol=0)
