"""``learnopt.optim.registry``: the catalogue of hand-designed optimizers and its API.

The trajectory of every optimizer against its reference is tested in test_optim*.py; here:
every catalogued name resolves, the catalogue's claims hold (extras are documented keys,
tensor hyperparameters get gradients where it says so, ``batch_dims`` where it says so),
``get_optimizer`` refuses bad names clearly, ``make_torch_optimizer`` follows torch.optim, and
docs/optimizers.md is what ``scripts/optimizer_table.py`` writes.
"""

from __future__ import annotations

import inspect
import runpy
from pathlib import Path

import pytest
import torch

from learnopt import optim as lo
from learnopt.optim import registry
from learnopt.optim.extra import EXTRA_KEYS, MissingExtraArgument
from learnopt.optim.registry import (
    OPTIMIZERS,
    OptimizerNotAvailable,
    get_info,
    get_optimizer,
    make_torch_optimizer,
)

DT = torch.float64
ROOT = Path(__file__).resolve().parent.parent

EXPECTED = [
    "sgd", "momentum", "nesterov", "rprop", "quickprop", "sign_sgd", "adagrad", "adagrad_norm", "adadelta",
    "rmsprop", "adam", "adamw", "amsgrad", "nadam", "radam", "eadam", "adabelief", "lion", "lamb", "lookahead",
    "muon", "apollo", "adahessian", "sophia", "lbfgs", "newton", "stochastic_lbfgs", "svrg", "saga", "jacsketch",
]


def test_the_catalogue_lists_every_expected_optimizer_once():
    assert sorted(OPTIMIZERS) == sorted(EXPECTED)
    for name, info in OPTIMIZERS.items():
        assert info.name == name and info.source and info.reference
        for needed in info.extras:
            assert set(needed.split("|")) <= set(EXTRA_KEYS), (name, needed)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_catalogued_optimizer_resolves_to_its_learnopt_optim_factory(name):
    factory = get_optimizer(name)
    assert factory is getattr(lo, name)
    assert factory.__doc__ and len(factory.__doc__) > 40  # documented with its algorithm
    params = inspect.signature(factory).parameters
    if OPTIMIZERS[name].wraps:
        assert OPTIMIZERS[name].wraps in params
    else:
        assert "lr" in params


def test_unknown_names_get_suggestions():
    with pytest.raises(OptimizerNotAvailable, match="unknown optimizer 'adamw2'.*did you mean 'adamw'"):
        get_optimizer("adamw2")
    with pytest.raises(LookupError, match="unknown optimizer 'zzz'"):
        make_torch_optimizer("zzz", [torch.zeros(2, requires_grad=True)], lr=0.1)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 4, generator=g, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)

    def loss_fn(p):
        return (torch.tanh(A @ p["w"] - b) ** 2).sum() + 0.1 * (p["w"] ** 4).sum() + (p["m"] ** 2).sum()

    start = {"w": torch.randn(4, generator=g, dtype=DT), "m": torch.randn(3, 2, generator=g, dtype=DT)}
    return loss_fn, start


