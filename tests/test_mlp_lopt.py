"""Tests of ``learnopt.learned.mlp_lopt.FeatureMLPOptimizer`` (``learned_optimization``'s MLPLOpt).

References: the features, per-tensor normalisation, MLP and update rule written out here from
the formulas (moving averages by hand, ``math.tanh`` step embedding, explicit matmuls with the
module's own weights); the same problem run one instance at a time; central finite
differences of a truncated-BPTT meta-loss; the module's own ``update`` for the drop-in and
checkpoint paths; fresh (unmeta-trained) weights for the meta-training check.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import learnopt
from learnopt.learned import REGISTRY, FeatureMLPOptimizer
from learnopt.learned.features import FeaturesState
from learnopt.meta import TruncatedBPTT, log10_losses, rollout
from learnopt.optim import TransformOptimizer, apply_updates
from learnopt.task import seeded_generator
from tasks.quadratic import QuadraticFamily
from conftest import directional_derivative

DT = torch.float64
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mlp_lopt_quadratic.yaml"


def _lopt(seed=0, **kw) -> FeatureMLPOptimizer:
    torch.manual_seed(seed)
    return FeatureMLPOptimizer(**kw).double()


# --------------------------------------------------------------------------- construction


def test_defaults_parameter_count_and_feature_names():
    lopt = FeatureMLPOptimizer()
    # grad, param, 4 momenta, 1 rsqrt, 4 momentum * rsqrt, 9 step timescales
    assert lopt.num_features == 2 + 4 + 1 + 4 + 9 == 20
    assert lopt.feature_names[:7] == ["grad", "param", "momentum_0.5", "momentum_0.9", "momentum_0.99",
                                      "momentum_0.999", "rsqrt_second_moment_0.999"]
    assert lopt.feature_names[7] == "momentum_0.5*rsqrt_second_moment_0.999"
    assert lopt.feature_names[-1] == "step_tanh_10000"
    # 20 -> 32 -> 32 -> 2, worked out by hand
    assert sum(p.numel() for p in lopt.parameters()) == (20 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2) == 1794
    # learned_optimization's MLPLOpt defaults
    assert lopt.exp_mult == 0.001 and lopt.step_mult == 0.001 and lopt.hidden_sizes == [32, 32]
    # the last layer starts small, with zero bias
    assert torch.equal(lopt.layers[-1].bias, torch.zeros(2))
    assert lopt.layers[-1].weight.abs().max() <= 0.01 / math.sqrt(32) + 1e-9
    assert FeatureMLPOptimizer(param_feature=False).num_features == 19
    assert REGISTRY["FeatureMLPOptimizer"] is FeatureMLPOptimizer


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="hidden"):
        FeatureMLPOptimizer(hidden_sizes=(4, 0))
    with pytest.raises(ValueError, match="decays"):
        FeatureMLPOptimizer(momentum_decays=(0.9, 1.0))
    with pytest.raises(ValueError, match="decays"):
        FeatureMLPOptimizer(second_moment_decay=-0.1)
    with pytest.raises(ValueError, match="batch_dims"):
        FeatureMLPOptimizer(batch_dims=-1)
    with pytest.raises(ValueError, match="given twice"):
        FeatureMLPOptimizer(momentum_decays=(0.9, 0.9))


def test_config_round_trips_constructor_arguments():
    kw = {"hidden_sizes": [5, 3, 2], "momentum_decays": [0.1, 0.95], "second_moment_decay": 0.9, "param_feature": False,
              "step_timescales": [1.0, 7.0], "exp_mult": 0.5, "step_mult": 0.02, "output_init_scale": 0.3,
              "batch_dims": 1}
    lopt = FeatureMLPOptimizer(**kw)
    assert lopt.config() == kw
    clone = FeatureMLPOptimizer(**lopt.config())
    assert [p.shape for p in clone.parameters()] == [p.shape for p in lopt.parameters()]
    import json

    assert json.loads(json.dumps(lopt.config())) == kw


def test_update_shapes_dtypes_and_state():
    lopt = _lopt(batch_dims=1)
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, 5, generator=g, dtype=DT), "b": torch.randn(3, 5, generator=g, dtype=DT),
              "s": torch.randn(3, generator=g, dtype=DT)}
    state = lopt.init(params)
    assert isinstance(state, FeaturesState) and int(state.count) == 0
    for t in range(2):
        grads = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in params.items()}
        updates, state = lopt.update(grads, state, params)
        assert list(updates) == list(params)
        for k, p in params.items():
            assert updates[k].shape == p.shape and updates[k].dtype == DT
            assert torch.isfinite(updates[k]).all()
        assert int(state.count) == t + 1
    # the untrained optimizer takes small steps: about step_mult * output_init_scale
    assert 0 < max(u.abs().max() for u in updates.values()) < 1e-4
    # a float32 optimizer works on float64 parameters (and returns its own dtype)
    u32, _ = FeatureMLPOptimizer(batch_dims=1).update(grads, FeatureMLPOptimizer().init(params), params)
    assert u32["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="needs params"):
        lopt.update(grads, lopt.init(params))
    with pytest.raises(ValueError, match="batch_dims=2"):
        lopt.update(grads, lopt.init(params), params, batch_dims=2)


# --------------------------------------------------------------------------- hand computation


def _hand_normalize(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """x / sqrt(mean(x^2) + 1e-5) for each feature column, separately for each instance."""
    if batch_dims > 0:
        return torch.stack([_hand_normalize(x[i], batch_dims - 1) for i in range(x.shape[0])])
    cols = []
    for f in range(x.shape[-1]):
        col = x[..., f]
        mean_square = sum(float(v) ** 2 for v in col.reshape(-1)) / col.numel()
        cols.append(col / math.sqrt(mean_square + 1e-5))
    return torch.stack(cols, dim=-1)


def _hand_mlp(lopt: FeatureMLPOptimizer, x: torch.Tensor) -> torch.Tensor:
    Ws = [layer.weight.detach() for layer in lopt.layers]
    bs = [layer.bias.detach() for layer in lopt.layers]
    for i, (W, b) in enumerate(zip(Ws, bs)):
        x = x @ W.T + b
        if i < len(Ws) - 1:
            x = torch.clamp(x, min=0.0)
    return x


class _HandFeatureMLP:
    """The optimizer of mlp_lopt.py's docstring, from the formulas."""

    def __init__(self, lopt: FeatureMLPOptimizer, params, batch_dims: int):
        self.lopt, self.batch_dims = lopt, batch_dims
        self.m = {b: {k: torch.zeros_like(p) for k, p in params.items()} for b in lopt.momentum_decays}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def update(self, grads, params):
        lopt, beta = self.lopt, self.lopt.second_moment_decay
        for b in lopt.momentum_decays:
            self.m[b] = {k: b * self.m[b][k] + (1 - b) * g for k, g in grads.items()}
        self.v = {k: beta * self.v[k] + (1 - beta) * g * g for k, g in grads.items()}
        emb = [math.tanh(self.t / s - 1.0) for s in lopt.step_timescales]
        self.t += 1
        out = {}
        for k, g in grads.items():
            r = 1.0 / torch.sqrt(self.v[k] + 1e-6)
            cols = [g] + ([params[k]] if lopt.param_feature else [])
            cols += [self.m[b][k] for b in lopt.momentum_decays] + [r]
            cols += [self.m[b][k] * r for b in lopt.momentum_decays]
            x = _hand_normalize(torch.stack(cols, dim=-1), self.batch_dims)
            x = torch.cat([x, torch.tensor(emb, dtype=DT).expand(*g.shape, len(emb))], dim=-1)
            y = _hand_mlp(lopt, x)
            out[k] = -(y[..., 0] * torch.exp(y[..., 1] * lopt.exp_mult) * lopt.step_mult)
        return out


