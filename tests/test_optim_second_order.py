"""Tests of Muon, the Hessian-diagonal methods (AdaHessian, Sophia-H, Apollo) and L-BFGS.

References: ``torch.optim.Muon`` + ``torch.optim.AdamW`` (Muon), a transcription of Keller
Jordan's ``zeropower_via_newtonschulz5`` (written below), ``pytorch_optimizer.AdaHessian`` /
``SophiaH`` / ``ApolloDQN``, and ``torch.optim.LBFGS``; central finite differences for
hypergradients; per-instance runs for batching. All in float64.
"""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import pytorch_optimizer
import torch
from torch import nn

from learnopt import optim as lo
from optim_helpers import grads as _grads

lo_hessian = importlib.import_module("learnopt.optim.hessian")
lo_muon = importlib.import_module("learnopt.optim.muon")  # the package attribute `muon` is the factory

DT = torch.float64
RTOL, ATOL = 1e-9, 1e-12


# --------------------------------------------------------------------------- problems and runners


def _problem(seed: int = 0, scale: float = 1.0):
    """A smooth non-quadratic float64 problem with a wide matrix ``W``, a tall matrix ``T`` and a vector ``v``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 4, generator=g, dtype=DT) / 2
    b = torch.randn(6, 3, generator=g, dtype=DT)
    c = torch.randn(4, generator=g, dtype=DT)
    X = torch.randn(3, 2, generator=g, dtype=DT)
    Y = torch.randn(5, 2, generator=g, dtype=DT)

    def loss_fn(p):
        W, T, v = p["W"], p["T"], p["v"]  # W: [3, 4], T: [5, 3], v: [4]
        z = torch.tanh(A @ (W.T + v[:, None]) - b)
        u = torch.tanh(T @ X) - Y
        return scale * ((z**2).sum() + 0.1 * (W**4).sum() + 0.1 * ((v - c) ** 4).sum() + (u**2).sum()
                        + 0.05 * (T**4).sum())

    start = {"W": torch.randn(3, 4, generator=g, dtype=DT), "T": torch.randn(5, 3, generator=g, dtype=DT),
             "v": torch.randn(4, generator=g, dtype=DT)}
    return loss_fn, start


def _run(tx, loss_fn, start, steps, extra_fn=lambda params, t: {}, create_graph=False):
    params = {k: v.clone() for k, v in start.items()}
    state = tx.init(params)
    traj = []
    for t in range(steps):
        updates, state = tx.update(_grads(loss_fn, params, create_graph), state, params, **extra_fn(params, t))
        params = lo.apply_updates(params, updates)
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj, state


def _with_loss_fn(loss_fn):
    return lambda params, t: {"loss_fn": loss_fn}


def _run_reference(opt_cls, kwargs, loss_fn, start, steps, create_graph=False, seed=None, closure=False):
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = opt_cls(list(params.values()), **kwargs)
    if seed is not None:
        torch.manual_seed(seed)  # the reference draws its probes from the global generator
    traj = []

    def step_closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward(create_graph=create_graph)
        return loss

    for _ in range(steps):
        if closure:
            opt.step(step_closure)
        else:
            step_closure()
            opt.step()
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


def _assert_trajectories_close(ours, ref, start, rtol=RTOL, atol=ATOL, min_move=1e-2):
    assert len(ours) == len(ref) >= 20
    for t, (p, q) in enumerate(zip(ours, ref)):
        for k in start:
            torch.testing.assert_close(p[k], q[k], rtol=rtol, atol=atol, msg=lambda m: f"step {t + 1}, {k}: {m}")
    # Not vacuous: every tensor moved well beyond the tolerance, also over the last steps.
    for k in start:
        assert (ref[-1][k] - start[k]).abs().max() > min_move, k
    assert any((ref[-1][k] - ref[-6][k]).abs().max() > 1e3 * atol for k in start)


# --------------------------------------------------------------------------- Muon


def _keller_jordan_newtonschulz5(G, steps):
    """Keller Jordan's reference (github.com/KellerJordan/Muon, muon.py), transcribed with the
    bfloat16 cast left out so the comparison is exact in float64."""
    assert G.ndim >= 2
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.clone()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


@pytest.mark.parametrize("shape", [(3, 5), (6, 2), (4, 4), (2, 3, 5), (2, 7, 3)])
@pytest.mark.parametrize("steps", [1, 5])
def test_newton_schulz_matches_keller_jordan(shape, steps):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=DT)
    ours = lo.zeropower_via_newtonschulz5(G, steps)
    torch.testing.assert_close(ours, _keller_jordan_newtonschulz5(G, steps), rtol=1e-12, atol=1e-13)
    assert ours.shape == G.shape
    if steps == 5:  # roughly orthogonal: singular values in Keller Jordan's band around 1
        s = torch.linalg.svdvals(ours)
        assert bool(((s > 0.5) & (s < 1.5)).all()), s
    # Batched matrices are orthogonalised one by one.
    if len(shape) == 3:
        for i in range(shape[0]):
            torch.testing.assert_close(ours[i], lo.zeropower_via_newtonschulz5(G[i], steps), rtol=1e-12, atol=1e-13)


@pytest.fixture
def torch_muon_in_float64(monkeypatch):
    """torch.optim.Muon runs its Newton–Schulz iteration in bfloat16 (``grad.bfloat16()``); make that
    cast a copy so torch's own code runs in float64 and can be compared tightly."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())


MUON_CASES = [
    ("default", dict(lr=0.02, adamw_lr=0.01), dict()),
    ("no_nesterov_wd", dict(lr=0.03, momentum=0.9, nesterov=False, weight_decay=0.1, adamw_lr=0.02,
                            adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_weight_decay=0.05), dict()),
    ("ns3", dict(lr=0.02, ns_steps=3, adamw_lr=0.01), dict()),
]


