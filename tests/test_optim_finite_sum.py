"""Tests of the finite-sum methods: SVRG, SAGA, JacSketch and stochastic L-BFGS.

Problems (written here, n = 50 examples): least squares, whose optimum is closed-form, and
l2-regularised logistic regression (non-quadratic) with a weight vector and a bias. References:
separate transcriptions of the papers' algorithms below, in plain loops over examples on flat
vectors with closed-form per-example gradients and Hessians (no autograd, no library code);
central finite differences for hypergradients; per-instance runs for batching.
"""

from __future__ import annotations

import io

import pytest
import torch

from learnopt import optim as lo
from conftest import central_difference

DT = torch.float64
N, D = 50, 4


# --------------------------------------------------------------------------- problems


class LogisticRegression:
    """f_i(w, c) = log(1 + exp(-y_i (a_i.w + c))) + lam / 2 ||w||^2; params {"w": [D], "c": [1]}."""

    lam = 0.1

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(N, D, generator=g, dtype=DT)
        self.y = torch.where(self.A @ torch.randn(D, generator=g, dtype=DT)
                             + 0.5 * torch.randn(N, generator=g, dtype=DT) > 0, 1.0, -1.0).to(DT)
        self.start = {"w": torch.randn(D, generator=g, dtype=DT), "c": torch.randn(1, generator=g, dtype=DT)}

    # library oracles (vectorised, differentiable)
    def example_grads(self, p, idx):
        s = torch.sigmoid(-self.y[idx] * (self.A[idx] @ p["w"] + p["c"]))
        coef = -self.y[idx] * s
        return {"w": coef[:, None] * self.A[idx] + self.lam * p["w"], "c": coef[:, None]}

    def batch_grad(self, p, idx):
        return {k: v.mean(0) for k, v in self.example_grads(p, idx).items()}

    def full_grad(self, p):
        return self.batch_grad(p, torch.arange(N))

    def loss(self, idx):
        def loss_fn(p):
            z = self.y[idx] * (self.A[idx] @ p["w"] + p["c"])
            return torch.nn.functional.softplus(-z).mean() + self.lam / 2 * (p["w"] ** 2).sum()

        return loss_fn

    # reference side: flat theta = [w, c], one example at a time, closed form
    def grad_i(self, theta, i):
        a, y = self.A[i], self.y[i].item()
        s = 1.0 / (1.0 + torch.exp(y * (a @ theta[:D] + theta[D])))
        return torch.cat([-y * s * a + self.lam * theta[:D], (-y * s).reshape(1)])

    def hessian(self, theta, idx):
        H = torch.zeros(D + 1, D + 1, dtype=DT)
        for i in idx.tolist():
            a1 = torch.cat([self.A[i], torch.ones(1, dtype=DT)])
            s = torch.sigmoid(a1 @ theta)
            H += s * (1 - s) * torch.outer(a1, a1)
        H /= len(idx)
        H[:D, :D] += self.lam * torch.eye(D, dtype=DT)
        return H


class LeastSquares:
    """f_i(x) = (a_i.x - b_i)^2 / 2, x* = lstsq(A, b); instances (batch) have their own b."""

    def __init__(self, seed=0, instances=None):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(N, D, generator=g, dtype=DT)
        shape = (N,) if instances is None else (N, instances)
        self.b = torch.randn(shape, generator=g, dtype=DT)
        self.x_star = torch.linalg.lstsq(self.A, self.b if instances else self.b[:, None]).solution
        self.x_star = self.x_star.T if instances else self.x_star[:, 0]
        self.start = {"x": torch.zeros(self.x_star.shape, dtype=DT)}

    def residual(self, p, idx):  # [len(idx)] or [len(idx), B]
        return torch.einsum("nd,...d->n...", self.A[idx], p["x"]) - self.b[idx]

    def example_grads(self, p, idx):
        r = self.residual(p, idx)
        return {"x": r[..., None] * self.A[idx].reshape((len(idx),) + (1,) * (r.dim() - 1) + (D,))}

    def batch_grad(self, p, idx):
        return {"x": self.example_grads(p, idx)["x"].mean(0)}

    def full_grad(self, p):
        return self.batch_grad(p, torch.arange(N))

    def loss(self, idx):
        return lambda p: 0.5 * (self.residual(p, idx) ** 2).mean(0)  # per-instance losses when batched

    def extras(self):
        return dict(example_grads_fn=self.example_grads, batch_grad_fn=self.batch_grad, full_grad_fn=self.full_grad,
                    num_examples=N)