_HAND_CASES = [
    {"hidden_sizes": (5, 4), "momentum_decays": (0.5, 0.9), "second_moment_decay": 0.99, "step_timescales": (1, 10),
     "exp_mult": 0.7, "step_mult": 0.05, "output_init_scale": 1.0},
    {"hidden_sizes": (6,), "momentum_decays": (0.3,), "second_moment_decay": 0.9, "param_feature": False,
     "step_timescales": (2,), "exp_mult": 2.0, "step_mult": 0.3, "output_init_scale": 1.0},
    {},  # the defaults
]


@pytest.mark.parametrize("kw", _HAND_CASES, ids=["two_layers", "one_layer_no_param", "defaults"])
@pytest.mark.parametrize("batch_dims", [0, 1])
def test_update_equals_hand_computation(kw, batch_dims):
    lopt = _lopt(seed=2, **kw, batch_dims=batch_dims)
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (2, 3), "b": (4,), "s": ()} if batch_dims == 0 else {"a": (2, 3, 2), "b": (2, 4), "s": (2,)}
    params = {k: torch.randn(s, generator=g, dtype=DT) for k, s in shapes.items()}
    hand = _HandFeatureMLP(lopt, params, batch_dims)
    state = lopt.init(params)
    for step in range(4):
        # gradients over several magnitudes, with an exact zero
        grads = {k: torch.randn(s, generator=g, dtype=DT) * 10.0 ** float(i - 1)
                 for i, (k, s) in enumerate(shapes.items())}
        grads["a"].view(-1)[step] = 0.0
        with torch.no_grad():
            updates, state = lopt.update(grads, state, params)
        expected = hand.update(grads, params)
        for k in params:
            torch.testing.assert_close(updates[k], expected[k], rtol=1e-11, atol=1e-16)
        assert max(u.abs().max() for u in updates.values()) > 0
        params = {k: p + updates[k] for k, p in params.items()}