def _torch_muon_reference(kw, loss_fn, start, steps):
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    matrices = [p for p in params.values() if p.dim() == 2]
    rest = [p for p in params.values() if p.dim() != 2]
    opt_m = torch.optim.Muon(matrices, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0),
                             momentum=kw.get("momentum", 0.95), nesterov=kw.get("nesterov", True),
                             ns_steps=kw.get("ns_steps", 5), adjust_lr_fn="original")
    opt_a = torch.optim.AdamW(rest, lr=kw["adamw_lr"], betas=kw.get("adamw_betas", (0.9, 0.95)),
                              eps=kw.get("adamw_eps", 1e-8), weight_decay=kw.get("adamw_weight_decay", 0.0))
    traj = []
    for _ in range(steps):
        opt_m.zero_grad()
        opt_a.zero_grad()
        loss_fn(params).backward()
        opt_m.step()
        opt_a.step()
        traj.append({k: v.detach().clone() for k, v in params.items()})
    return traj


@pytest.mark.parametrize("name,kw,_", MUON_CASES, ids=[c[0] for c in MUON_CASES])
def test_muon_trajectory_matches_torch_muon_and_adamw(name, kw, _, torch_muon_in_float64):
    # The loss is scaled by 1e8: Muon's and Adam's updates do not depend on the gradient's scale,
    # and at this scale torch's `norm.clamp(min=1e-7)` and Keller Jordan's `norm + 1e-7` (ours)
    # differ by ~1e-15 relative instead of ~1e-7.
    loss_fn, start = _problem(seed=1, scale=1e8)
    ours, _ = _run(lo.muon(**kw), loss_fn, start, 25)
    ref = _torch_muon_reference(kw, loss_fn, start, 25)
    _assert_trajectories_close(ours, ref, start)


def test_muon_trajectory_matches_pytorch_optimizer_muon(monkeypatch):
    """A second reference: pytorch_optimizer.Muon (use_muon groups; its AdamW half is torch's AdamW
    too). Its Newton–Schulz runs in bfloat16 by default: the ``dtype`` argument is set to float64;
    the loss is scaled by 1e8 for the same reason as above (it clamps the norm at eps)."""
    from pytorch_optimizer.optimizer.muon import base as po_muon_base

    original = po_muon_base.zero_power_via_newton_schulz_5
    monkeypatch.setattr(po_muon_base, "zero_power_via_newton_schulz_5",
                        lambda g, **kw: original(g, **{**kw, "dtype": torch.float64}))
    loss_fn, start = _problem(seed=1, scale=1e8)
    kw = dict(lr=0.03, momentum=0.9, weight_decay=0.1, adamw_lr=0.02, adamw_betas=(0.8, 0.9), adamw_eps=1e-6,
              adamw_weight_decay=0.05)
    ours, _ = _run(lo.muon(**kw), loss_fn, start, 25)
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = pytorch_optimizer.Muon([
        dict(params=[params["W"], params["T"]], use_muon=True, lr=0.03, momentum=0.9, weight_decay=0.1),
        dict(params=[params["v"]], use_muon=False, lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05),
    ])
    ref = []
    for _ in range(25):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
        ref.append({k: v.detach().clone() for k, v in params.items()})
    _assert_trajectories_close(ours, ref, start)