def _extras(problem):
    return dict(example_grads_fn=problem.example_grads, batch_grad_fn=problem.batch_grad,
                full_grad_fn=problem.full_grad, num_examples=N)


def _schedule(steps, batch=5, hessian_batch=20, seed=1):
    """The minibatches (without replacement) and Hessian subsamples of every step."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(N, generator=g)[:batch], torch.randperm(N, generator=g)[:hessian_batch])
            for _ in range(steps)]


def _run(tx, problem, steps, schedule=None, start=None, lr_params=False):
    schedule = schedule or _schedule(steps)
    params = {k: v.clone() for k, v in (start or problem.start).items()}
    if lr_params:
        params = {k: v.requires_grad_(True) for k, v in params.items()}
    state = tx.init(params)
    traj = []
    for idx, hidx in schedule[:steps]:
        grads = problem.batch_grad(params, idx)
        updates, state = tx.update(grads, state, params, indices=idx, loss_fn=problem.loss(hidx), **_extras(problem))
        params = lo.apply_updates(params, updates)
        traj.append(params)
    return traj, state


def _flat(p):
    return torch.cat([p["w"], p["c"]])


# --------------------------------------------------------------------------- reference transcriptions


def svrg_reference(prob, theta, lr, m, schedule):
    """Johnson & Zhang (2013), Procedure SVRG, option I, with minibatches."""
    out = []
    for t, (B, _) in enumerate(schedule):
        if t % m == 0:
            w_snap = theta.clone()
            mu = sum(prob.grad_i(w_snap, i) for i in range(N)) / N
        g = sum(prob.grad_i(theta, i) for i in B.tolist()) / len(B)
        g_snap = sum(prob.grad_i(w_snap, i) for i in B.tolist()) / len(B)
        theta = theta - lr * (g - g_snap + mu)
        out.append(theta)
    return out


def saga_reference(prob, theta, lr, schedule, table_init="full"):
    """Defazio et al. (2014), SAGA, with minibatches; phi_i^0 = x^0 (or a zero table)."""
    table = [prob.grad_i(theta, i) if table_init == "full" else torch.zeros_like(theta) for i in range(N)]
    out = []
    for B, _ in schedule:
        average = sum(table) / N
        new = {i: prob.grad_i(theta, i) for i in B.tolist()}
        theta = theta - lr * (sum(new[i] - table[i] for i in new) / len(B) + average)
        for i, g in new.items():
            table[i] = g
        out.append(theta)
    return out


def jacsketch_reference(prob, theta, lr, schedule, make_R, theta_s=None):
    """Gower, Richtarik & Bach (2018), JacSketch with W = I and S = I[:, B] R, literally with
    d x n matrices: g = J e / n + (theta_S / n) (grad F - J) Pi e, J <- J + (grad F - J) Pi."""
    J = torch.stack([prob.grad_i(theta, i) for i in range(N)], dim=1)  # d x n
    e = torch.ones(N, dtype=DT)
    out = []
    for B, _ in schedule:
        F = torch.stack([prob.grad_i(theta, i) for i in range(N)], dim=1)
        S = torch.eye(N, dtype=DT)[:, B] @ make_R(B)
        Pi = S @ torch.linalg.pinv(S.T @ S) @ S.T
        th = N / len(B) if theta_s is None else theta_s
        g = J @ e / N + th / N * (F - J) @ Pi @ e
        J = J + (F - J) @ Pi
        theta = theta - lr * g
        out.append(theta)
    return out


def slbfgs_reference(prob, theta, lr, m, L, M, schedule):
    """Moritz, Nishihara & Jordan (2016), Algorithm 1 (option I), as documented in
    learnopt.optim.stochastic_lbfgs.stochastic_lbfgs; explicit subsampled Hessians, textbook two-loop."""
    S_list, Y_list = [], []
    u_prev, acc = theta.clone(), torch.zeros_like(theta)
    out = []
    for c, (B, T) in enumerate(schedule):
        if c % m == 0:
            w_snap = theta.clone()
            mu = sum(prob.grad_i(w_snap, i) for i in range(N)) / N
        v = (sum(prob.grad_i(theta, i) for i in B.tolist())
             - sum(prob.grad_i(w_snap, i) for i in B.tolist())) / len(B) + mu
        if S_list:
            q, alphas = v.clone(), []
            for s, y in reversed(list(zip(S_list, Y_list))):
                a = (s @ q) / (s @ y)
                alphas.append(a)
                q = q - a * y
            r = q * (S_list[-1] @ Y_list[-1]) / (Y_list[-1] @ Y_list[-1])
            for (s, y), a in zip(zip(S_list, Y_list), reversed(alphas)):
                r = r + s * (a - (y @ r) / (s @ y))
            direction = r
        else:
            direction = v
        acc = acc + theta
        theta = theta - lr * direction
        if c % L == L - 1:
            u = acc / L
            s = u - u_prev
            y = prob.hessian(u, T) @ s
            if s @ y > 0:
                S_list.append(s)
                Y_list.append(y)
                if len(S_list) > M:
                    S_list.pop(0)
                    Y_list.pop(0)
            u_prev, acc = u, torch.zeros_like(theta)
        out.append(theta)
    return out


# --------------------------------------------------------------------------- trajectories vs references


def _random_R(B):
    """A sketch of rank |B| - 2 whose span contains 1 (so theta = n / |B| is unbiased)."""
    g = torch.Generator().manual_seed(int(B.sum()))
    return torch.cat([torch.ones(len(B), 1, dtype=DT), torch.randn(len(B), len(B) - 3, generator=g, dtype=DT)], 1)


TRAJECTORY_CASES = [
    ("svrg", lambda: lo.svrg(lr=0.5, epoch_length=7), lambda p, th, sch: svrg_reference(p, th, 0.5, 7, sch)),
    ("svrg_default_epoch", lambda: lo.svrg(lr=0.5), lambda p, th, sch: svrg_reference(p, th, 0.5, 2 * N // 5, sch)),
    ("saga", lambda: lo.saga(lr=0.5, num_examples=N), lambda p, th, sch: saga_reference(p, th, 0.5, sch)),
    ("saga_zero_table", lambda: lo.saga(lr=0.3, num_examples=N, table_init="zeros"),
     lambda p, th, sch: saga_reference(p, th, 0.3, sch, "zeros")),
    ("jacsketch_saga", lambda: lo.jacsketch(lr=0.5, num_examples=N),
     lambda p, th, sch: jacsketch_reference(p, th, 0.5, sch, lambda B: torch.eye(len(B), dtype=DT))),
    ("jacsketch_mean", lambda: lo.jacsketch(lr=0.5, num_examples=N, sketch="mean"),
     lambda p, th, sch: jacsketch_reference(p, th, 0.5, sch, lambda B: torch.ones(len(B), 1, dtype=DT))),
    ("jacsketch_random_sag", lambda: lo.jacsketch(lr=0.5, num_examples=N, sketch=_random_R, theta=1.0),
     lambda p, th, sch: jacsketch_reference(p, th, 0.5, sch, _random_R, theta_s=1.0)),
    ("stochastic_lbfgs", lambda: lo.stochastic_lbfgs(lr=0.3, history_size=3, hessian_period=3, epoch_length=8),
     lambda p, th, sch: slbfgs_reference(p, th, 0.3, 8, 3, 3, sch)),
]


@pytest.mark.parametrize("name,make_tx,reference", TRAJECTORY_CASES, ids=[c[0] for c in TRAJECTORY_CASES])
def test_trajectory_matches_transcription(name, make_tx, reference):
    prob = LogisticRegression()
    schedule = _schedule(25)
    ours, _ = _run(make_tx(), prob, 25, schedule)
    ref = reference(prob, _flat(prob.start), schedule)
    for t, (p, q) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(_flat(p), q, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {t + 1}: {m}")
    assert (ref[-1] - _flat(prob.start)).abs().max() > 0.1
    assert (ref[-1] - ref[-6]).abs().max() > 1e-4


def test_jacsketch_with_the_saga_sketch_is_saga():
    prob = LogisticRegression(seed=3)
    schedule = _schedule(30, batch=5, seed=4)
    for table_init in ("full", "zeros"):
        a, sa = _run(lo.saga(lr=0.4, num_examples=N, table_init=table_init), prob, 30, schedule)
        b, sb = _run(lo.jacsketch(lr=0.4, num_examples=N, sketch="saga", table_init=table_init), prob, 30, schedule)
        for p, q in zip(a, b):
            for k in p:
                assert torch.equal(p[k], q[k])
        for x, y in zip(lo.tree_leaves(sa), lo.tree_leaves(sb), strict=True):
            assert torch.equal(x, y)
    # ... and another sketch is another method (the check above could fail)
    c, _ = _run(lo.jacsketch(lr=0.4, num_examples=N, sketch="mean"), prob, 30, schedule)
    assert not torch.allclose(c[-1]["w"], a[-1]["w"])


# --------------------------------------------------------------------------- linear convergence


CONVERGENCE_CASES = [
    ("svrg", lambda: lo.svrg(lr=0.3), 600),
    ("saga", lambda: lo.saga(lr=0.2, num_examples=N), 600),
    ("jacsketch_saga", lambda: lo.jacsketch(lr=0.2, num_examples=N), 600),
    # less information per step
    ("jacsketch_random", lambda: lo.jacsketch(lr=0.2, num_examples=N, sketch=_random_R), 1200),
    ("stochastic_lbfgs", lambda: lo.stochastic_lbfgs(lr=0.2, hessian_period=5), 300),
]


@pytest.mark.parametrize("name,make_tx,steps", CONVERGENCE_CASES, ids=[c[0] for c in CONVERGENCE_CASES])
def test_linear_convergence_to_least_squares_optimum(name, make_tx, steps):
    """Constant step sizes, minibatches of 5 of 50 examples: the error to the closed-form optimum
    shrinks geometrically (each third of the run gains a factor > 30) down to 1e-8, which plain SGD
    with this step size cannot (its error stalls at the gradient-noise level)."""
    prob = LeastSquares()
    schedule = _schedule(steps, seed=2)
    traj, _ = _run(make_tx(), prob, steps, schedule)
    err = [(p["x"] - prob.x_star).norm().item() for p in traj]
    thirds = [err[steps // 3 - 1], err[2 * steps // 3 - 1], err[-1]]
    assert err[-1] < 1e-8, thirds
    assert thirds[1] < thirds[0] / 30 and (thirds[2] < thirds[1] / 30 or thirds[2] < 1e-13), thirds
    sgd, _ = _run(lo.sgd(lr=0.2), prob, steps, schedule)
    assert (sgd[-1]["x"] - prob.x_star).norm() > 1e-4


# --------------------------------------------------------------------------- batched == per instance


BATCH_CASES = [
    ("svrg", lambda bd: lo.svrg(lr=0.3, epoch_length=10)),
    ("saga", lambda bd: lo.saga(lr=0.2, num_examples=N)),
    ("jacsketch", lambda bd: lo.jacsketch(lr=0.2, num_examples=N, sketch=_random_R)),
    ("stochastic_lbfgs", lambda bd: lo.stochastic_lbfgs(lr=0.2, hessian_period=4, history_size=3, batch_dims=bd)),
]


@pytest.mark.parametrize("name,make_tx", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batched_instances_match_individual_runs(name, make_tx):
    """Three least-squares instances (their own targets, shared minibatches) at once equal the
    instances run one by one."""
    B, steps = 3, 20
    batched = LeastSquares(seed=5, instances=B)
    schedule = _schedule(steps, seed=6)
    together, _ = _run(make_tx(1), batched, steps, schedule)
    for i in range(B):
        single = LeastSquares(seed=5)
        single.b = batched.b[:, i]
        alone, _ = _run(make_tx(0), single, steps, schedule)
        for t in range(steps):
            torch.testing.assert_close(together[t]["x"][i], alone[t]["x"], rtol=1e-11, atol=1e-13,
                                       msg=lambda m: f"instance {i}, step {t + 1}: {m}")
    assert (together[-1]["x"] - batched.start["x"]).abs().min() > 1e-3


# --------------------------------------------------------------------------- hypergradients


HYPER_CASES = [
    ("svrg", lambda lr: lo.svrg(lr=lr, epoch_length=4)),
    ("saga", lambda lr: lo.saga(lr=lr, num_examples=N)),
    ("jacsketch", lambda lr: lo.jacsketch(lr=lr, num_examples=N, sketch=_random_R)),
    ("stochastic_lbfgs", lambda lr: lo.stochastic_lbfgs(lr=lr, hessian_period=2, history_size=3, epoch_length=5)),
]


@pytest.mark.parametrize("name,make_tx", HYPER_CASES, ids=[c[0] for c in HYPER_CASES])
def test_hypergradient_wrt_lr_matches_finite_difference(name, make_tx):
    """Through 8 steps (two curvature pairs for stochastic L-BFGS, differentiated through the
    Hessian-vector products at the averaged iterates)."""
    prob = LogisticRegression(seed=7)
    schedule = _schedule(8, seed=8)
    full = prob.loss(torch.arange(N))

    def unrolled(lr):
        traj, _ = _run(make_tx(lr), prob, 8, schedule, lr_params=isinstance(lr, torch.Tensor) and lr.requires_grad)
        return full(traj[-1])

    lr0 = 0.3
    lr = torch.tensor(lr0, dtype=DT, requires_grad=True)
    (hyper,) = torch.autograd.grad(unrolled(lr), lr)
    fd = torch.tensor(central_difference(lambda v: unrolled(torch.tensor(v, dtype=DT)), lr0), dtype=DT)
    assert abs(fd.item()) > 1e-2
    torch.testing.assert_close(hyper, fd, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- state, extras, drop-in


STATE_CASES = [
    ("svrg", lambda: lo.svrg(lr=0.3, epoch_length=4)),
    ("saga", lambda: lo.saga(lr=0.3, num_examples=N)),
    ("jacsketch", lambda: lo.jacsketch(lr=0.3, num_examples=N, sketch="mean")),
    ("stochastic_lbfgs", lambda: lo.stochastic_lbfgs(lr=0.3, hessian_period=2, history_size=2, epoch_length=5)),
]


@pytest.mark.parametrize("name,make_tx", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_state_round_trip(name, make_tx):
    """The state's tensors survive torch.save / torch.load(weights_only=True); continuing from the
    loaded state reproduces the run, a fresh state does not."""
    prob = LogisticRegression(seed=9)
    schedule = _schedule(12, seed=10)
    tx = make_tx()
    params = {k: v.clone() for k, v in prob.start.items()}
    state = tx.init(params)

    def steps(params, state, part):
        for idx, hidx in part:
            u, state = tx.update(prob.batch_grad(params, idx), state, params, indices=idx, loss_fn=prob.loss(hidx),
                                 **_extras(prob))
            params = lo.apply_updates(params, u)
        return params, state

    params, state = steps(params, state, schedule[:5])
    leaves, spec = torch.utils._pytree.tree_flatten(state)
    buf = io.BytesIO()
    torch.save(leaves, buf)
    buf.seek(0)
    restored = torch.utils._pytree.tree_unflatten(torch.load(buf, weights_only=True), spec)
    a, _ = steps(params, state, schedule[5:])
    b, _ = steps(params, restored, schedule[5:])
    c, _ = steps(params, tx.init(params), schedule[5:])
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.allclose(a["w"], c["w"], rtol=1e-6, atol=0)


def test_missing_extras_are_named():
    prob = LogisticRegression()
    p = prob.start
    g = prob.batch_grad(p, torch.arange(5))
    for tx, missing in ((lo.svrg(), "indices"), (lo.saga(num_examples=N), "indices"),
                        (lo.stochastic_lbfgs(), "indices")):
        with pytest.raises(lo.MissingExtraArgument, match=missing):
            tx.update(g, tx.init(p), p)
    tx = lo.svrg(epoch_length=3)
    with pytest.raises(lo.MissingExtraArgument, match="full_grad_fn"):
        tx.update(g, tx.init(p), p, indices=torch.arange(5), batch_grad_fn=prob.batch_grad)
    tx = lo.saga(num_examples=N)
    with pytest.raises(ValueError, match="repeat"):
        tx.update(g, tx.init(p), p, indices=torch.tensor([1, 1, 2]), **_extras(prob))
    with pytest.raises(ValueError, match="num_examples"):
        lo.saga()
    tx = lo.stochastic_lbfgs(hessian_period=1, epoch_length=3)
    with pytest.raises(lo.MissingExtraArgument, match="loss_fn"):
        tx.update(g, tx.init(p), p, indices=torch.arange(5), batch_grad_fn=prob.batch_grad,
                  full_grad_fn=prob.full_grad)


def test_as_torch_optimizer_step_passes_finite_sum_extras():
    """``opt.step(closure, indices=..., batch_grad_fn=...)``: extra step arguments reach the
    transform, so SVRG runs as a torch optimizer on leaf tensors and matches the functional run."""
    prob = LogisticRegression(seed=11)
    schedule = _schedule(20, seed=12)
    ref, _ = _run(lo.svrg(lr=0.4, epoch_length=6), prob, 20, schedule)
    w = prob.start["w"].clone().requires_grad_(True)
    c = prob.start["c"].clone().requires_grad_(True)
    opt = lo.as_torch_optimizer(lo.svrg(lr=0.4, epoch_length=6), [("w", w), ("c", c)])
    for t, (idx, _) in enumerate(schedule):
        def closure():
            opt.zero_grad()
            loss = prob.loss(idx)({"w": w, "c": c})
            loss.backward()
            return loss

        opt.step(closure, indices=idx, batch_grad_fn=prob.batch_grad, full_grad_fn=prob.full_grad)
        torch.testing.assert_close(w.detach(), ref[t]["w"], rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(c.detach(), ref[t]["c"], rtol=1e-11, atol=1e-13)


# --------------------------------------------------------------------------- GPU (skipped without one)


def _least_squares_on(device):
    prob = LeastSquares(seed=13, instances=2)
    prob.A, prob.b, prob.x_star = prob.A.to(device), prob.b.to(device), prob.x_star.to(device)
    prob.start = {"x": prob.start["x"].to(device)}
    return prob


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,make_tx", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_on_gpu_matches_cpu(name, make_tx):
    """Same numbers on CUDA; the minibatch indices stay on the CPU (they are moved where needed)."""
    schedule = _schedule(15, seed=14)
    cpu, _ = _run(make_tx(1), _least_squares_on("cpu"), 15, schedule)
    gpu, _ = _run(make_tx(1), _least_squares_on("cuda"), 15, schedule)
    torch.testing.assert_close(gpu[-1]["x"].cpu(), cpu[-1]["x"], rtol=1e-9, atol=1e-11)