def test_make_torch_optimizer_follows_torch_optim():
    loss_fn, start = _problem()
    ours = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    ref = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = make_torch_optimizer("adam", ours.items(), lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    assert isinstance(opt, lo.TransformOptimizer) and opt.param_groups[0]["param_names"] == ["w", "m"]
    torch_opt = torch.optim.Adam(ref.values(), lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(10):
        for o, p in ((opt, ours), (torch_opt, ref)):
            o.zero_grad()
            loss_fn(p).backward()
            o.step()
        for k in start:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-12)
    assert (ours["w"] - start["w"]).abs().max() > 0.05
    # options of TransformOptimizer pass through
    opt = make_torch_optimizer("sgd", [torch.zeros(2, requires_grad=True)], lr=0.1, options={"check_finite": False})
    assert opt.check_finite is False


def test_make_for_a_wrapper_builds_it_around_a_named_inner_optimizer():
    loss_fn, start = _problem(1)
    info = get_info("lookahead")
    for inner, inner_tx in (("adam", lo.adam(lr=0.05)), ("momentum", lo.momentum(lr=0.05))):
        a, b = info.make(0.05, optimizer=inner, k=3), lo.lookahead(inner_tx, k=3)
        pa, pb = dict(start), dict(start)
        sa, sb = a.init(pa), b.init(pb)
        for _ in range(7):
            p = {k: v.detach().requires_grad_(True) for k, v in pa.items()}
            g = dict(zip(p, torch.autograd.grad(loss_fn(p), list(p.values()))))
            ua, sa = a.update(g, sa, pa)
            ub, sb = b.update(g, sb, pb)
            pa, pb = lo.apply_updates(pa, ua), lo.apply_updates(pb, ub)
            for k in start:
                torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
    default = info.make(0.05)  # adam inside by default
    assert isinstance(default, lo.GradientTransformation)


def _finite_sum_extras(params, loss_fn):
    """Every documented extra, for a 5-example finite sum whose examples are ``loss_fn / 5``."""
    n = 5

    def example_loss(p, i):
        return loss_fn(p) * (1 + 0.1 * i) / n

    def grad_at(p, fn):
        q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        return dict(zip(q, torch.autograd.grad(fn(q), list(q.values()))))

    def example_grads_fn(p, indices):
        per = [grad_at(p, lambda q, i=int(i): example_loss(q, i)) for i in indices]
        return {k: torch.stack([g[k] for g in per]) for k in p}

    def batch_grad_fn(p, indices):
        return {k: v.mean(0) for k, v in example_grads_fn(p, indices).items()}

    return dict(
        loss_fn=loss_fn,
        indices=torch.tensor([1, 3]),
        example_grads_fn=example_grads_fn,
        batch_grad_fn=batch_grad_fn,
        full_grad_fn=lambda p: batch_grad_fn(p, torch.arange(n)),
        num_examples=n,
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_catalogued_extras_are_needed_and_tensor_hyperparameters_get_gradients(name):
    info = OPTIMIZERS[name]
    loss_fn, start = _problem(2)
    lr = torch.tensor(0.01, dtype=DT, requires_grad=True)
    extras = _finite_sum_extras(start, loss_fn)
    sized = {"num_examples": extras["num_examples"]} if "num_examples" in info.parameters() else {}
    tx = info.make(lr, **sized)
    params = dict(start)
    state = tx.init(params)
    total = 0.0
    for step in range(3):
        grads = extras["batch_grad_fn"](params, extras["indices"])
        if info.extras and step == 0:  # (later steps may not need them: Sophia's Hessian period)
            with pytest.raises(MissingExtraArgument):
                tx.update(grads, state, params)
        updates, state = tx.update(grads, state, params, **extras)
        params = lo.apply_updates(params, updates)
        total = total + loss_fn(params)
    assert torch.isfinite(total)
    if info.differentiable_hyperparams:
        (g,) = torch.autograd.grad(total, [lr])
        assert torch.isfinite(g) and g.abs() > 0, (name, g)


def _catalogue_run(name, steps, params=None, state=None, lr=0.01):
    """``steps`` updates of catalogue entry ``name`` on ``_problem(2)`` with every extra; returns
    (params, state, tx)."""
    info = OPTIMIZERS[name]
    loss_fn, start = _problem(2)
    extras = _finite_sum_extras(start, loss_fn)
    sized = {"num_examples": extras["num_examples"]} if "num_examples" in info.parameters() else {}
    tx = info.make(lr, **sized)
    params = dict(start) if params is None else params
    state = tx.init(params) if state is None else state
    for _ in range(steps):
        grads = extras["batch_grad_fn"](params, extras["indices"])
        updates, state = tx.update(grads, state, params, **extras)
        params = lo.apply_updates(params, updates)
    return params, state, tx


@pytest.mark.parametrize("name", EXPECTED)
def test_every_catalogue_update_is_out_of_place(name):
    """``update`` changes none of its inputs (what lets autograd flow through an unroll)."""
    params, state, tx = _catalogue_run(name, 2)
    loss_fn, _ = _problem(2)
    extras = _finite_sum_extras(params, loss_fn)
    grads = extras["batch_grad_fn"](params, extras["indices"])
    before = [x.clone() for x in (*params.values(), *grads.values(), *lo.tree_leaves(state))
              if isinstance(x, torch.Tensor)]
    tx.update(grads, state, params, **extras)
    after = [x for x in (*params.values(), *grads.values(), *lo.tree_leaves(state)) if isinstance(x, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("name", EXPECTED)
def test_every_catalogue_state_survives_a_save_and_load(name):
    """Three steps, the state through ``torch.save`` / ``torch.load(weights_only=True)``, two
    more steps: the same as five steps without the round trip."""
    import io

    straight, _, _ = _catalogue_run(name, 5)
    params, state, _ = _catalogue_run(name, 3)
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    buf = io.BytesIO()
    torch.save(leaves, buf)
    buf.seek(0)
    loaded = torch.utils._pytree.tree_unflatten(torch.load(buf, weights_only=True), spec)
    resumed, _, _ = _catalogue_run(name, 2, params, loaded)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.parametrize("name", EXPECTED)
def test_every_catalogue_update_has_finite_second_derivatives_at_a_zero_gradient(name):
    """Differentiating through an update at a zero gradient (a converged coordinate, a dead
    unit) gives finite hypergradients: no 0/0 inside square roots or divisions."""
    info = OPTIMIZERS[name]
    if not info.differentiable_hyperparams:
        pytest.skip(f"{name}: hyperparameters are not differentiable (catalogue)")
    loss_fn, start = _problem(2)
    extras = _finite_sum_extras(start, loss_fn)
    lr = torch.tensor(0.01, dtype=DT, requires_grad=True)
    sized = {"num_examples": extras["num_examples"]} if "num_examples" in info.parameters() else {}
    tx = info.make(lr, **sized)
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    zero = {k: torch.zeros_like(v, requires_grad=True) for k, v in params.items()}
    updates, _ = tx.update(zero, tx.init(params), params, **extras)
    total = sum(u.sum() for u in updates.values()) + loss_fn(lo.apply_updates(params, updates))
    grads = torch.autograd.grad(total, [lr, *params.values(), *zero.values()], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("name", [n for n in EXPECTED if not OPTIMIZERS[n].extras])
def test_batched_make_with_batch_dims_equals_per_instance_runs(name):
    """What ``learnopt evaluate`` relies on: ``make(lr, batch_dims=1)`` where the factory takes it
    (nothing otherwise) optimises a batch of instances as each alone."""
    info = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(3)
    B = 3
    A = torch.randn(B, 5, 4, generator=g, dtype=DT)
    start = {"w": torch.randn(B, 4, generator=g, dtype=DT), "m": torch.randn(B, 4, 3, generator=g, dtype=DT)}

    def grads_of(p, A):
        r = torch.tanh(torch.einsum("...ij,...j->...i", A, p["w"]))
        return {"w": torch.einsum("...i,...ij->...j", r, A) + p["w"] ** 3,
                "m": p["m"] * (1 + p["m"].abs())}

    def run(params, A, batch_dims):
        kwargs = {"batch_dims": batch_dims} if info.takes_batch_dims else {}
        tx = info.make(0.01, **kwargs)
        state = tx.init(params)
        for _ in range(4):
            updates, state = tx.update(grads_of(params, A), state, params)
            params = lo.apply_updates(params, updates)
        return params

    together = run(start, A, 1)
    for i in range(B):
        alone = run({k: v[i] for k, v in start.items()}, A[i], 0)
        for k in start:
            torch.testing.assert_close(together[k][i], alone[k], rtol=1e-10, atol=1e-12)
    assert (together["w"] - start["w"]).abs().max() > 1e-5  # it moved (Adadelta starts slowly)


def test_docs_table_is_generated_from_the_catalogue():
    text = registry.markdown_table()
    for name, info in OPTIMIZERS.items():
        assert f"`{name}`" in text and info.source in text
    assert (ROOT / "docs" / "optimizers.md").read_text() == text, "run python scripts/optimizer_table.py"
    script = runpy.run_path(str(ROOT / "scripts" / "optimizer_table.py"))
    assert script["main"](["--check"]) == 0