def test_muon_scaling_and_routing():
    """Tall matrices are scaled by sqrt(rows / cols) (Keller Jordan), wide ones by 1; vectors go to AdamW;
    ``is_matrix`` can send a matrix to AdamW."""
    params = {"wide": torch.zeros(2, 6, dtype=DT), "tall": torch.zeros(8, 2, dtype=DT),
              "bias": torch.zeros(3, dtype=DT)}
    g = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in params.items()}
    tx = lo.muon(lr=1.0, momentum=0.0, nesterov=False, adamw_lr=1.0)
    u, _ = tx.update(grads, tx.init(params), params)
    for k, ratio in (("wide", 1.0), ("tall", 2.0)):
        o = lo.zeropower_via_newtonschulz5(grads[k])
        torch.testing.assert_close(u[k], -ratio * o, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(u["bias"], -grads["bias"] / (grads["bias"].abs() + 1e-8), rtol=1e-12, atol=1e-14)
    tx = lo.muon(lr=1.0, momentum=0.0, nesterov=False, adamw_lr=1.0, is_matrix=lambda n, x: n == "wide")
    u2, _ = tx.update(grads, tx.init(params), params)
    torch.testing.assert_close(u2["wide"], u["wide"])
    torch.testing.assert_close(u2["tall"], -grads["tall"] / (grads["tall"].abs() + 1e-8), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="matrices"):
        lo.scale_by_muon().update({"b": grads["bias"]}, lo.scale_by_muon().init({"b": params["bias"]}))


# --------------------------------------------------------------------------- AdaHessian, Sophia-H, Apollo

HESSIAN_CASES = [
    ("adahessian", lo.adahessian, dict(lr=0.05, seed=3), pytorch_optimizer.AdaHessian, dict(lr=0.05)),
    ("adahessian_period_samples_wd", lo.adahessian,
     dict(lr=0.05, betas=(0.8, 0.95), update_period=3, num_samples=2, weight_decay=0.1, eps=1e-8, seed=4),
     pytorch_optimizer.AdaHessian,
     dict(lr=0.05, betas=(0.8, 0.95), update_period=3, num_samples=2, weight_decay=0.1, eps=1e-8)),
    ("adahessian_power_l2_gaussian", lo.adahessian,
     dict(lr=0.02, hessian_power=0.5, weight_decay=0.05, weight_decouple=False, hessian_distribution="gaussian",
          seed=5),
     pytorch_optimizer.AdaHessian,
     dict(lr=0.02, hessian_power=0.5, weight_decay=0.05, weight_decouple=False, hessian_distribution="gaussian")),
    ("sophia", lo.sophia, dict(lr=0.5, p=0.05, update_period=3, seed=6),
     pytorch_optimizer.SophiaH, dict(lr=0.5, p=0.05, update_period=3)),
    ("sophia_rademacher_wd", lo.sophia,
     dict(lr=0.3, betas=(0.9, 0.95), p=0.1, update_period=2, num_samples=2, weight_decay=0.2, fixed_decay=True,
          hessian_distribution="rademacher", eps=1e-6, seed=7),
     pytorch_optimizer.SophiaH,
     dict(lr=0.3, betas=(0.9, 0.95), p=0.1, update_period=2, num_samples=2, weight_decay=0.2, fixed_decay=True,
          hessian_distribution="rademacher", eps=1e-6)),
]


@pytest.mark.parametrize("name,factory,kw,ref_cls,ref_kw", HESSIAN_CASES, ids=[c[0] for c in HESSIAN_CASES])
def test_hessian_methods_match_pytorch_optimizer(name, factory, kw, ref_cls, ref_kw):
    """Same probes on both sides: our generator seeded with ``seed`` draws what the reference draws
    after ``torch.manual_seed(seed)``."""
    loss_fn, start = _problem(seed=2)
    ours, _ = _run(factory(**kw), loss_fn, start, 25, _with_loss_fn(loss_fn))
    ref = _run_reference(ref_cls, ref_kw, loss_fn, start, 25, create_graph=True, seed=kw["seed"])
    _assert_trajectories_close(ours, ref, start)


def test_probes_come_from_the_seed():
    """Another seed gives other probes, hence another trajectory (the test above could fail); given
    probes override the generator and leave its state untouched."""
    loss_fn, start = _problem(seed=2)
    a, _ = _run(lo.adahessian(lr=0.05, seed=3), loss_fn, start, 3, _with_loss_fn(loss_fn))
    b, _ = _run(lo.adahessian(lr=0.05, seed=4), loss_fn, start, 3, _with_loss_fn(loss_fn))
    assert not torch.allclose(a[-1]["W"], b[-1]["W"])
    tx = lo.adahessian(lr=0.05, seed=3)
    state = tx.init(start)
    probes = {k: torch.ones_like(p) for k, p in start.items()}
    _, s1 = tx.update(_grads(loss_fn, start), state, start, loss_fn=loss_fn, probes=probes)
    assert torch.equal(s1.rng, state.rng)
    _, s2 = tx.update(_grads(loss_fn, start), state, start, loss_fn=loss_fn)
    assert not torch.equal(s2.rng, state.rng)
    with pytest.raises(lo.MissingExtraArgument, match="hvp_fn"):
        tx.update(_grads(loss_fn, start), state, start)


# Apollo's default rebound divides by |B| clamped at 0.01, i.e. steps of ~100 x the gradient: at
# lr 0.05 on this problem 1-ulp differences of operation order (fused multiply-adds) grow ~2x per
# step and pass 1e-9 by step 20; at lr 0.01 (parameters still move by ~2) they stay below 1e-13.
APOLLO_CASES = [
    ("apollo", dict(lr=0.01, warmup_steps=5)),
    ("apollo_belief_decoupled", dict(lr=0.05, init_lr=1e-3, beta=0.8, rebound="belief", weight_decay=0.1,
                                     weight_decay_type="decoupled", warmup_steps=8, eps=1e-3)),
    ("apollo_stable", dict(lr=0.01, weight_decay=0.05, weight_decay_type="stable", warmup_steps=3)),
    ("apollo_l2", dict(lr=0.03, weight_decay=0.1, weight_decay_type="l2", warmup_steps=30)),
]


@pytest.mark.parametrize("name,kw", APOLLO_CASES, ids=[c[0] for c in APOLLO_CASES])
def test_apollo_matches_pytorch_optimizer(name, kw):
    loss_fn, start = _problem(seed=3)
    ours, _ = _run(lo.apollo(**kw), loss_fn, start, 25)
    ref = _run_reference(pytorch_optimizer.ApolloDQN, kw, loss_fn, start, 25)
    _assert_trajectories_close(ours, ref, start)


# --------------------------------------------------------------------------- L-BFGS

# Chosen so that every branch of the line search runs: zooms (short max_eval, large lr),
# extrapolations (small lr), exhausted searches (max_eval == 1), and history wrap-around. Near an
# ill-conditioned optimum, 1-ulp differences of summation order grow (L-BFGS amplifies them along
# flat directions), so the runs stop short of full convergence; differences stay below 1e-11.
LBFGS_CASES = [
    ("fixed_step", dict(lr=0.1, max_iter=1, history_size=5), 3),
    ("fixed_step_inner_iters", dict(lr=0.05, max_iter=3, history_size=4), 3),
    ("strong_wolfe", dict(lr=1.0, max_iter=2, history_size=5, line_search_fn="strong_wolfe"), 3),
    ("strong_wolfe_zoom", dict(lr=2.0, max_iter=2, max_eval=4, history_size=2, line_search_fn="strong_wolfe"), 3),
    ("strong_wolfe_max_eval", dict(lr=1.0, max_iter=2, max_eval=3, history_size=2, line_search_fn="strong_wolfe"),
     3),
    ("strong_wolfe_extrapolate", dict(lr=0.02, max_iter=2, max_eval=10, history_size=5,
                                      line_search_fn="strong_wolfe"), 3),
    ("strong_wolfe_exhausted", dict(lr=0.5, max_iter=1, history_size=10, line_search_fn="strong_wolfe"), 1),
]


@pytest.mark.parametrize("name,kw,seed", LBFGS_CASES, ids=[c[0] for c in LBFGS_CASES])
def test_lbfgs_matches_torch_lbfgs(name, kw, seed):
    """One ``update`` is one ``torch.optim.LBFGS.step``: same history, two-loop recursion, first-step
    scaling, stopping rules and strong-Wolfe line search."""
    loss_fn, start = _problem(seed=seed)
    ours, _ = _run(lo.lbfgs(**kw), loss_fn, start, 25, _with_loss_fn(loss_fn))
    ref = _run_reference(torch.optim.LBFGS, kw, loss_fn, start, 25, closure=True)
    _assert_trajectories_close(ours, ref, start)


def test_strong_wolfe_matches_torch_line_search_for_every_instance():
    """The lock-step line search against ``torch.optim.lbfgs._strong_wolfe`` run instance by instance,
    on 72 instances in one batched call: 60 wavy 3-d objectives with initial steps from 1e-3 to 300
    and some short evaluation budgets (bracketing, extrapolation, zooms, swaps of the bracket ends,
    exhausted budgets), 8 lines that hit a narrow bump (cubic steps stuck at a bracket end, moved
    away for insufficient progress) and 4 plateaus reached with huge steps (trial points that fail
    the Armijo test yet become the bracket's low end)."""
    from torch.optim.lbfgs import _strong_wolfe as torch_strong_wolfe

    quasi_newton = importlib.import_module("learnopt.optim.quasi_newton")
    K, KB, KP = 60, 8, 4
    n = K + KB + KP
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 3, generator=g, dtype=DT)
    b = 3 * torch.rand(n, 3, generator=g, dtype=DT) + 0.5
    c = 0.05 + 0.3 * torch.rand(n, generator=g, dtype=DT)
    x0 = torch.randn(n, 3, generator=g, dtype=DT)
    x0[K:] = 0
    t0 = torch.tensor([1e-3, 0.03, 0.3, 1.0, 3.0, 30.0, 300.0], dtype=DT)[torch.randint(0, 7, (n,), generator=g)]
    t0[K:K + KB] = 1.0
    t0[K + KB:] = torch.tensor([1e6, 1e5, 1e4, 1e4], dtype=DT)
    family = torch.zeros(n, dtype=torch.long)
    family[K:K + KB], family[K + KB:] = 1, 2
    height = torch.ones(n, dtype=DT)
    width = torch.ones(n, dtype=DT)
    height[K:K + KB] = torch.linspace(5, 80, KB, dtype=DT)
    width[K:K + KB] = torch.linspace(1e-3, 3e-2, KB, dtype=DT)
    tau = torch.ones(n, dtype=DT)
    tau[K + KB:] = torch.tensor([1.0, 1.0, 0.1, 0.3], dtype=DT)
    max_ls = torch.full((n,), 25)
    max_ls[:K:5], max_ls[1:K:7] = 3, 1

    def f(x, i=slice(None)):
        wavy = (a[i] * torch.sin(b[i] * x)).sum(-1) + c[i] * (x**2).sum(-1) + 0.01 * (x**4).sum(-1)
        rest = 0.5 * (x[..., 1:] ** 2).sum(-1)
        bump = -x[..., 0] + height[i] * torch.exp(-((x[..., 0] - 1) ** 2) / width[i]) + rest
        plateau = -tau[i] * (1 - torch.exp(-x[..., 0] / tau[i])) + 1e-9 * x[..., 0] ** 2 + rest
        fam = family[i]
        return torch.where(fam == 0, wavy, torch.where(fam == 1, bump, plateau))

    def value_and_grad(p):
        x = p["x"].detach().requires_grad_(True)
        loss = f(x)
        return loss.detach(), {"x": torch.autograd.grad(loss.sum(), x)[0]}

    f0, g0 = value_and_grad({"x": x0})
    d = {"x": -g0["x"]}
    trees = quasi_newton._Trees({"x": x0}, 1)
    gtd = trees.dot(g0, d)
    f_new, g_new, t, evals = quasi_newton._strong_wolfe(trees, value_and_grad, {"x": x0}, t0, d, f0, g0, gtd, max_ls,
                                                        torch.ones(n, dtype=torch.bool))
    for i in range(n):
        def obj(x, step, direction, i=i):
            y = (x + step * direction).requires_grad_(True)
            loss = f(y, i)
            return float(loss), torch.autograd.grad(loss, y)[0]

        ref = torch_strong_wolfe(obj, x0[i], float(t0[i]), d["x"][i], float(f0[i]), g0["x"][i], gtd[i],
                                 max_ls=int(max_ls[i]))
        assert int(evals[i]) == ref[3], i
        torch.testing.assert_close(t[i], torch.as_tensor(ref[2], dtype=DT), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(f_new[i], torch.as_tensor(ref[0], dtype=DT), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_new["x"][i], ref[1], rtol=1e-10, atol=1e-12)
    assert len(set(evals.tolist())) >= 8  # many different paths


def test_lbfgs_counters_match_torch():
    loss_fn, start = _problem(seed=3)
    kw = dict(lr=2.0, max_iter=3, max_eval=5, history_size=3, line_search_fn="strong_wolfe")
    _, state = _run(lo.lbfgs(**kw), loss_fn, start, 8, _with_loss_fn(loss_fn))
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.LBFGS(list(params.values()), **kw)

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    for _ in range(8):
        opt.step(closure)
    ref = opt.state[opt._params[0]]
    assert int(state.n_iter) == ref["n_iter"] and int(state.func_evals) == ref["func_evals"]
    assert int(state.num_old) == len(ref["old_dirs"]) == 3
    torch.testing.assert_close(state.H_diag, torch.as_tensor(ref["H_diag"], dtype=DT), rtol=1e-9, atol=0)
    torch.testing.assert_close(state.ro, torch.stack([torch.as_tensor(r, dtype=DT) for r in ref["ro"]]), rtol=1e-9,
                               atol=0)


def test_lbfgs_needs_an_objective_only_when_it_evaluates():
    loss_fn, start = _problem()
    grads = _grads(loss_fn, start)
    tx = lo.lbfgs(lr=0.1, max_iter=1)
    tx.update(grads, tx.init(start), start)  # no closure needed: a single iteration uses the given gradient
    for kw in (dict(max_iter=2), dict(max_iter=1, line_search_fn="strong_wolfe")):
        tx = lo.lbfgs(**kw)
        with pytest.raises(lo.MissingExtraArgument, match="value_and_grad_fn"):
            tx.update(grads, tx.init(start), start)
    with pytest.raises(ValueError):
        lo.lbfgs(line_search_fn="backtracking")


# --------------------------------------------------------------------------- convergence

CONVERGENCE_CASES = [
    ("muon", lambda: lo.muon(lr=0.01, adamw_lr=0.05), 600, 2e-3),
    ("adahessian", lambda: lo.adahessian(lr=0.3), 300, 1e-8),
    ("sophia", lambda: lo.sophia(lr=1.0, p=0.05, update_period=2), 600, 1e-8),
    ("apollo", lambda: lo.apollo(lr=0.01, warmup_steps=10), 600, 1e-8),
    # torch's tolerances stop L-BFGS once g.d > -tolerance_change, i.e. at a gap ~ tolerance_change / 2
    ("lbfgs", lambda: lo.lbfgs(lr=1.0, max_iter=1, tolerance_change=1e-14), 60, 1e-10),
    ("lbfgs_strong_wolfe", lambda: lo.lbfgs(max_iter=5, line_search_fn="strong_wolfe", tolerance_change=1e-14), 10,
     1e-10),
]


@pytest.mark.parametrize("name,make_tx,steps,tol", CONVERGENCE_CASES, ids=[c[0] for c in CONVERGENCE_CASES])
def test_converges_on_convex_quadratic(name, make_tx, steps, tol):
    """``||A W - B||^2`` (W a 5x3 matrix, for Muon) plus a vector term, with its closed-form optimum.
    Muon's orthogonalised steps keep a size ~lr, so with a constant lr it only reaches an O(lr)
    neighbourhood, hence its looser tolerance."""
    g = torch.Generator().manual_seed(6)
    A = torch.eye(5, dtype=DT).repeat(2, 1) + 0.1 * torch.randn(10, 5, generator=g, dtype=DT)
    B = torch.randn(10, 3, generator=g, dtype=DT)
    b = torch.randn(10, generator=g, dtype=DT)
    W_star = torch.linalg.lstsq(A, B).solution
    x_star = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)

    def loss_fn(p):
        return ((A @ p["W"] - B) ** 2).sum() + ((A @ p["x"] - b) ** 2).sum()

    f_star = loss_fn({"W": W_star, "x": x_star})
    start = {"W": torch.zeros(5, 3, dtype=DT), "x": torch.zeros(5, dtype=DT)}
    assert loss_fn(start) - f_star > 1.0
    traj, _ = _run(make_tx(), loss_fn, start, steps, _with_loss_fn(loss_fn))
    gap = (loss_fn(traj[-1]) - f_star).item()
    assert 0 <= gap < tol, gap


