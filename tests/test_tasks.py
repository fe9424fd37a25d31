"""Tests of the task library (``tasks/``), table-driven across families.

References: per-instance models written with ``torch.nn`` layers (Linear, Conv1d, Embedding,
RNN) or closed forms (scipy's Rosenbrock, BCE-with-logits) for "batched == per instance";
central finite differences for gradients; ``torch.func.vmap(grad)`` for per-example gradients;
scikit-learn's ``LogisticRegression`` for the finite-sum optimum; files written here in the
standard IDX / CIFAR-10 binary formats for the loaders.
"""

from __future__ import annotations

import gzip
import math
import socket
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

from learnopt import optim as lo
from learnopt.task import Task, TaskFamily, normalize_loss
from tasks import datasets
from tasks.char_lm import CharLMFamily, load_corpus
from tasks.cnn import CNNFamily
from tasks.logistic import LogisticRegressionFamily
from tasks.mlp import MLPFamily, MLPTask
from tasks.quadratic import QuadraticFamily
from tasks.rosenbrock import RosenbrockFamily

DT = torch.float64
N_INSTANCES = 3


# --------------------------------------------------------------------------- per-instance references


def _quadratic_ref(task, params, batch, k):
    r = task.W[k] @ params["theta"][k] - task.y[k]
    return r @ r


def _rosenbrock_ref(task, params, batch, k):
    z = (params["theta"][k] - task.shift[k] + 1).detach().numpy()
    return task.scale[k] * scipy.optimize.rosen(z)


def _logistic_ref(task, params, batch, k):
    idx = torch.arange(task.num_examples) if batch is None else batch
    z = task.x[k, idx] @ params["w"][k] + params["b"][k]
    return F.binary_cross_entropy_with_logits(z, task.y[k, idx]) + task.l2 / 2 * params["w"][k] @ params["w"][k]


def _xy(task, batch, k):
    return (task.x, task.y) if batch is None else (batch[0][k], batch[1][k])


def _mlp_ref(task, params, batch, k):
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(task.sizes[:-1], task.sizes[1:])):
        lin = nn.Linear(fan_in, fan_out).double()
        lin.weight.data, lin.bias.data = params[f"w{i}"][k].T.clone(), params[f"b{i}"][k].clone()
        layers += [lin, {"sigmoid": nn.Sigmoid(), "relu": nn.ReLU(), "tanh": nn.Tanh()}[task.activation]]
    x, y = _xy(task, batch, k)
    return F.cross_entropy(nn.Sequential(*layers[:-1])(x), y)