def test_normalisation_is_per_tensor_and_scale_free():
    """Scaling one tensor's gradients (and the parameter) by a constant leaves every
    normalised feature, hence the update, unchanged (up to the eps terms); another tensor is
    unaffected by it: the normalising mean never crosses tensors."""
    lopt = _lopt(seed=4, output_init_scale=1.0, step_mult=0.1)
    g = torch.Generator().manual_seed(5)
    params = {"a": torch.randn(5, 4, generator=g, dtype=DT), "b": torch.randn(7, generator=g, dtype=DT)}
    # Invariance holds where the eps terms (1e-6 inside rsqrt(v + 1e-6), 1e-5 in the normaliser) are
    # negligible. With zero-started averages the slow momentum is only 1e-3 g after one step, so
    # |g| >= 100 keeps every column's mean square far above 1e-5, in both runs.
    grads = [{k: 100 * torch.sign(x) * (1 + x.abs()) for k, x in
              ((k, torch.randn(p.shape, generator=g, dtype=DT)) for k, p in params.items())} for _ in range(3)]
    s1, s2 = lopt.init(params), lopt.init(params)
    scaled_params = {"a": 2 * params["a"], "b": params["b"]}
    for gr in grads:
        u1, s1 = lopt.update(gr, s1, params)
        u2, s2 = lopt.update({"a": 2 * gr["a"], "b": gr["b"]}, s2, scaled_params)
    torch.testing.assert_close(u2["b"], u1["b"], rtol=1e-13, atol=0)
    torch.testing.assert_close(u2["a"], u1["a"], rtol=2e-3, atol=0)  # only the eps terms differ
    assert (u1["a"] - u2["a"]).abs().max() > 0


# --------------------------------------------------------------------------- batching