# --------------------------------------------------------------------------- batched == per instance


def _batched_problem(B=3):
    g = torch.Generator().manual_seed(11)
    scales = torch.tensor([1.0, 10.0, 0.1], dtype=DT)[:B]  # very different gradient magnitudes
    Ms = torch.randn(B, 4, 3, generator=g, dtype=DT)
    ts = torch.randn(B, 4, generator=g, dtype=DT)

    def per_instance(params, i):
        W, v = params["W"], params["v"]  # W: [5, 3], v: [3]
        r = torch.tanh(Ms[i] @ W.T) + v[:3, None].T @ torch.ones(3, 5, dtype=DT)[:, :5]
        return scales[i] * ((r - ts[i][:, None]) ** 2).sum() + 0.1 * (W**4).sum() + ((v - 0.5) ** 4).sum()

    def batched(params):
        return torch.stack([per_instance({k: p[i] for k, p in params.items()}, i) for i in range(B)])

    start = {"W": torch.randn(B, 5, 3, generator=g, dtype=DT), "v": torch.randn(B, 3, generator=g, dtype=DT)}
    return per_instance, batched, start


BATCH_CASES = [
    ("muon", lambda bd: lo.muon(lr=0.05, adamw_lr=0.02, batch_dims=bd)),
    ("adahessian", lambda bd: lo.adahessian(lr=0.05, update_period=2)),
    ("sophia", lambda bd: lo.sophia(lr=0.3, p=0.05, update_period=2)),
    ("apollo", lambda bd: lo.apollo(lr=0.05, warmup_steps=5, rebound="belief", weight_decay=0.1,
                                    weight_decay_type="stable", batch_dims=bd)),
    ("lbfgs", lambda bd: lo.lbfgs(lr=0.2, max_iter=3, history_size=3, batch_dims=bd)),
    ("lbfgs_strong_wolfe", lambda bd: lo.lbfgs(max_iter=3, history_size=3, line_search_fn="strong_wolfe",
                                               batch_dims=bd)),
]