def _cnn_ref(task, params, batch, k):
    layers, c_in = [], 1
    for i, c_out in enumerate(task.channels):
        conv = nn.Conv1d(c_in, c_out, task.kernel_size, stride=task.stride, padding=task.kernel_size // 2).double()
        conv.weight.data, conv.bias.data = params[f"conv{i}_w"][k].clone(), params[f"conv{i}_b"][k].clone()
        layers += [conv, {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[task.activation]]
        c_in = c_out
    fc = nn.Linear(params["fc_w"].shape[1], task.num_classes).double()
    fc.weight.data, fc.bias.data = params["fc_w"][k].T.clone(), params["fc_b"][k].clone()
    x, y = _xy(task, batch, k)
    return F.cross_entropy(nn.Sequential(*layers, nn.Flatten(), fc)(x[:, None, :]), y)


def _charlm_windows(task, batch, k):
    if batch is not None:
        return batch[k]
    # the documented evaluation windows, built independently: evenly spaced starts
    last, W = len(task.tokens) - task.context - 1, task.eval_windows
    starts = [j * last // (W - 1) for j in range(W)]
    return torch.stack([task.tokens[s:s + task.context + 1] for s in starts])


def _charlm_ref(task, params, batch, k):
    w = _charlm_windows(task, batch, k)
    emb = nn.Embedding(task.vocab_size, task.embed_dim).double()
    emb.weight.data = params["embed"][k].clone()
    if task.model == "mlp":
        l0, l1 = nn.Linear(1, 1).double(), nn.Linear(1, 1).double()
        l0.weight.data, l0.bias.data = params["w0"][k].T.clone(), params["b0"][k].clone()
        l1.weight.data, l1.bias.data = params["w1"][k].T.clone(), params["b1"][k].clone()
        logits = l1(torch.tanh(l0(emb(w[:, :-1]).flatten(1))))
        return F.cross_entropy(logits, w[:, -1])
    rnn = nn.RNN(task.embed_dim, task.hidden_size, batch_first=True).double()
    rnn.weight_ih_l0.data, rnn.weight_hh_l0.data = params["w_ih"][k].T.clone(), params["w_hh"][k].T.clone()
    rnn.bias_ih_l0.data, rnn.bias_hh_l0.data = params["b_h"][k].clone(), torch.zeros(task.hidden_size, dtype=DT)
    out = nn.Linear(1, 1).double()
    out.weight.data, out.bias.data = params["w_out"][k].T.clone(), params["b_out"][k].clone()
    hs, _ = rnn(emb(w[:, :-1]))
    return F.cross_entropy(out(hs).reshape(-1, task.vocab_size), w[:, 1:].reshape(-1))


# id, family factory (tiny sizes), per-instance reference
FAMILIES = [
    ("quadratic", lambda: QuadraticFamily(3, dtype=DT), _quadratic_ref),
    ("quadratic_uniform", lambda: QuadraticFamily(4, "uniform", dtype=DT), _quadratic_ref),
    ("rosenbrock", lambda: RosenbrockFamily(dim=3, dtype=DT), _rosenbrock_ref),
    ("logistic_synthetic", lambda: LogisticRegressionFamily(num_examples=20, dim=3, batch_size=4, dtype=DT),
     _logistic_ref),
    ("logistic_digits", lambda: LogisticRegressionFamily("digits", num_examples=30, batch_size=5, dtype=DT),
     _logistic_ref),
    ("mlp_digits", lambda: MLPFamily(hidden_sizes=(5,), batch_size=8), _mlp_ref),
    ("mlp_mnist1d_relu", lambda: MLPFamily("mnist1d", hidden_sizes=(4, 3), activation="relu", batch_size=8),
     _mlp_ref),
    ("mlp_sampled", lambda: MLPFamily("mnist1d", width_choices=(3, 5), depth_choices=(1, 2),
                                      activation_choices=("tanh", "relu"), batch_size=8), _mlp_ref),
    ("cnn", lambda: CNNFamily(channels=(2, 3), kernel_size=3, batch_size=4), _cnn_ref),
    ("cnn_tanh_stride1", lambda: CNNFamily(channels=(2,), kernel_size=4, stride=1, activation="tanh", batch_size=4),
     _cnn_ref),
    ("charlm_mlp", lambda: CharLMFamily(context=4, embed_dim=3, hidden_size=5, batch_size=4, eval_windows=16),
     _charlm_ref),
    ("charlm_rnn", lambda: CharLMFamily("rnn", context=4, embed_dim=3, hidden_size=5, batch_size=4,
                                        eval_windows=16), _charlm_ref),
]
IDS = [f[0] for f in FAMILIES]
_CACHE: dict[str, object] = {}


def _family(name):
    if name not in _CACHE:
        _CACHE[name] = next(f for f in FAMILIES if f[0] == name)[1]()
    return _CACHE[name]


def _sample(name, seed=0, n=N_INSTANCES):
    """A float64 task of ``n`` instances, its initial parameters and one batch."""
    g = torch.Generator().manual_seed(seed)
    task = _family(name).sample(n, g).to(dtype=DT)
    return task, task.init(g), task.sample_batch(g)


def _batch_equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple):
        return all(_batch_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


# --------------------------------------------------------------------------- shared contracts


@pytest.mark.parametrize("name", IDS)
def test_shapes_and_protocols(name):
    family = _family(name)
    assert isinstance(family, TaskFamily) and isinstance(family.name, str) and family.name
    task, params, batch = _sample(name)
    assert isinstance(task, Task) and task.num_instances == N_INSTANCES
    for k, p in params.items():
        assert p.shape[0] == N_INSTANCES and p.dtype == DT, k
    loss = task.loss(params, batch)
    assert loss.shape == (N_INSTANCES,) and bool(torch.isfinite(loss).all())
    if hasattr(task, "full_loss"):
        assert task.full_loss(params).shape == (N_INSTANCES,)


@pytest.mark.parametrize("name", IDS)
def test_to_keeps_the_task(name):
    """``to(device)`` (positional, as the meta-trainers call it) and ``to(dtype=...)`` keep the
    instances: same losses, parameters where the data is."""
    g = torch.Generator().manual_seed(0)
    task = _family(name).sample(2, g)
    params, batch = task.init(torch.Generator().manual_seed(1)), task.sample_batch(torch.Generator().manual_seed(2))
    moved = task.to("cpu")
    assert _batch_equal(moved.sample_batch(torch.Generator().manual_seed(2)), batch)
    assert all(torch.equal(v, params[k]) for k, v in moved.init(torch.Generator().manual_seed(1)).items())
    torch.testing.assert_close(moved.loss(params, batch), task.loss(params, batch))
    wide = task.to(dtype=DT)
    p64 = wide.init(torch.Generator().manual_seed(1))
    assert all(v.dtype == DT and torch.equal(v.float(), params[k].float()) for k, v in p64.items())


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", IDS)
def test_task_on_gpu_matches_cpu(name):
    """Sampled and drawn on the CPU (its generator), moved to the GPU: the same batches,
    initial parameters, losses and gradients."""
    cpu_task, cpu_params, cpu_batch = _sample(name)
    gpu_task = cpu_task.to("cuda")
    gpu_params = gpu_task.init(torch.Generator().manual_seed(5))
    assert all(v.device.type == "cuda" for v in gpu_params.values())
    cpu_params = cpu_task.init(torch.Generator().manual_seed(5))
    gpu_batch = gpu_task.sample_batch(torch.Generator().manual_seed(6))
    cpu_batch = cpu_task.sample_batch(torch.Generator().manual_seed(6))
    to_cpu = lambda b: None if b is None else (tuple(x.cpu() for x in b) if isinstance(b, tuple) else b.cpu())
    assert _batch_equal(to_cpu(gpu_batch), cpu_batch)
    results = []
    for task, params, batch in ((cpu_task, cpu_params, cpu_batch), (gpu_task, gpu_params, gpu_batch)):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = task.loss(p, batch)
        grads = torch.autograd.grad(loss.sum(), list(p.values()))
        full = task.full_loss(params) if hasattr(task, "full_loss") else loss
        results.append([loss.detach().cpu(), full.detach().cpu(), *(g.cpu() for g in grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", IDS)
def test_batched_loss_equals_per_instance_reference(name):
    ref = next(f for f in FAMILIES if f[0] == name)[2]
    task, params, batch = _sample(name)
    with torch.no_grad():
        batched = task.loss(params, batch)
        full = task.full_loss(params) if hasattr(task, "full_loss") else task.loss(params, None)
        for k in range(N_INSTANCES):
            torch.testing.assert_close(batched[k], torch.as_tensor(ref(task, params, batch, k), dtype=DT),
                                       rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(full[k], torch.as_tensor(ref(task, params, None, k), dtype=DT),
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_instances_are_independent(name):
    """Instance k's loss depends on instance k's parameters only (so the gradient of the sum is
    each instance's own gradient)."""
    task, params, batch = _sample(name)
    moved = {k: v.clone() for k, v in params.items()}
    for v in moved.values():
        v[1:] += 0.1 * torch.randn(v[1:].shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    before, after = task.loss(params, batch), task.loss(moved, batch)
    assert before[0] == after[0] and bool((before[1:] != after[1:]).all())


@pytest.mark.parametrize("name", IDS)
def test_gradient_matches_finite_differences(name):
    task, params, batch = _sample(name, n=2)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(task.loss(params, batch).sum(), list(params.values()))
    g = torch.Generator().manual_seed(7)
    eps = 1e-6
    for _ in range(2):
        direction = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}
        with torch.no_grad():
            plus = task.loss({k: v + eps * direction[k] for k, v in params.items()}, batch).sum()
            minus = task.loss({k: v - eps * direction[k] for k, v in params.items()}, batch).sum()
        fd = (plus - minus) / (2 * eps)
        analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, params))
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", IDS)
def test_same_seed_same_task_other_seed_differs(name):
    a_task, a_params, a_batch = _sample(name, seed=3)
    b_task, b_params, b_batch = _sample(name, seed=3)
    c_task, c_params, c_batch = _sample(name, seed=4)
    assert all(torch.equal(a_params[k], b_params[k]) for k in a_params)
    assert _batch_equal(a_batch, b_batch)
    # the data, probed away from the start (logistic regression starts where every task has loss log 2)
    probe = lambda t, p, batch: t.loss(
        {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=DT) for k, v in p.items()},
        batch)
    assert torch.equal(probe(a_task, a_params, a_batch), probe(b_task, b_params, b_batch))
    assert not torch.equal(probe(a_task, a_params, a_batch), probe(c_task, c_params, c_batch))


@pytest.mark.parametrize("name", IDS)
def test_normaliser_is_the_typical_initial_loss(name):
    """Task and family normalise alike, by a positive constant, and a freshly initialised
    instance's normalised loss is of order one (mean over 16 instances within [0.5, 2])."""
    family = _family(name)
    g = torch.Generator().manual_seed(11)
    task = family.sample(16, g)
    loss = task.full_loss(task.init(g)) if hasattr(task, "full_loss") else task.loss(task.init(g), None)
    x = torch.tensor([0.5, 2.0, 7.0])
    assert family.loss_scale > 0
    torch.testing.assert_close(family.normalize(x), x / family.loss_scale)
    torch.testing.assert_close(task.normalize(x), family.normalize(x))
    torch.testing.assert_close(normalize_loss(task, x), family.normalize(x))
    typical = float(family.normalize(loss).mean()) if name != "rosenbrock" else float(family.normalize(loss).median())
    assert 0.5 < typical < 2.0, typical


def test_normaliser_values():
    """Hand values: log C for the classifiers, log V for the character models (V counted from the
    file here), log 2 exactly at the logistic start, the quadratic's closed-form expectation
    (checked by Monte Carlo), the Rosenbrock median (a fresh sample's median)."""
    for name in ("mlp_digits", "mlp_sampled", "cnn"):
        assert _family(name).loss_scale == pytest.approx(math.log(10))
    vocab = len(set((Path(__file__).parents[1] / "tasks" / "data" / "python_docs.txt").read_text()))
    assert _family("charlm_mlp").loss_scale == pytest.approx(math.log(vocab))
    task, params, _ = _sample("logistic_synthetic")
    torch.testing.assert_close(task.normalize(task.full_loss(params)), torch.ones(N_INSTANCES, dtype=DT))
    g = torch.Generator().manual_seed(5)
    for dist, d in (("gaussian", 3), ("uniform", 4)):
        fam = QuadraticFamily(d, dist, init_scale=0.3, dtype=DT)
        t = fam.sample(20000, g)
        assert float(t.loss(t.init(g)).mean()) == pytest.approx(fam.loss_scale, rel=0.03)
    ros = _family("rosenbrock")
    t = ros.sample(4000, g)
    assert float(t.loss(t.init(g)).median()) == pytest.approx(ros.loss_scale, rel=0.1)


def test_normalize_loss_leaves_tasks_without_a_normaliser_alone():
    class Plain:
        pass

    x = torch.tensor([3.0])
    assert normalize_loss(Plain(), x) is x


BAD_ARGUMENTS = [
    (lambda: RosenbrockFamily(dim=1), "dim must be >= 2"),
    (lambda: RosenbrockFamily(scale_range=(0.0, 1.0)), "scale_range"),
    (lambda: RosenbrockFamily(b=-1.0), "b must be > 0"),
    (lambda: LogisticRegressionFamily(data="iris"), "data must be one of"),
    (lambda: LogisticRegressionFamily(num_examples=5, batch_size=6), "batch_size <= num_examples"),
    (lambda: LogisticRegressionFamily(l2=-0.1), "l2 must be >= 0"),
    (lambda: LogisticRegressionFamily("digits", num_examples=1000), "too many"),
    (lambda: MLPFamily(activation="elu"), "activation must be one of"),
    (lambda: MLPFamily(activation_choices=("relu", "swish")), "activation must be one of"),
    (lambda: MLPFamily(width_choices=()), "width_choices must not be empty"),
    (lambda: MLPFamily(width_choices=(0, 4)), "every width must be an integer >= 1"),
    (lambda: MLPFamily(depth_choices=(-1,)), "every depth must be an integer >= 0"),
    (lambda: MLPFamily(batch_size=0), "batch_size must be >= 1"),
    (lambda: MLPFamily(dataset="imagenet"), "unknown dataset 'imagenet'"),
    (lambda: MLPFamily(dataset="mnist"), "pass data_dir"),
    (lambda: MLPFamily(hidden_sizes=()).out_of_distribution(), "linear model"),
    (lambda: _family("mlp_digits").sample(0), "num_instances must be >= 1"),
    (lambda: CNNFamily(dataset="digits"), "dataset must be 'mnist1d'"),
    (lambda: CNNFamily(channels=()), "channels must be a non-empty"),
    (lambda: CNNFamily(activation="gelu"), "activation must be one of"),
    (lambda: CharLMFamily(model="lstm"), "model must be one of"),
    (lambda: CharLMFamily(context=0), "context must be >= 1"),
    (lambda: QuadraticFamily(dim=0), "dim must be >= 1"),
]


@pytest.mark.parametrize("make, match", BAD_ARGUMENTS)
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_missing_corpus_names_the_choices():
    with pytest.raises(FileNotFoundError, match="python_docs"):
        CharLMFamily(corpus="no_such_corpus")


# --------------------------------------------------------------------------- Rosenbrock


def test_rosenbrock_minimum_and_gradient_against_scipy():
    fam = RosenbrockFamily(dim=4, b=100.0, dtype=DT)
    task = fam.sample(3, torch.Generator().manual_seed(0))
    theta = task.init(torch.Generator().manual_seed(1))["theta"].requires_grad_(True)
    (grad,) = torch.autograd.grad(task.loss({"theta": theta}).sum(), theta)
    for k in range(3):
        z = (theta[k] - task.shift[k] + 1).detach().numpy()
        np.testing.assert_allclose(grad[k].numpy(), task.scale[k].item() * scipy.optimize.rosen_der(z), rtol=1e-12)
    star = task.optimum().requires_grad_(True)
    at_star = task.loss({"theta": star})
    assert torch.equal(at_star, torch.zeros(3, dtype=DT))
    (g_star,) = torch.autograd.grad(at_star.sum(), star)
    assert torch.equal(g_star, torch.zeros_like(g_star))
    for k in range(3):  # a strict minimum: the Hessian there is scale * rosen_hess(1), positive definite
        hess = torch.autograd.functional.hessian(lambda t, k=k: task.loss({"theta": t})[k], star.detach())[k, :, k]
        expected = task.scale[k].item() * scipy.optimize.rosen_hess(np.ones(4))
        np.testing.assert_allclose(hess.numpy(), expected, rtol=1e-12)
        assert np.linalg.eigvalsh(expected).min() > 0


def test_rosenbrock_bfgs_on_the_task_finds_the_closed_form_minimum():
    """scipy's BFGS, fed the task's loss and autograd gradient, lands on ``optimum()``."""
    task = RosenbrockFamily(dim=3, dtype=DT).sample(2, torch.Generator().manual_seed(2))
    start = task.init(torch.Generator().manual_seed(3))["theta"]

    def value_and_grad(flat):
        theta = torch.tensor(flat.reshape(2, 3), requires_grad=True)
        loss = task.loss({"theta": theta}).sum()
        return loss.item(), torch.autograd.grad(loss, theta)[0].numpy().ravel()

    found = scipy.optimize.minimize(value_and_grad, start.numpy().ravel(), jac=True, method="BFGS",
                                    options={"gtol": 1e-10, "maxiter": 5000})
    np.testing.assert_allclose(found.x.reshape(2, 3), task.optimum().numpy(), atol=1e-5)


# --------------------------------------------------------------------------- logistic regression (finite sum)


def test_logistic_closed_form_gradients_match_autograd():
    task, params, idx = _sample("logistic_synthetic")
    params = {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
              for k, v in params.items()}

    def one(p, x, y):  # the loss of one example
        z = x @ p["w"] + p["b"]
        return F.binary_cross_entropy_with_logits(z, y) + task.l2 / 2 * p["w"] @ p["w"]

    per_example = task.example_grads(params, idx)
    for k in range(N_INSTANCES):
        pk = {"w": params["w"][k], "b": params["b"][k]}
        ref = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(pk, task.x[k, idx], task.y[k, idx])
        for name in ("w", "b"):
            torch.testing.assert_close(per_example[name][:, k], ref[name])
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for indices, closed in ((idx, task.batch_grad(params, idx)), (None, task.full_grad(params))):
        auto = torch.autograd.grad(task.loss(p, indices).sum(), list(p.values()))
        for (name, a) in zip(p, auto):
            torch.testing.assert_close(closed[name], a)
    extra = task.extra_args(idx)
    assert torch.equal(extra["indices"], idx) and extra["num_examples"] == 20
    torch.testing.assert_close(extra["loss_fn"](params), task.loss(params, idx).sum())


def test_logistic_batches_have_no_repeats():
    task, _, _ = _sample("logistic_synthetic")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = task.sample_batch(g)
        assert len(idx) == 4 and len(torch.unique(idx)) == 4 and int(idx.max()) < 20


def _sklearn_optimum(task):
    from sklearn.linear_model import LogisticRegression

    w, b = [], []
    for k in range(task.num_instances):
        m = task.num_examples  # sklearn: C sum_i loss_i + ||w||^2 / 2  ==  m C (mean loss + ||w||^2 / (2 m C))
        clf = LogisticRegression(C=1.0 / (m * task.l2), tol=1e-12, max_iter=10_000)
        clf.fit(task.x[k].numpy(), task.y[k].numpy())
        w.append(torch.tensor(clf.coef_[0]))
        b.append(float(clf.intercept_[0]))
    return {"w": torch.stack(w), "b": torch.tensor(b, dtype=DT)}


@pytest.mark.parametrize("method", ["saga", "svrg"])
def test_variance_reduced_methods_driven_by_the_task_reach_the_sklearn_optimum(method):
    """Two instances at once; the extras come from ``task.extra_args``. Plain SGD with the same
    step and steps stays far off (the test needs variance reduction to pass)."""
    fam = LogisticRegressionFamily(num_examples=40, dim=4, l2=0.05, batch_size=4, dtype=DT)
    g = torch.Generator().manual_seed(0)
    task = fam.sample(2, g)
    star = _sklearn_optimum(task)
    # the optimum of our objective: its full gradient vanishes at sklearn's solution
    assert all(float(v.abs().max()) < 1e-6 for v in task.full_grad(star).values())
    lipschitz = float(task.x.pow(2).sum(-1).max()) / 4 + task.l2
    lr = 1.0 / (3 * lipschitz)
    make = {"saga": lambda: lo.saga(lr=lr, num_examples=40), "svrg": lambda: lo.svrg(lr=lr)}[method]
    results = {}
    for name, tx in ((method, make()), ("sgd", lo.sgd(lr=lr))):
        params = task.init(g)
        state = tx.init(params)
        for _ in range(1500):
            idx = task.sample_batch(g)
            p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            grads = dict(zip(p, torch.autograd.grad(task.loss(p, idx).sum(), list(p.values()))))
            updates, state = tx.update(grads, state, params, **task.extra_args(idx))
            params = lo.apply_updates(params, updates)
        results[name] = max(float((params[k] - star[k]).abs().max()) for k in star)
    assert results[method] < 1e-6, results
    assert results["sgd"] > 1e-2, results


# --------------------------------------------------------------------------- MLP family


def test_mlp_fixed_architecture_keeps_its_behaviour():
    fam = MLPFamily()
    assert fam.name == "mlp_digits_20_sigmoid" and not fam.sampled
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    task = fam.sample(2, g)
    assert torch.equal(g.get_state(), state)  # a fixed architecture draws nothing
    assert isinstance(task, MLPTask) and task.sizes == (64, 20, 10) and task.activation == "sigmoid"
    assert task.batch_size == 128 and task.x.shape == (1500, 64) and task.x.dtype == torch.float32
    params = task.init(torch.Generator().manual_seed(0))
    assert params["w0"].dtype == torch.float32 and set(params) == {"w0", "b0", "w1", "b1"}


def test_mlp_sampled_architectures():
    fam = MLPFamily("digits", width_choices=(4, 8), depth_choices=(1, 3), activation_choices=("relu", "tanh"))
    assert fam.name == "mlp_digits_w4-8_d1-3_relu-tanh"
    seen = set()
    for seed in range(24):
        task = fam.sample(3, torch.Generator().manual_seed(seed))
        hidden = task.sizes[1:-1]
        assert len(set(hidden)) == 1 and hidden[0] in (4, 8) and len(hidden) in (1, 3)
        params = task.init(torch.Generator().manual_seed(0))
        assert all(v.shape[0] == 3 for v in params.values())  # one shape for all instances of a call
        seen.add((hidden[0], len(hidden), task.activation))
        again = fam.sample(3, torch.Generator().manual_seed(seed))
        assert (again.sizes, again.activation) == (task.sizes, task.activation)
    assert len(seen) == 8  # every combination occurs
    only_width = MLPFamily(hidden_sizes=(5, 5), width_choices=(7,)).sample(1, torch.Generator().manual_seed(0))
    assert only_width.sizes == (64, 7, 7, 10) and only_width.activation == "sigmoid"


def test_mlp_out_of_distribution_families():
    ood = MLPFamily().out_of_distribution()  # the paper's tests
    assert ood["wider"].hidden_sizes == (40,) and ood["deeper"].hidden_sizes == (20, 20)
    assert ood["activation"].activation == "relu"
    base = MLPFamily("digits", width_choices=(4, 8), depth_choices=(1, 2), activation_choices=("sigmoid", "relu"))
    ood = base.out_of_distribution()
    assert set(ood) == {"wider", "deeper", "activation"}
    base_archs = {(t.sizes, t.activation) for t in (base.sample(1, torch.Generator().manual_seed(s))
                                                    for s in range(16))}
    for key, fam in ood.items():
        for s in range(4):
            task = fam.sample(1, torch.Generator().manual_seed(s))
            assert (task.sizes, task.activation) not in base_archs
            hidden = task.sizes[1:-1]
            if key == "wider":
                assert hidden[0] == 16
            if key == "deeper":
                assert len(hidden) == 3
            if key == "activation":
                assert task.activation == "tanh"


# --------------------------------------------------------------------------- dataset files


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format, written from its definition: 0, 0, type 0x08 (ubyte), ndim, big-endian dims."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(root: Path, gz: bool, rng: np.random.Generator, n_train=5, n_test=3):
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = root / f"{prefix}-{kind}"
            blob = _idx_bytes(arr)
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(blob)
            else:
                name.write_bytes(blob)
        data[prefix] = (images, labels)
    return data


def _write_cifar(root: Path, rng: np.random.Generator, per_file=2):
    root.mkdir(parents=True, exist_ok=True)
    data = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file, dtype=np.uint8)
        records = b"".join(bytes([labels[i]]) + images[i].tobytes() for i in range(per_file))
        (root / name).write_bytes(records)
        split = "test" if name.startswith("test") else "train"
        data[split][0].append(images)
        data[split][1].append(labels)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in data.items()}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    try:
        import requests

        monkeypatch.setattr(requests.Session, "request", refuse)
    except ImportError:
        pass


@pytest.mark.parametrize("layout", ["flat", "flat_gz", "torchvision"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_loader_reads_standard_files_exactly(tmp_path, no_network, name, layout):
    rng = np.random.default_rng(0)
    root = tmp_path / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name] / "raw" \
        if layout == "torchvision" else tmp_path
    written = _write_mnist(root, gz=layout == "flat_gz", rng=rng)
    x_tr, y_tr, x_te, y_te = datasets.load_mnist(tmp_path, name)
    assert x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
    np.testing.assert_array_equal(x_tr.numpy(), written["train"][0])
    np.testing.assert_array_equal(y_tr.numpy(), written["train"][1])
    np.testing.assert_array_equal(x_te.numpy(), written["t10k"][0])
    np.testing.assert_array_equal(y_te.numpy(), written["t10k"][1])
    fx, fy, _, _ = datasets.load_dataset(name, 0, str(tmp_path))
    torch.testing.assert_close(fx, torch.tensor(written["train"][0].reshape(5, -1), dtype=torch.float32) / 255)
    assert torch.equal(fy, torch.tensor(written["train"][1], dtype=torch.int64))


def test_cifar10_binary_loader_reads_records_exactly(tmp_path, no_network):
    written = _write_cifar(tmp_path / "cifar-10-batches-bin", np.random.default_rng(1))
    x_tr, y_tr, x_te, y_te = datasets.load_cifar10(tmp_path)
    assert x_tr.shape == (10, 3, 32, 32) and x_te.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(x_tr.numpy(), written["train"][0])
    np.testing.assert_array_equal(y_tr.numpy(), written["train"][1])
    np.testing.assert_array_equal(x_te.numpy(), written["test"][0])
    np.testing.assert_array_equal(y_te.numpy(), written["test"][1])
    # record layout: byte 0 the label, then the red plane row by row
    raw = (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()
    assert raw[0] == y_tr[0] and raw[1 + 32 + 5] == x_tr[0, 0, 1, 5] and raw[1 + 1024] == x_tr[0, 1, 0, 0]


def test_mlp_family_on_file_datasets(tmp_path, no_network):
    written = _write_mnist(tmp_path / "m", gz=True, rng=np.random.default_rng(2), n_train=12)
    fam = MLPFamily("mnist", hidden_sizes=(6,), batch_size=4, data_dir=str(tmp_path / "m"))
    task = fam.sample(2, torch.Generator().manual_seed(0))
    assert task.sizes[0] == 784 and fam.num_classes == int(written["train"][1].max()) + 1
    assert task.full_loss(task.init(torch.Generator().manual_seed(0))).shape == (2,)
    _write_cifar(tmp_path / "c", np.random.default_rng(3))
    cifar = MLPFamily("cifar10", hidden_sizes=(6,), batch_size=4, data_dir=str(tmp_path / "c"))
    assert cifar.sample(1).sizes[0] == 3072


def test_loaders_name_what_is_missing(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.load_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.load_mnist(tmp_path)
    _write_mnist(tmp_path, gz=False, rng=np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        datasets.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x08\x03\x00\x00garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8)))  # 3 images, 2 labels
    with pytest.raises(ValueError, match="expected"):
        datasets.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8))[:-1])  # truncated
    with pytest.raises(ValueError, match="bytes"):
        datasets.load_mnist(tmp_path)
    py = tmp_path / "c" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    (py / "data_batch_1").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        datasets.load_cifar10(tmp_path / "c")
    _write_cifar(tmp_path / "c" / "cifar-10-batches-bin", np.random.default_rng(0))
    (tmp_path / "c" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="whole number of CIFAR-10 records"):
        datasets.load_cifar10(tmp_path / "c")
    with pytest.raises(ValueError, match="pass data_dir"):
        datasets.load_dataset("cifar10")


def test_bundled_datasets_build_without_network(no_network):
    for name in ("digits", "mnist1d", "synthetic"):
        x, y, xt, yt = datasets.load_dataset.__wrapped__(name, 0)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y) and len(xt) == len(yt)
    x, y, xt, yt = datasets.load_dataset.__wrapped__("synthetic", 0)  # make_classification's documented sizes
    assert x.shape == (5000, 32) and xt.shape == (1000, 32) and set(y.tolist()) == set(range(10))
    assert torch.equal(x, datasets.load_dataset.__wrapped__("synthetic", 0)[0])  # deterministic in the seed
    assert len(load_corpus("python_docs")) > 50_000