def test_batched_instances_equal_individual_runs():
    B = 3
    kw = {"hidden_sizes": (8, 8), "step_mult": 0.05, "exp_mult": 0.5, "output_init_scale": 1.0}
    batched_lopt, single_lopt = _lopt(seed=6, batch_dims=1, **kw), _lopt(seed=6, batch_dims=0, **kw)
    g = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(B, 4, 3, generator=g, dtype=DT), "b": torch.randn(B, 3, generator=g, dtype=DT),
              "s": torch.randn(B, generator=g, dtype=DT)}
    # instances on very different gradient scales: normalising across them would show
    scale = torch.tensor([1e-3, 1.0, 1e2], dtype=DT)

    def grad_of(p, instance_scale):
        return {k: torch.sin(3 * v) * instance_scale ** (i + 1) for i, (k, v) in enumerate(p.items())}

    def per_instance(v):
        return scale.reshape(-1, *[1] * (v.dim() - 1))

    with torch.no_grad():
        p, state, traj = dict(params), batched_lopt.init(params), []
        for _ in range(4):
            grads = {k: torch.sin(3 * v) * per_instance(v) ** (i + 1) for i, (k, v) in enumerate(p.items())}
            u, state = batched_lopt.update(grads, state, p)
            p = apply_updates(p, u)
            traj.append(u)
        for i in range(B):
            q = {k: v[i] for k, v in params.items()}
            st = single_lopt.init(q)
            for t in range(4):
                u, st = single_lopt.update(grad_of(q, scale[i]), st, q)
                q = apply_updates(q, u)
                for k in q:
                    torch.testing.assert_close(u[k], traj[t][k][i], rtol=1e-12, atol=1e-18)
        # control: batch_dims=0 on the batched tensors mixes the instances and differs
        grads = {k: torch.sin(3 * v) * per_instance(v) for k, v in params.items()}
        u0, _ = single_lopt.update(grads, single_lopt.init(params), params)
        u1, _ = batched_lopt.update(grads, batched_lopt.init(params), params)
        assert not torch.allclose(u0["w"], u1["w"], rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- meta-gradients


def _meta_loss(est, lopt, state) -> float:
    return est.unroll(lopt, state)[0].item()


def test_second_order_meta_gradient_matches_finite_differences():
    lopt = _lopt(seed=8, hidden_sizes=(4, 4), step_mult=0.1, exp_mult=0.5, output_init_scale=1.0,
                 step_timescales=(1, 3), batch_dims=1)
    est = TruncatedBPTT(QuadraticFamily(3, dtype=DT), num_tasks=3, unroll_length=4, horizon=4,
                        second_order=True, loss_transform="log", seed=9)
    state = est.init_unroll(lopt)
    res = est.estimate(lopt, state)
    assert res.finite and set(res.meta_grads) == {n for n, _ in lopt.named_parameters()}
    named = dict(lopt.named_parameters())
    g = torch.Generator().manual_seed(10)
    nonzero = 0
    for name in sorted(named):  # two weights of every tensor of every layer
        for _ in range(2):
            idx = int(torch.randint(named[name].numel(), (1,), generator=g))
            d = torch.zeros_like(named[name]).view(-1)
            d[idx] = 1.0
            fd = directional_derivative(lambda: _meta_loss(est, lopt, state), {name: named[name]},
                                        {name: d.view_as(named[name])})
            analytic = res.meta_grads[name].reshape(-1)[idx].item()
            assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9), (name, idx)
            nonzero += abs(fd) > 1e-6
    assert nonzero >= len(named)
    direction = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in named.items()}
    fd = directional_derivative(lambda: _meta_loss(est, lopt, state), named, direction)
    analytic = sum((res.meta_grads[n] * direction[n]).sum() for n in named).item()
    assert abs(fd) > 1e-4 and analytic == pytest.approx(fd, rel=1e-6)


def test_meta_training_reduces_validation_loss():
    """A few meta-steps of truncated BPTT with Adam on 5-d quadratics lower the mean log10 final
    loss of full runs on held-out instances, against the same optimizer before meta-training."""
    torch.manual_seed(11)
    lopt = FeatureMLPOptimizer(hidden_sizes=(16, 16), step_mult=0.1, exp_mult=0.1, batch_dims=1)
    fam = QuadraticFamily(5)
    est = TruncatedBPTT(fam, num_tasks=16, unroll_length=10, horizon=30, loss_transform="log", seed=12)

    def val() -> float:
        gen = seeded_generator("val", 13)
        task = fam.sample(64, gen)
        return float(log10_losses(rollout(lopt, task, 30, generator=gen)[-1]).mean())

    before = val()
    opt = torch.optim.Adam(lopt.parameters(), lr=3e-3)
    state = None
    for _ in range(30):
        res = est.estimate(lopt, state)
        state = res.unroll_state
        assert res.finite
        for n, p in lopt.named_parameters():
            p.grad = res.meta_grads[n]
        opt.step()
    after = val()
    assert after < before - 0.5, (before, after)