@pytest.mark.parametrize("name,make_tx", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batched_instances_match_individual_runs(name, make_tx):
    """Instances with different scales (so L-BFGS's line searches take different paths and stop at
    different times) optimised together equal the same instances optimised one by one. The Hessian
    methods get the same probes, given through the ``probes`` extra."""
    B, steps = 3, 12
    per_instance, batched, start = _batched_problem(B)
    gen = torch.Generator().manual_seed(12)
    probes = [{k: torch.randint(0, 2, p.shape, generator=gen, dtype=DT) * 2 - 1 for k, p in start.items()}
              for _ in range(steps)]

    def batched_extra(params, t):
        return {"loss_fn": batched, "probes": probes[t]}

    def single_extra(i):
        return lambda params, t: {"loss_fn": lambda p: per_instance(p, i),
                                  "probes": {k: z[i] for k, z in probes[t].items()}}

    def summed(p):  # the gradient of the sum is each instance's own
        return batched(p).sum()

    together, _ = _run(make_tx(1), summed, start, steps, batched_extra)
    for i in range(B):
        alone, _ = _run(make_tx(0), lambda p: per_instance(p, i), {k: v[i] for k, v in start.items()}, steps,
                        single_extra(i))
        for t in range(steps):
            for k in start:
                torch.testing.assert_close(together[t][k][i], alone[t][k], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"instance {i}, step {t + 1}, {k}: {m}")
    assert all((together[-1][k] - start[k]).abs().amax(dim=tuple(range(1, start[k].dim()))).min() > 1e-3
               for k in start)


def test_lbfgs_batched_needs_per_instance_losses():
    _, batched, start = _batched_problem()
    tx = lo.lbfgs(max_iter=2, batch_dims=1)
    grads = _grads(lambda p: batched(p).sum(), start)
    with pytest.raises(ValueError, match="per-instance losses"):
        tx.update(grads, tx.init(start), start, value_and_grad_fn=lambda p: (batched(p).sum(), grads))


# --------------------------------------------------------------------------- hypergradients


def _differentiable_value_and_grad(loss_fn):
    def value_and_grad(params):
        if not any(p.requires_grad for p in params.values()):
            params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        loss = loss_fn(params)
        return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))

    return value_and_grad


