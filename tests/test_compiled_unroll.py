"""The compiled inner step (``learnopt.meta.compiled``) against the eager ``inner_step``: the same
truncation meta-loss, meta-gradients to 1e-5 relative, the same forward-only runs under
perturbed weights (what ES and PES run), and no recompilation as truncations advance or as
the weights are perturbed.

Inductor (C++ kernels) compiles for tens of seconds per graph on this machine, so it runs the
quadratic cases; the others trace the same graphs with the ``aot_eager`` backend (dynamo and
AOTAutograd, the same guards and recompilations, kernels run op by op)."""

from __future__ import annotations

import pytest
import torch

from learnopt.learned import CoordinatewiseLSTM, FeatureMLPOptimizer
from learnopt.meta import compiled
from learnopt.meta.compiled import compile_report, compiled_inner_step, compiled_steps, compiler_available
from learnopt.meta.unroll import inner_step
from learnopt.optim.base import detach_state
from tasks.mlp import MLPTask
from tasks.quadratic import QuadraticFamily

pytestmark = pytest.mark.skipif(not compiler_available(),
                                reason="torch.compile's CPU backend (inductor) needs a C++ compiler")

K = 3
RTOL = 1e-5


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", request.param)
    return request.param


def small_lstm() -> CoordinatewiseLSTM:
    torch.manual_seed(0)
    return CoordinatewiseLSTM(hidden_size=4, num_layers=2, preprocess="log_sign", output_scale=0.1)


def small_mlp_lopt() -> FeatureMLPOptimizer:
    torch.manual_seed(0)
    return FeatureMLPOptimizer(hidden_sizes=(8,), momentum_decays=(0.5, 0.9), step_timescales=(1.0, 10.0),
                               output_init_scale=1.0, step_mult=0.1, batch_dims=1)


def quadratic_task(generator: torch.Generator):
    return QuadraticFamily(dim=3).sample(2, generator)


def mlp_task(generator: torch.Generator) -> MLPTask:
    x = torch.randn(16, 4, generator=generator)
    y = torch.randint(3, (16,), generator=generator)
    return MLPTask((4, 5, 3), "tanh", x, y, batch_size=8, n=2)


OPTIMIZERS = {"lstm": small_lstm, "mlp_lopt": small_mlp_lopt}
TASKS = {"quadratic": quadratic_task, "mlp": mlp_task}


def truncation(step, lopt, task, params, opt_state, generator, k=K, inference=False):
    """K steps from ``params``; returns the truncation meta-loss (mean loss after each step), the
    carried (detached) parameters and state. ``inference``: parameters that do not require grad
    (a forward-only caller of the compiled step under ``torch.no_grad``)."""
    params = {n: p.detach().requires_grad_(not inference) for n, p in params.items()}
    terms = []
    for _ in range(k):
        loss, params, opt_state = step(lopt, task, params, opt_state, task.sample_batch(generator))
        terms.append(loss.mean())
    terms.append(task.loss(params, task.sample_batch(generator)).mean())
    meta_loss = torch.stack(terms[1:]).mean()
    return meta_loss, ({n: p.detach() for n, p in params.items()}, detach_state(opt_state))


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(x.abs().max()) for x in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


def graphs() -> int:
    return sum(r["graphs"] for r in compile_report().values())


def start(lopt_name, task_name):
    lopt = OPTIMIZERS[lopt_name]()
    generator = torch.Generator().manual_seed(1)
    task = TASKS[task_name](generator)
    params = task.init(generator)
    with torch.no_grad():
        opt_state = lopt.init(params)
    return lopt, task, params, opt_state