# --------------------------------------------------------------------------- zero gradients


def test_no_nan_at_zero_gradients_values_and_double_backward():
    lopt = _lopt(seed=14, hidden_sizes=(6,), step_mult=0.1, exp_mult=0.5, output_init_scale=1.0)
    zeros = {"w": torch.zeros(3, 2, dtype=DT), "b": torch.zeros(2, dtype=DT), "s": torch.zeros((), dtype=DT)}
    u, _ = lopt.update(zeros, lopt.init(zeros), zeros)
    assert all(torch.isfinite(v).all() for v in u.values())

    # an unroll in which some coordinates have exactly zero gradient at every step, differentiated
    # twice (second-order meta-gradient, then a derivative of it)
    x0 = torch.tensor([0.7, -1.2, 0.0, 0.3], dtype=DT, requires_grad=True)
    moving = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DT)
    params, state, total = {"x": x0}, lopt.init({"x": x0}), 0.0
    for _ in range(3):
        x = params["x"]
        loss = (x[:3] ** 2).sum() + x[0] ** 3 * x[1]
        (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
        assert gx[2] == 0 and gx[3] == 0
        u, state = lopt.update({"x": gx}, state, params)
        assert torch.isfinite(u["x"]).all()
        params = {"x": x + u["x"] * moving}
        total = total + loss
    weights = list(lopt.parameters())
    first = torch.autograd.grad(total, [x0, *weights], create_graph=True)
    second = torch.autograd.grad(sum(f.sum() for f in first), [x0, *weights], allow_unused=True)
    for t in (*first, *second):
        if t is not None:
            assert torch.isfinite(t).all()
    assert any(f.abs().max() > 0 for f in first[1:])


# --------------------------------------------------------------------------- drop-in and checkpoints


def _model(seed=15):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _train(model, opt, steps):
    g = torch.Generator().manual_seed(16)
    dt = next(model.parameters()).dtype
    X, Y = torch.randn(32, 4, generator=g, dtype=dt), torch.randn(32, 1, generator=g, dtype=dt)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _functional_steps(lopt, model, steps, batch_dims):
    g = torch.Generator().manual_seed(16)
    dt = next(model.parameters()).dtype
    X, Y = torch.randn(32, 4, generator=g, dtype=dt), torch.randn(32, 1, generator=g, dtype=dt)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = lopt.init(params)
    for _ in range(steps):
        p = {k: v.requires_grad_(True) for k, v in params.items()}
        loss = ((torch.func.functional_call(model, p, (X,)) - Y) ** 2).mean()
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        with torch.no_grad():
            u, state = lopt.update(grads, state, {k: v.detach() for k, v in p.items()}, batch_dims=batch_dims)
        params = {k: v.detach() + u[k] for k, v in p.items()}
    return params


def test_checkpoint_round_trip_and_load_optimizer_drop_in(tmp_path):
    # meta-trained with batch_dims=1 (float32, as meta-training leaves it), dropped into an
    # ordinary model, where the drop-in uses batch_dims=0
    torch.manual_seed(17)
    lopt = FeatureMLPOptimizer(hidden_sizes=(7, 5), step_mult=0.05, exp_mult=0.3, output_init_scale=1.0, batch_dims=1)
    path = learnopt.export_checkpoint(lopt, tmp_path / "mlp.pt", {"meta_steps": 3})
    loaded = learnopt.load(path)
    assert type(loaded) is FeatureMLPOptimizer and loaded.config() == lopt.config()
    assert loaded.checkpoint_metadata == {"meta_steps": 3}
    assert loaded.state_dict().keys() == lopt.state_dict().keys()
    for k, v in lopt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    model_a, model_b = _model().float(), _model().float()
    opt_a = lopt.as_torch_optimizer(model_a.named_parameters())
    opt_b = learnopt.load_optimizer(path, model_b.named_parameters())
    assert isinstance(opt_b, TransformOptimizer)
    la, lb = _train(model_a, opt_a, 5), _train(model_b, opt_b, 5)
    assert la == lb and la[-1] < la[0]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    # ...and both are the functional update with batch_dims=0, not the constructor's 1
    expected = _functional_steps(lopt, _model().float(), 5, batch_dims=0)
    for n, p in model_b.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)
    other = _functional_steps(lopt, _model().float(), 5, batch_dims=1)
    assert not torch.allclose(other["0.weight"], expected["0.weight"], rtol=1e-4, atol=0)