def _differentiable_hvp(loss_fn):
    return lambda params, t: {"hvp_fn": lambda v: lo.hessian_vector_product(loss_fn, params, v, create_graph=True)}


HYPER_CASES = [
    ("muon", lambda lr: lo.muon(lr=lr, adamw_lr=0.01), 0.02, None),
    ("muon_adamw_lr", lambda lr: lo.muon(lr=0.02, adamw_lr=lr, weight_decay=0.1), 0.01, None),
    ("adahessian", lambda lr: lo.adahessian(lr=lr, update_period=2), 0.05, "hvp"),
    ("sophia", lambda lr: lo.sophia(lr=lr, p=0.05, update_period=2), 0.3, "hvp"),
    ("apollo", lambda lr: lo.apollo(lr=lr, warmup_steps=3, rebound="belief"), 0.05, None),
    ("lbfgs", lambda lr: lo.lbfgs(lr=lr, max_iter=1, history_size=3), 0.05, None),
    ("lbfgs_inner_iterations", lambda lr: lo.lbfgs(lr=lr, max_iter=3, history_size=3), 0.05, "value_and_grad"),
]
# Not here: lbfgs with line_search_fn="strong_wolfe" (the line search's choice of t is piecewise and
# not differentiated), and Muon's / Sophia's non-learning-rate hyperparameters.


def _unrolled_loss(make_tx, lr, loss_fn, start, extra_kind, steps=5):
    params = {k: v.clone() for k, v in start.items()}
    create_graph = isinstance(lr, torch.Tensor) and lr.requires_grad
    if create_graph:
        params = {k: v.requires_grad_(True) for k, v in params.items()}
    tx = make_tx(lr)
    state = tx.init(params)
    for t in range(steps):
        extra = {}
        if extra_kind == "hvp":
            extra = _differentiable_hvp(loss_fn)(params, t)
        elif extra_kind == "value_and_grad":
            extra = {"value_and_grad_fn": _differentiable_value_and_grad(loss_fn)}
        updates, state = tx.update(_grads(loss_fn, params, create_graph), state, params, **extra)
        params = lo.apply_updates(params, updates)
    return loss_fn(params)


@pytest.mark.parametrize("name,make_tx,lr0,extra_kind", HYPER_CASES, ids=[c[0] for c in HYPER_CASES])
def test_hypergradient_wrt_lr_matches_finite_difference(name, make_tx, lr0, extra_kind):
    loss_fn, start = _problem(seed=4)
    lr = torch.tensor(lr0, dtype=DT, requires_grad=True)
    (hyper,) = torch.autograd.grad(_unrolled_loss(make_tx, lr, loss_fn, start, extra_kind), lr)
    h = 1e-6
    lp = _unrolled_loss(make_tx, torch.tensor(lr0 + h, dtype=DT), loss_fn, start, extra_kind).detach()
    lm = _unrolled_loss(make_tx, torch.tensor(lr0 - h, dtype=DT), loss_fn, start, extra_kind).detach()
    fd = (lp - lm) / (2 * h)
    assert abs(fd.item()) > 1e-2
    torch.testing.assert_close(hyper, fd, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- double backward at zero gradient


def _zero_grad_loss(p):
    # x[2] == 0 gives g_x[2] == 0; x[3] == 0 gives the matrix M a zero gradient 2 M x[3] that still depends on x.
    x, M = p["x"], p["M"]
    return (x[:3] ** 2).sum() + x[0] ** 3 * x[1] + x[3] * (M**2).sum() + x[3] ** 2


ZERO_GRAD_CASES = [
    ("muon", lambda: lo.muon(lr=0.1, adamw_lr=0.1), None),
    ("adahessian", lambda: lo.adahessian(lr=0.1), "hvp"),
    ("sophia", lambda: lo.sophia(lr=0.1, update_period=1), "hvp"),
    ("apollo", lambda: lo.apollo(lr=0.1, warmup_steps=2), None),
    ("lbfgs", lambda: lo.lbfgs(lr=0.1, max_iter=1), None),
]


def _double_backward_at_zero_grad(make_tx, extra_kind, steps=3):
    x = torch.tensor([1.0, -2.0, 0.0, 0.0], dtype=DT, requires_grad=True)
    M = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=DT, requires_grad=True)
    lr = torch.tensor(0.5, dtype=DT, requires_grad=True)
    params = {"x": x, "M": M}
    tx = make_tx()
    state = tx.init(params)
    total = 0.0
    for t in range(steps):
        grads = _grads(_zero_grad_loss, params, create_graph=True)
        if t == 0:
            assert grads["x"][2] == 0 and bool((grads["M"] == 0).all())
        extra = {}
        if extra_kind == "hvp":
            # probes with zeros make a zero Hessian-diagonal estimate (what an unused coordinate gives)
            extra = _differentiable_hvp(_zero_grad_loss)(params, t)
            extra["probes"] = {"x": torch.tensor([1.0, -1.0, 0.0, 1.0], dtype=DT), "M": torch.zeros(2, 3, dtype=DT)}
        updates, state = tx.update(grads, state, params, **extra)
        updates = {k: lr * u for k, u in updates.items()}
        total = total + sum(u.sum() for u in updates.values())
        params = lo.apply_updates(params, updates)
    final = _zero_grad_loss(params) + total
    first = torch.autograd.grad(final, [x, M, lr], create_graph=True)
    second = torch.autograd.grad(sum(f.sum() for f in first), [x, M, lr], allow_unused=True)
    return [t for t in (*first, *second) if t is not None]


@pytest.mark.parametrize("name,make_tx,extra_kind", ZERO_GRAD_CASES, ids=[c[0] for c in ZERO_GRAD_CASES])
def test_no_nan_in_double_backward_at_zero_gradient(name, make_tx, extra_kind):
    for t in _double_backward_at_zero_grad(make_tx, extra_kind):
        assert torch.isfinite(t).all(), t