def generator_copy(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("lopt_name, task_name, backend", [
    ("lstm", "quadratic", "inductor"), ("mlp_lopt", "quadratic", "inductor"),
    ("lstm", "mlp", "aot_eager"), ("mlp_lopt", "mlp", "aot_eager")], indirect=["backend"])
def test_truncated_bptt_matches_eager_without_recompiles(lopt_name, task_name, backend):
    lopt, task, params, opt_state = start(lopt_name, task_name)
    weights = list(lopt.parameters())
    carried = {"eager": (params, opt_state), "compiled": (params, opt_state)}
    for t in range(3):  # three truncations, each continuing the last
        results = {}
        for name, step in (("eager", inner_step), ("compiled", compiled_inner_step)):
            before = graphs()
            loss, carried[name] = truncation(step, lopt, task, *carried[name], generator_copy(t))
            results[name] = (loss, torch.autograd.grad(loss, weights, allow_unused=True), graphs() - before)
        (loss_e, grads_e, _), (loss_c, grads_c, compiled) = results["eager"], results["compiled"]
        assert torch.allclose(loss_c, loss_e, rtol=RTOL, atol=0)
        assert relative_error(grads_c, grads_e) < RTOL
        if t > 0:
            assert compiled == 0, "a later truncation recompiled"


class Bound(torch.nn.Module):
    """``forward(fn, *args) = fn(lopt, *args)``, so ``functional_call`` can swap ``lopt``'s weights
    (as ES and PES run the learned optimizer)."""

    def __init__(self, lopt):
        super().__init__()
        self.lopt = lopt

    def forward(self, fn, *args):
        return fn(self.lopt, *args)


def perturbed_run(lopt, weights, task, params, opt_state, step, inference=False):
    """A forward-only truncation with ``lopt``'s weights replaced by ``weights``; with ``inference``
    under ``torch.no_grad`` and with parameters that do not require grad."""

    def body(module, *args):
        with torch.set_grad_enabled(not inference):
            return truncation(step, module, *args, inference=inference)[0].detach()

    return torch.func.functional_call(Bound(lopt), {f"lopt.{n}": w for n, w in weights.items()},
                                      (body, task, params, opt_state, generator_copy(7)))


@pytest.mark.parametrize("lopt_name, backend", [("lstm", "inductor"), ("mlp_lopt", "aot_eager")],
                         indirect=["backend"])
def test_forward_only_under_perturbed_weights_matches_eager_without_recompiles(lopt_name, backend):
    lopt, task, params, opt_state = start(lopt_name, "quadratic")
    phi = {n: w.detach() for n, w in lopt.named_parameters()}
    noise = torch.Generator().manual_seed(3)
    for i in range(3):
        eps = {n: 0.01 * torch.randn(w.shape, generator=noise) for n, w in phi.items()}
        member = {n: phi[n] + eps[n] for n in phi}
        eager = perturbed_run(lopt, member, task, params, opt_state, inner_step)
        before = graphs()
        for inference in (False, True):
            compiled = perturbed_run(lopt, member, task, params, opt_state, compiled_inner_step, inference)
            assert torch.allclose(compiled, eager, rtol=RTOL, atol=0)
        if i > 0:
            assert graphs() == before, "perturbed weights recompiled"


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_compiled_steps_region_matches_eager(backend):
    lopt, task, params, opt_state = start("lstm", "quadratic")
    weights = list(lopt.parameters())
    p = {n: x.detach().requires_grad_(True) for n, x in params.items()}
    losses, new_params, _ = compiled_steps(lopt, task, p, opt_state, [None] * K)
    grads_c = torch.autograd.grad(losses.mean() + new_params["theta"].square().mean(), weights)
    eager = []
    q, s = p, opt_state
    for _ in range(K):
        loss, q, s = inner_step(lopt, task, q, s)
        eager.append(loss)
    grads_e = torch.autograd.grad(torch.stack(eager).mean() + q["theta"].square().mean(), weights)
    assert torch.allclose(losses, torch.stack(eager), rtol=RTOL, atol=0)
    assert relative_error(grads_c, grads_e) < RTOL


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_second_order_matches_eager(backend):
    lopt, task, params, opt_state = start("mlp_lopt", "quadratic")
    weights = list(lopt.parameters())
    grads = {}
    for name, step in (("eager", inner_step), ("compiled", compiled_inner_step)):
        p = {n: x.detach().requires_grad_(True) for n, x in params.items()}
        s, terms = opt_state, []
        for _ in range(K):
            loss, p, s = step(lopt, task, p, s, None, True)
            terms.append(loss.mean())
        grads[name] = torch.autograd.grad(torch.stack(terms).mean(), weights)
    assert relative_error(grads["compiled"], grads["eager"]) < RTOL


def test_falls_back_to_eager_with_a_warning(monkeypatch):
    """No C++ compiler for inductor, or a step that cannot be one graph: a warning, then the eager
    step's results."""
    from learnopt import optim as lo
    from learnopt.optim.base import GradientTransformation

    monkeypatch.setattr(compiled, "_CACHE", {})
    generator = torch.Generator().manual_seed(1)
    task = quadratic_task(generator)
    params = {n: p.requires_grad_(True) for n, p in task.init(generator).items()}
    sgd = lo.sgd(lr=0.1)
    expected = inner_step(sgd, task, params, sgd.init(params))[0]

    monkeypatch.setattr(compiled, "compiler_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        loss = compiled_inner_step(sgd, task, params, sgd.init(params))[0]
    assert torch.equal(loss, expected)

    def update(grads, state, params=None):  # a Python float of a tensor: a graph break
        return {k: -0.1 * g * float(g.abs().sum() > 0) for k, g in grads.items()}, state

    breaking = GradientTransformation(sgd.init, update)
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        loss = compiled_inner_step(breaking, task, params, sgd.init(params))[0]
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_truncation_core_runs_the_compiled_steps(backend):
    """``run_truncation`` (the core of TruncatedBPTT, ES and PES) with the compiled steps: the
    same meta-loss and meta-gradient as with ``inner_step``, for the graph-keeping truncation
    (``compiled_inner_step``) and the forward-only one (``compiled_forward_step``)."""
    from learnopt.meta.compiled import compiled_forward_step
    from learnopt.meta.truncation import run_truncation

    lopt, task, params, opt_state = start("mlp_lopt", "mlp")
    weights = list(lopt.parameters())

    def run(step, keep_graph):
        return run_truncation(step, lopt, task, params, opt_state, generator_copy(2), K, torch.log, keep_graph)

    eager, compiled_run = run(inner_step, True), run(compiled_inner_step, True)
    assert torch.allclose(compiled_run.meta_loss, eager.meta_loss, rtol=RTOL, atol=0)
    assert relative_error(torch.autograd.grad(compiled_run.meta_loss, weights),
                          torch.autograd.grad(eager.meta_loss, weights)) < RTOL
    forward = run(compiled_forward_step, False)
    assert torch.allclose(forward.meta_loss, run(inner_step, False).meta_loss, rtol=RTOL, atol=0)
    assert not forward.meta_loss.requires_grad


# --------------------------------------------------------------------------- the estimators' option


def _estimates(make_estimator, lopt, truncations=2):
    est = make_estimator()
    state = est.init_unroll(lopt)
    out = []
    for _ in range(truncations):
        res = est.estimate(lopt, state)
        out.append(res)
        state = res.unroll_state
    return out


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
@pytest.mark.parametrize("estimator", ["truncated_bptt", "pes"])
def test_estimators_compile_unroll_matches_eager(estimator, backend):
    """``compile_unroll=True`` (chunks of 2 steps, so K = 5 runs two regions and one single
    compiled step) gives the eager estimator's meta-losses, meta-gradients and carried state."""
    from learnopt.meta import PES, TruncatedBPTT

    lopt = small_lstm()
    family = QuadraticFamily(dim=3)

    def make(**compile_kw):
        if estimator == "pes":
            return PES(family, num_tasks=2, unroll_length=5, horizon=10, num_pairs=2, sigma=0.01, seed=3, **compile_kw)
        return TruncatedBPTT(family, num_tasks=2, unroll_length=5, horizon=10, seed=3, **compile_kw)

    eager = _estimates(make, lopt)
    fast = _estimates(lambda: make(compile_unroll=True, compile_chunk=2), lopt)
    for e, f in zip(eager, fast):
        assert f.finite and e.finite
        torch.testing.assert_close(f.meta_loss, e.meta_loss, rtol=RTOL, atol=0)
        assert relative_error(list(f.meta_grads.values()), list(e.meta_grads.values())) < RTOL
        for n in e.unroll_state.params:
            torch.testing.assert_close(f.unroll_state.params[n], e.unroll_state.params[n], rtol=RTOL, atol=1e-7)
    assert any("/2/" in key for key in compile_report())  # the two-step region was compiled


def test_compile_unroll_refuses_activation_checkpointing():
    from learnopt.meta import TruncatedBPTT

    with pytest.raises(ValueError, match="activation_checkpointing and compile_unroll"):
        TruncatedBPTT(num_tasks=2, activation_checkpointing=True, compile_unroll=True)
    with pytest.raises(ValueError, match="compile_chunk"):
        TruncatedBPTT(num_tasks=2, compile_unroll=True, compile_chunk=0)