def test_drop_in_state_dict_round_trip_and_batched_option(tmp_path):
    lopt = _lopt(seed=18, hidden_sizes=(6,), step_mult=0.05, output_init_scale=1.0)
    full = _model()
    losses_full = _train(full, lopt.as_torch_optimizer(full.parameters()), 6)

    half = _model()
    opt_half = lopt.as_torch_optimizer(half.parameters())
    _train(half, opt_half, 3)
    saved = opt_half.state_dict()
    resumed = _model()
    resumed.load_state_dict(half.state_dict())
    opt_resumed = lopt.as_torch_optimizer(resumed.parameters())
    opt_resumed.load_state_dict(saved)
    assert _train(resumed, opt_resumed, 3) == losses_full[3:]  # full-batch data: the same steps
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # control: without the saved state (fresh momenta, step 0) the steps differ
    fresh = _model()
    fresh.load_state_dict(half.state_dict())
    assert _train(fresh, lopt.as_torch_optimizer(fresh.parameters()), 3) != losses_full[3:]

    # load_optimizer(..., batch_dims=1) on batched task parameters follows the functional update
    torch.manual_seed(18)
    path = learnopt.export_checkpoint(FeatureMLPOptimizer(hidden_sizes=(6,), step_mult=0.05, output_init_scale=1.0,
                                                          batch_dims=1), tmp_path / "b.pt")
    theta = torch.randn(4, 5, generator=torch.Generator().manual_seed(19))
    weight = torch.arange(1, 5, dtype=torch.float32)[:, None]
    p = nn.Parameter(theta.clone())
    opt = learnopt.load_optimizer(path, [("theta", p)], batch_dims=1)
    ref = learnopt.load(path)
    state, th = ref.init({"theta": theta}), theta.clone()
    with torch.no_grad():
        for _ in range(3):
            p.grad = torch.cos(p.detach()) * weight
            opt.step()
            u, state = ref.update({"theta": torch.cos(th) * weight}, state, {"theta": th})
            th = th + u["theta"]
            assert torch.equal(p.detach(), th)


# --------------------------------------------------------------------------- config file


def test_config_runs_end_to_end(in_tmp):
    from learnopt.train.cli import meta_train

    cli = meta_train([
        "--config", str(CONFIG), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--model.estimator.num_tasks", "4", "--model.val_tasks", "4", "--model.estimator.horizon", "4",
        "--model.estimator.unroll_length", "2",
    ])
    assert cli.trainer.global_step == 2
    exported = list(in_tmp.glob("runs/**/*.pt"))
    assert len(exported) == 1
    lopt = learnopt.load(exported[0])
    assert isinstance(lopt, FeatureMLPOptimizer) and lopt.batch_dims == 1


# --------------------------------------------------------------------------- GPU


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_truncated_bptt_on_gpu_matches_cpu():
    def estimate(device):
        lopt = _lopt(seed=20, hidden_sizes=(8, 8), step_mult=0.1, output_init_scale=1.0, batch_dims=1).to(device)
        est = TruncatedBPTT(QuadraticFamily(5, dtype=DT), num_tasks=8, unroll_length=5, horizon=10, second_order=True)
        return est.estimate(lopt, est.init_unroll(lopt))

    cpu, gpu = estimate("cpu"), estimate("cuda")
    assert gpu.unroll_state.params["theta"].device.type == "cuda"
    torch.testing.assert_close(gpu.meta_loss.cpu(), cpu.meta_loss, rtol=1e-9, atol=1e-12)
    for k, g in cpu.meta_grads.items():
        torch.testing.assert_close(gpu.meta_grads[k].cpu(), g, rtol=1e-7, atol=1e-10)