@pytest.mark.parametrize("module,attr,case", [
    (lo_muon, "safe_sqrt", "muon"), (lo_hessian, "safe_sqrt", "adahessian"), (lo_hessian, "_safe_pow", "apollo"),
])
def test_zero_gradient_check_detects_plain_roots(monkeypatch, module, attr, case):
    """Control for the test above: with plain roots the same computation gives NaN."""
    plain = torch.sqrt if attr == "safe_sqrt" else (lambda x, e: x**e)
    monkeypatch.setattr(module, attr, plain)
    _, make_tx, extra_kind = next(c for c in ZERO_GRAD_CASES if c[0] == case)
    assert any(not torch.isfinite(t).all() for t in _double_backward_at_zero_grad(make_tx, extra_kind))


# --------------------------------------------------------------------------- out of place

OUT_OF_PLACE_CASES = [
    ("muon", lambda: lo.muon(weight_decay=0.1)),
    ("adahessian", lambda: lo.adahessian(weight_decay=0.1)),
    ("sophia", lambda: lo.sophia(update_period=1)),
    ("apollo", lambda: lo.apollo(weight_decay=0.1, weight_decay_type="decoupled")),
    ("lbfgs", lambda: lo.lbfgs(lr=0.1, max_iter=3)),
    ("lbfgs_strong_wolfe", lambda: lo.lbfgs(max_iter=3, line_search_fn="strong_wolfe")),
]


@pytest.mark.parametrize("name,make_tx", OUT_OF_PLACE_CASES, ids=[c[0] for c in OUT_OF_PLACE_CASES])
def test_update_is_out_of_place(name, make_tx):
    loss_fn, start = _problem(seed=5)
    tx = make_tx()
    params = {k: v.clone() for k, v in start.items()}
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(_grads(loss_fn, params), state, params, loss_fn=loss_fn)
        params = lo.apply_updates(params, updates)
    grads = _grads(loss_fn, params)
    snap = [lo.tree_map(lambda x: x.clone(), t) for t in (grads, state, params)]
    updates, _ = tx.update(grads, state, params, loss_fn=loss_fn)
    for before, after in zip(snap, (grads, state, params)):
        for a, b in zip(lo.tree_leaves(before), lo.tree_leaves(after), strict=True):
            assert torch.equal(a, b)
    assert all(u.abs().max() > 0 for u in updates.values())


# --------------------------------------------------------------------------- as_torch_optimizer


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)


def _model(seed=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def _model_loss(model, X, Y):
    return ((model(X) - Y) ** 2).mean() + 0.01 * sum((p**4).sum() for p in model.parameters())


def _closure(opt, model, X, Y, create_graph=False):
    def closure():
        opt.zero_grad()
        loss = _model_loss(model, X, Y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


@pytest.mark.parametrize("kw", [dict(lr=0.5, max_iter=3, history_size=4),
                                dict(lr=1.0, max_iter=4, history_size=5, line_search_fn="strong_wolfe")],
                         ids=["fixed_step", "strong_wolfe"])
def test_as_torch_optimizer_lbfgs_is_a_drop_in_for_torch_lbfgs(kw):
    X, Y = _data()
    m_ours = _model()
    m_ref = copy.deepcopy(m_ours)
    w0 = m_ref[0].weight.detach().clone()
    opt = lo.as_torch_optimizer(lo.lbfgs(**kw), m_ours.named_parameters())
    ref = torch.optim.LBFGS(m_ref.parameters(), **kw)
    for t in range(20):
        expected = _model_loss(m_ours, X, Y).detach()
        loss = opt.step(_closure(opt, m_ours, X, Y))
        ref_loss = ref.step(_closure(ref, m_ref, X, Y))
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-14, atol=0)  # the first evaluation's loss
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-9, atol=1e-12)
        for (n, p), q in zip(m_ours.named_parameters(), m_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda s: f"step {t + 1}, {n}: {s}")
    assert (m_ref[0].weight.detach() - w0).abs().max() > 1e-2
    ref_state = ref.state[ref._params[0]]
    assert int(opt.tx_state.func_evals) == ref_state["func_evals"]  # the same number of closure calls
    with pytest.raises(lo.MissingExtraArgument):
        opt.step()  # several inner iterations need the closure


def test_as_torch_optimizer_adahessian_with_create_graph():
    """``loss.backward(create_graph=True)`` gives the transform Hessian-vector products, as for
    ``pytorch_optimizer.AdaHessian``; the same seed gives the same probes."""
    X, Y = _data()
    m_ours = _model()
    m_ref = copy.deepcopy(m_ours)
    w0 = m_ref[0].weight.detach().clone()
    opt = lo.as_torch_optimizer(lo.adahessian(lr=0.05, update_period=2, seed=9), m_ours.parameters())
    ref = pytorch_optimizer.AdaHessian(m_ref.parameters(), lr=0.05, update_period=2)
    torch.manual_seed(9)
    for t in range(20):
        for o, m in ((opt, m_ours), (ref, m_ref)):
            o.zero_grad()
            _model_loss(m, X, Y).backward(create_graph=True)
            o.step()
        for p, q in zip(m_ours.parameters(), m_ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=lambda s: f"step {t + 1}: {s}")
    assert (m_ref[0].weight.detach() - w0).abs().max() > 1e-2
    opt.zero_grad()
    _model_loss(m_ours, X, Y).backward()  # no graph, no loss_fn: nothing to take H v from
    with pytest.raises(lo.MissingExtraArgument):
        opt.step()


def test_as_torch_optimizer_passes_extra_step_arguments():
    """``step(**extra)`` reaches the transform: here fixed probes, which make two optimizers with
    different seeds agree."""
    X, Y = _data()
    m1, m2 = _model(), _model()
    o1 = lo.as_torch_optimizer(lo.sophia(lr=0.3, update_period=1, seed=1), m1.parameters())
    o2 = lo.as_torch_optimizer(lo.sophia(lr=0.3, update_period=1, seed=2), m2.parameters())
    probes = {str(i): torch.ones_like(p) for i, p in enumerate(m1.parameters())}
    for _ in range(3):
        for o, m in ((o1, m1), (o2, m2)):
            o.step(_closure(o, m, X, Y, create_graph=True), probes=probes)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


