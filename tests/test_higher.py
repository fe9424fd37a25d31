"""learnopt optimizers inside ``higher.innerloop_ctx``: trajectories against higher's own
differentiable torch.optim counterparts, meta-gradients against central finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import learnopt
from learnopt import optim as lo
from learnopt.learned import CoordinatewiseLSTM
from conftest import central_difference, partial_derivatives

higher = pytest.importorskip("higher")
from learnopt.optim.higher_support import DifferentiableTransformOptimizer

DT = torch.float64
INNER_STEPS = 4


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
    Xq, Yq = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)
    return X, Y, Xq, Yq


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _maml(model, opt, steps=INNER_STEPS, track=True, **ctx):
    """Inner loop with higher; returns (fast weights per step, query loss)."""
    X, Y, Xq, Yq = _data()
    traj = []
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=track, **ctx) as (f, d):
        for _ in range(steps):
            d.step(_mse(f(X), Y))
            traj.append([p.detach().clone() for p in f.parameters()])
        meta_loss = _mse(f(Xq), Yq)
    return traj, meta_loss


def _some_indices(tensors, per_tensor=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    picks = []
    for i, t in enumerate(tensors):
        for _ in range(per_tensor):
            flat = int(torch.randint(t.numel(), (1,), generator=g))
            picks.append((i, tuple(int(j) for j in torch.unravel_index(torch.tensor(flat), t.shape))))
    return picks


# (id, learnopt transform, torch.optim class + kwargs whose higher counterpart is the reference).
# Adam: eps tiny because higher's DifferentiableAdam folds sqrt(1 - b2^t) into the step size and
# so scales eps by 1/sqrt(1 - b2^t); with eps -> 0 both are the same algorithm.
CASES = [
    ("sgd", lambda: lo.sgd(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    ("nesterov", lambda: lo.sgd(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD,
     dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("rmsprop", lambda: lo.rmsprop(lr=0.01, alpha=0.9), torch.optim.RMSprop, dict(lr=0.01, alpha=0.9)),
    ("adam", lambda: lo.adam(lr=0.1, eps=1e-14), torch.optim.Adam, dict(lr=0.1, eps=1e-14)),
]


@pytest.mark.parametrize("name,make_tx,torch_cls,torch_kwargs", CASES, ids=[c[0] for c in CASES])
def test_fast_weights_and_meta_gradient_match_highers_torch_optim(name, make_tx, torch_cls, torch_kwargs):
    model = _model()
    opt = lo.as_torch_optimizer(make_tx(), model.parameters())
    traj, meta = _maml(model, opt)
    ours = torch.autograd.grad(meta, list(model.parameters()))

    ref_model = copy.deepcopy(model)
    ref_traj, ref_meta = _maml(ref_model, torch_cls(ref_model.parameters(), **torch_kwargs))
    theirs = torch.autograd.grad(ref_meta, list(ref_model.parameters()))

    for t, (a, b) in enumerate(zip(traj, ref_traj)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11, msg=lambda m: f"step {t + 1}: {m}")
    assert max((x - p).abs().max() for x, p in zip(traj[-1], model.parameters())) > 1e-2  # it moved
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-11)


def test_meta_gradient_wrt_initial_weights_matches_finite_differences():
    model = _model()
    params = list(model.parameters())

    def meta_loss():
        opt = lo.as_torch_optimizer(lo.adam(lr=0.05), model.parameters())
        return _maml(model, opt)[1]

    grads = torch.autograd.grad(meta_loss(), params)
    picks = _some_indices(params)
    analytic = torch.stack([grads[i][idx] for i, idx in picks])
    numeric = partial_derivatives(meta_loss, params, picks).to(DT)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert analytic.abs().max() > 1e-4


@pytest.mark.parametrize("make_tx", [
    lambda lr: lo.adam(lr=lr),
    lambda lr: lo.sgd(lr=lr, momentum=0.9),
], ids=["adam", "momentum"])
def test_meta_gradient_wrt_tensor_lr_matches_finite_differences(make_tx):
    model = _model()
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)

    def meta_loss(value):
        opt = lo.as_torch_optimizer(make_tx(value), model.parameters())
        return _maml(model, opt)[1]

    (analytic,) = torch.autograd.grad(meta_loss(lr), [lr])
    numeric = torch.tensor(central_difference(meta_loss, lr), dtype=DT)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-10)
    assert abs(float(analytic)) > 1e-4


def test_override_of_injected_hyperparameters_is_differentiable():
    from learnopt.optim.hyperparams import inject_hyperparams

    model = _model()
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    opt = lo.as_torch_optimizer(inject_hyperparams(lo.adam)(lr=0.3), model.parameters())
    traj, meta = _maml(model, opt, override={"lr": [lr]})
    (via_override,) = torch.autograd.grad(meta, [lr])
    lr2 = torch.tensor(0.05, dtype=DT, requires_grad=True)
    traj2, meta2 = _maml(model, lo.as_torch_optimizer(lo.adam(lr=lr2), model.parameters()))
    (direct,) = torch.autograd.grad(meta2, [lr2])
    for a, b in zip(traj, traj2):  # the override replaced 0.3 by 0.05
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(via_override, direct, rtol=1e-10, atol=1e-12)


def test_override_of_a_group_hyperparameter_is_differentiable():
    """higher's ``override`` of a catalogue transform's param-group key rebuilds it with the tensor:
    the same trajectory and meta-gradient as passing the tensor to the factory."""
    model = _model()
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    traj, meta = _maml(model, lo.as_torch_optimizer(lo.adam(lr=0.1), model.parameters()), override={"lr": [lr]})
    (via_override,) = torch.autograd.grad(meta, [lr])
    lr2 = torch.tensor(0.05, dtype=DT, requires_grad=True)
    traj2, meta2 = _maml(model, lo.as_torch_optimizer(lo.adam(lr=lr2), model.parameters()))
    (direct,) = torch.autograd.grad(meta2, [lr2])
    for a, b in zip(traj, traj2):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(via_override, direct, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not a hyperparameter"):
        _maml(model, lo.as_torch_optimizer(lo.adam(lr=0.1), model.parameters()), override={"momentum": [lr]})


def test_torch_optimizer_state_is_copied_not_shared():
    model = _model()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.1), model.parameters())
    before = [x.clone() for s in opt.state.values() for x in s.values()]
    _maml(model, opt)
    for a, b in zip(before, [x for s in opt.state.values() for x in s.values()], strict=True):
        assert torch.equal(a, b)
    # and a differentiable optimizer of the right type was built by higher's registry
    diff = higher.optim.get_diff_optim(opt, model.parameters())
    assert isinstance(diff, DifferentiableTransformOptimizer)


def test_track_higher_grads_false_gives_the_same_weights_without_a_graph():
    model = _model()
    tracked, _ = _maml(model, lo.as_torch_optimizer(lo.adam(lr=0.1), model.parameters()))
    X, Y, _, _ = _data()
    opt = lo.as_torch_optimizer(lo.adam(lr=0.1), model.parameters())
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (f, d):
        for t in range(INNER_STEPS):
            d.step(_mse(f(X), Y))
            for x, y in zip(f.parameters(), tracked[t]):
                torch.testing.assert_close(x.detach(), y, rtol=1e-12, atol=1e-14)
        leaves = [x for x in lo.tree_leaves(d.tx_states) if isinstance(x, torch.Tensor)]
        assert all(x.grad_fn is None for x in leaves)


# --------------------------------------------------------------------------- learned optimizers


def _lstm(seed: int = 3) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(hidden_size=3, num_layers=1, output_scale=0.1).to(DT)


def test_meta_gradient_wrt_learned_optimizer_weights_matches_finite_differences():
    model = _model()
    lopt = _lstm()
    weights = list(lopt.parameters())

    def meta_loss():
        return _maml(model, lopt.as_torch_optimizer(model.parameters()), steps=3)[1]

    grads = torch.autograd.grad(meta_loss(), weights)
    picks = _some_indices(weights, per_tensor=2, seed=5)
    analytic = torch.stack([grads[i][idx] for i, idx in picks])
    numeric = partial_derivatives(meta_loss, weights, picks).to(DT)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert analytic.abs().max() > 1e-4
    # the inner loop followed the learned optimizer's own update rule
    X, Y, _, _ = _data()
    traj, _ = _maml(model, lopt.as_torch_optimizer(model.parameters()), steps=1)
    params = dict(model.named_parameters())
    g = torch.autograd.grad(_mse(torch.func.functional_call(model, params, (X,)), Y), list(params.values()))
    updates, _ = lopt.update(dict(zip(params, g)), lopt.init(params), params)
    for x, (k, p) in zip(traj[0], params.items()):
        torch.testing.assert_close(x, (p + updates[k]).detach(), rtol=1e-12, atol=1e-14)


def test_learned_optimizer_from_load_optimizer_keeps_its_weights_in_the_graph(in_tmp):
    lopt = _lstm()
    path = learnopt.export_checkpoint(lopt.float(), in_tmp / "lstm.pt")
    model = _model().float()
    opt = learnopt.load_optimizer(path, model.parameters())
    loaded = opt.tx.update.__self__  # the LearnedOptimizer whose update the torch optimizer runs
    assert isinstance(loaded, CoordinatewiseLSTM)
    X, Y, Xq, Yq = (x.float() for x in _data())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (f, d):
        for _ in range(3):
            d.step(_mse(f(X), Y))
        meta = _mse(f(Xq), Yq)
    grads = torch.autograd.grad(meta, list(loaded.parameters()) + list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads[: len(list(loaded.parameters()))]) > 0


@pytest.mark.parametrize("higher_present", [True, False])
def test_registration_happens_on_import_of_learnopt_optim_and_higher_stays_optional(higher_present):
    """A fresh interpreter: ``import learnopt.optim`` registers with higher when it is installed,
    and imports fine (without the higher support) when it is not."""
    import subprocess
    import sys

    hide = "" if higher_present else "import sys; sys.modules['higher'] = None\n"
    code = hide + (
        "import sys, learnopt.optim as lo\n"
        "loaded = 'learnopt.optim.higher_support' in sys.modules\n"
        "if loaded:\n"
        "    import higher.optim\n"
        "    assert higher.optim._opt_mapping[lo.TransformOptimizer].__name__ == 'DifferentiableTransformOptimizer'\n"
        "print('loaded' if loaded else 'absent')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("loaded" if higher_present else "absent")


def test_hessian_methods_get_hessian_vector_products_through_highers_gradients():
    """AdaHessian inside innerloop_ctx (hvp_fn built from higher's create_graph gradients) follows
    the functional AdaHessian given ``loss_fn`` (same seeded probes), and stays differentiable."""
    model = _model()
    X, Y, Xq, Yq = _data()
    opt = lo.as_torch_optimizer(lo.adahessian(lr=0.05), model.named_parameters())
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (f, d):
        traj = []
        for _ in range(3):
            d.step(_mse(f(X), Y))
            traj.append([p.detach().clone() for p in f.parameters()])
        meta = _mse(f(Xq), Yq)
    grads = torch.autograd.grad(meta, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and max(float(g.abs().max()) for g in grads) > 0

    def loss_fn(p):
        return _mse(torch.func.functional_call(model, p, (X,)), Y)

    tx = lo.adahessian(lr=0.05)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = tx.init(params)
    for step in traj:
        q = {k: v.requires_grad_(True) for k, v in {k: v.clone() for k, v in params.items()}.items()}
        g = dict(zip(q, torch.autograd.grad(loss_fn(q), list(q.values()))))
        updates, state = tx.update(g, state, params, loss_fn=loss_fn)
        params = lo.apply_updates(params, updates)
        for x, y in zip(step, params.values()):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