SD_CASES = [
    ("muon", lambda: lo.muon(lr=0.05, adamw_lr=0.02), False, False),
    ("adahessian", lambda: lo.adahessian(lr=0.05, seed=2), True, False),
    ("sophia", lambda: lo.sophia(lr=0.3, update_period=2, seed=3), True, False),
    ("apollo", lambda: lo.apollo(lr=0.05, warmup_steps=4), False, False),
    ("lbfgs", lambda: lo.lbfgs(max_iter=2, history_size=3, line_search_fn="strong_wolfe"), False, True),
]


@pytest.mark.parametrize("name,make_tx,create_graph,closure", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_state_dict_round_trip(name, make_tx, create_graph, closure):
    """Saving and loading continues the same trajectory, probes included (the generator's state is
    in the optimizer state); a fresh optimizer does not."""
    X, Y = _data()

    def train(opt, model, steps):
        for _ in range(steps):
            c = _closure(opt, model, X, Y, create_graph)
            if closure:
                opt.step(c)
            else:
                c()
                opt.step()

    model = _model()
    opt = lo.as_torch_optimizer(make_tx(), model.named_parameters())
    train(opt, model, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    model2, model3 = copy.deepcopy(model), copy.deepcopy(model)
    opt2 = lo.as_torch_optimizer(make_tx(), model2.named_parameters())
    opt2.load_state_dict(loaded)
    opt3 = lo.as_torch_optimizer(make_tx(), model3.named_parameters())
    for o, m in ((opt, model), (opt2, model2), (opt3, model3)):
        train(o, m, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.allclose(model[0].weight, model3[0].weight, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- GPU (skipped without one)


def _device_problem(device):
    """Three instances (leading dimension) of a small non-quadratic problem, on ``device``."""
    g = torch.Generator().manual_seed(21)
    A = torch.randn(3, 5, 4, generator=g, dtype=DT).to(device)
    start = {"W": torch.randn(3, 4, 6, generator=g, dtype=DT).to(device),
             "v": torch.randn(3, 6, generator=g, dtype=DT).to(device)}

    def losses(p):  # per instance, shape [3]
        z = torch.tanh(A @ p["W"])
        return ((z**2).sum((1, 2)) - p["W"].sum((1, 2)) + 0.1 * (p["W"] ** 4).sum((1, 2))
                + ((p["v"] - 0.3) ** 4).sum(1) + (p["v"] * z.mean(1)).sum(1))

    return losses, start


DEVICE_CASES = {
    "muon": lambda: lo.muon(lr=0.05, adamw_lr=0.02, batch_dims=1),
    "adahessian": lambda: lo.adahessian(lr=0.05, seed=1),
    "sophia": lambda: lo.sophia(lr=0.3, update_period=2, seed=2),
    "apollo": lambda: lo.apollo(lr=0.01, warmup_steps=3, rebound="belief", batch_dims=1),
    "lbfgs_strong_wolfe": lambda: lo.lbfgs(max_iter=3, history_size=3, line_search_fn="strong_wolfe", batch_dims=1),
}


def _device_run(name, device, steps=10):
    losses, start = _device_problem(device)
    traj, _ = _run(DEVICE_CASES[name](), lambda p: losses(p).sum(), start, steps, lambda p, t: {"loss_fn": losses})
    return {k: v.cpu() for k, v in traj[-1].items()}


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(DEVICE_CASES))
def test_on_gpu_matches_cpu(name):
    """Same numbers on CUDA (probes are drawn on the CPU, so they are the same too)."""
    cpu, gpu = _device_run(name, "cpu"), _device_run(name, "cuda")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-9, atol=1e-11)


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_as_torch_optimizer_closures_and_create_graph_on_gpu():
    X, Y = (t.cuda() for t in _data())
    for make_tx, create_graph in ((lambda: lo.lbfgs(max_iter=3, line_search_fn="strong_wolfe"), False),
                                  (lambda: lo.adahessian(lr=0.05), True)):
        models = {dev: _model().to(dev) for dev in ("cpu", "cuda")}
        opts = {dev: lo.as_torch_optimizer(make_tx(), m.parameters()) for dev, m in models.items()}
        for _ in range(5):
            for dev in ("cpu", "cuda"):
                x, y = (X.cpu(), Y.cpu()) if dev == "cpu" else (X, Y)
                opts[dev].step(_closure(opts[dev], models[dev], x, y, create_graph))
        for p, q in zip(models["cpu"].parameters(), models["cuda"].parameters()):
            torch.testing.assert_close(q.cpu(), p.detach(), rtol=1e-9, atol=1e-11)


def test_muon_newton_schulz_in_bfloat16_matches_torch_muon_without_the_float64_patch():
    """``ns_dtype=torch.bfloat16``: the iteration runs in bfloat16 as in torch.optim.Muon itself
    (unpatched), with the same fused multiply-adds, so one step from the same point agrees to
    float32's rounding of the result, while the float32 iteration differs by bfloat16's precision."""
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    g = torch.randn(6, 4)
    ref = w.clone().requires_grad_(True)
    opt = torch.optim.Muon([ref], lr=0.1, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original")
    ref.grad = g.clone()
    opt.step()
    tx = lo.scale_by_muon(ns_dtype=torch.bfloat16)
    u, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
    ours = w - 0.1 * u["w"]
    assert u["w"].dtype == torch.float32
    torch.testing.assert_close(ours, ref.detach(), rtol=0, atol=1e-6)
    tx32 = lo.scale_by_muon()
    u32, _ = tx32.update({"w": g}, tx32.init({"w": w}), {"w": w})
    assert (u32["w"] - u["w"]).abs().max() > 1e-3  # the dtype option did change the arithmetic
