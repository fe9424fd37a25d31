"""The fast paths match the plain ones: the coordinate-wise LSTM's in-place drop-in step
against its functional ``update`` (``nn.LSTMCell``), the drop-in optimizer with and without it
(on a shipped checkpoint too), and truncated BPTT with activation checkpointing against
truncated BPTT without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import learnopt
from learnopt.learned import CoordinatewiseLSTM
from learnopt.meta import FullBPTT, TruncatedBPTT
from tasks.mlp import MLPFamily
from tasks.quadratic import QuadraticFamily

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def _lstm(dtype: torch.dtype, **kwargs) -> CoordinatewiseLSTM:
    torch.manual_seed(0)
    lopt = CoordinatewiseLSTM(**kwargs).to(dtype)
    with torch.no_grad():  # weights of a trained size, so the gates are not all near 0.5
        for p in lopt.parameters():
            p.normal_(0.0, 0.6)
    return lopt


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kwargs", [
    dict(hidden_size=20, num_layers=2, preprocess="log_sign", preprocess_p=10.0, output_scale=0.1),
    dict(hidden_size=7, num_layers=1, preprocess="none"),
    dict(hidden_size=5, num_layers=3, preprocess="log_sign", preprocess_p=5.0),
])
def test_inplace_update_matches_functional_update(kwargs, dtype, tol):
    lopt = _lstm(dtype, **kwargs)
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.zeros(13, 7, dtype=dtype), "b": torch.zeros(29, dtype=dtype)}
    functional, inplace = lopt.init(params), lopt.init(params)
    for step in range(4):  # gradients over many scales, both branches of the log/sign preprocessing
        grads = {k: torch.randn(v.shape, generator=g, dtype=dtype) * 10.0 ** (2 - 3 * step) for k, v in params.items()}
        grads["b"][:3] = 0.0
        if step == 2:  # a state made elsewhere (copies): update_ moves it into a scratch buffer, same values
            inplace = type(inplace)(inplace.h.clone(), inplace.c.clone())
            assert lopt._buffer_of(inplace.h, 13 * 7 + 29) is None
        with torch.no_grad():
            updates, functional = lopt.update(grads, functional, params)
            fast = lopt.update_(grads, inplace, params, block_rows=17)  # blocks that split tensors, a ragged last block
        assert lopt._buffer_of(inplace.h, 13 * 7 + 29) is not None
        for k in params:
            torch.testing.assert_close(fast[k], updates[k], rtol=tol, atol=tol)
        torch.testing.assert_close(inplace.h, functional.h, rtol=tol, atol=tol)
        torch.testing.assert_close(inplace.c, functional.c, rtol=tol, atol=tol)


def test_fused_stack_matches_nn_lstm_cells_values_and_gradients():
    from learnopt.learned.lstm import FusedLSTMStack

    lopt = _lstm(torch.float64, hidden_size=5, num_layers=3, preprocess="log_sign")
    g = torch.Generator().manual_seed(2)
    n = 9
    x = torch.randn(2, n, generator=g, dtype=torch.float64, requires_grad=True)
    h, c = (torch.randn(3, 5, n, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def ours(inputs=x):
        fused = [t for wb in lopt._fused_weights() for t in wb]
        return FusedLSTMStack.apply(inputs, h, c, lopt.output.weight, lopt.output.bias, *fused)

    # nn.LSTMCell layer by layer and nn.Linear, on the usual [coordinates, features] layout
    inp, hs, cs = x.t(), [], []
    for layer, cell in enumerate(lopt.cells):
        h_l, c_l = cell(inp, (h[layer].t(), c[layer].t()))
        hs.append(h_l.t())
        cs.append(c_l.t())
        inp = h_l
    theirs = (lopt.output(inp).squeeze(-1), torch.stack(hs), torch.stack(cs))
    weights = list(lopt.parameters())
    for out_ours, out_theirs in zip(ours(), theirs):
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-12, atol=1e-14)
    # gradients through every output, the output alone, h alone and c alone (None upstreams)
    picks = (lambda r: r[0].sum() + r[1].sin().sum() + r[2].cos().sum(), lambda r: r[0].sin().sum(),
             lambda r: r[1][0].sin().sum(), lambda r: r[2].sin().sum())
    for pick in picks:
        for a, b_ in zip(torch.autograd.grad(pick(ours()), [x, h, c, *weights], allow_unused=True),
                         torch.autograd.grad(pick(theirs), [x, h, c, *weights], retain_graph=True, allow_unused=True)):
            if a is None or b_ is None:
                assert (a is None or not a.any()) and (b_ is None or not b_.any())
            else:
                torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-13)
    leaves = [t.detach().requires_grad_(True) for wb in lopt._fused_weights() for t in wb]
    out_w, out_b = (t.detach().requires_grad_(True) for t in (lopt.output.weight, lopt.output.bias))
    assert torch.autograd.gradcheck(FusedLSTMStack.apply, (x, h, c, out_w, out_b, *leaves))
    # without x needing a gradient (first-order meta-training), the rest is unchanged
    a = torch.autograd.grad(ours(x.detach())[0].sum(), [h, c, *weights])
    b_ = torch.autograd.grad(ours(x)[0].sum(), [h, c, *weights])
    for u, v in zip(a, b_):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


def test_inplace_update_sees_weights_changed_in_place():
    # update_ caches its fused weights; a weight changed in place (meta-training, load_state_dict) must show
    lopt = _lstm(torch.float64, hidden_size=4)
    params = {"w": torch.zeros(6, dtype=torch.float64)}
    grads = {"w": torch.linspace(-1, 1, 6, dtype=torch.float64)}
    lopt.update_(grads, lopt.init(params), params)
    with torch.no_grad():
        lopt.cells[0].weight_hh.mul_(0.5)
        lopt.output.bias.add_(1.0)
    fast = lopt.update_(grads, lopt.init(params), params)
    with torch.no_grad():
        expected, _ = lopt.update(grads, lopt.init(params), params)
    torch.testing.assert_close(fast["w"], expected["w"], rtol=1e-12, atol=1e-14)


def test_inplace_update_rejects_a_state_of_another_size():
    lopt = _lstm(torch.float32, hidden_size=4)
    state = lopt.init({"w": torch.zeros(5)})
    with pytest.raises(ValueError, match="coordinates"):
        lopt.update_({"w": torch.zeros(6)}, state)


def _train(opt_factory, steps: int = 6) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = opt_factory(model)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("checkpoint", ["lstm_digits_mlp.pt", "lstm_quadratic.pt"])
def test_drop_in_step_uses_the_fast_path_and_matches_the_functional_one(checkpoint):
    path = CHECKPOINTS / checkpoint
    fast, fast_opt = _train(lambda m: learnopt.load_optimizer(path, m.parameters()))
    plain, plain_opt = _train(lambda m: learnopt.load_optimizer(path, m.parameters(), inplace_update=None))
    assert fast_opt.inplace_update is not None and plain_opt.inplace_update is None
    # float32: the two paths round differently (fused biases, tanh through σ) by ~1e-7, which
    # six steps of training amplify to a few 1e-6
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    for p, q in zip(fast_opt.param_groups[0]["params"], plain_opt.param_groups[0]["params"]):
        torch.testing.assert_close(fast_opt.state[p]["h"], plain_opt.state[q]["h"], rtol=1e-4, atol=2e-5)


def test_fast_path_state_dict_round_trip_does_not_share_the_callers_tensors():
    path = CHECKPOINTS / "lstm_quadratic.pt"
    _, opt = _train(lambda m: learnopt.load_optimizer(path, m.parameters()), steps=2)
    saved = opt.state_dict()
    tensors = [t for s in saved["state"].values() for t in s.values()]
    before = [t.clone() for t in tensors]
    opt.load_state_dict(saved)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()  # overwrites the optimizer's state in place
    for a, b in zip(tensors, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("second_order", [False, True])
def test_activation_checkpointing_gives_the_same_meta_gradient(second_order):
    family = QuadraticFamily(dim=4, dtype=torch.float64)
    results = []
    for checkpointing in (False, True):
        lopt = _lstm(torch.float64, hidden_size=6)
        est = TruncatedBPTT(family, num_tasks=3, unroll_length=4, horizon=8, second_order=second_order,
                            activation_checkpointing=checkpointing)
        state, run = None, []
        for _ in range(2):  # the second truncation starts from carried state
            e = est.estimate(lopt, state)
            state = e.unroll_state
            run.append(e)
        results.append(run)
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed.meta_loss, plain.meta_loss, rtol=1e-12, atol=0)
        for k, g in plain.meta_grads.items():
            assert g.abs().max() > 0
            torch.testing.assert_close(checkpointed.meta_grads[k], g, rtol=1e-10, atol=1e-14)


def test_activation_checkpointing_on_minibatched_mlps_with_full_bptt():
    # minibatches are drawn outside the checkpointed step, so recomputation sees the same data
    family = MLPFamily(hidden_sizes=(5,), batch_size=16)
    grads = []
    for checkpointing in (False, True):
        lopt = _lstm(torch.float32, hidden_size=6, preprocess="log_sign", output_scale=0.01)
        est = FullBPTT(family, num_tasks=2, horizon=5, activation_checkpointing=checkpointing)
        grads.append(est.estimate(lopt).meta_grads)
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_compiled_unroll_gives_the_same_meta_gradient():
    # inductor takes ~10 s even for this tiny optimizer, so one small case (a region of 3 steps)
    family = QuadraticFamily(dim=3, dtype=torch.float64)
    grads = []
    for compiled in (False, True):
        lopt = _lstm(torch.float64, hidden_size=4)
        est = TruncatedBPTT(family, num_tasks=2, unroll_length=3, horizon=6, compile_unroll=compiled, compile_chunk=3)
        grads.append(est.estimate(lopt).meta_grads)
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-9, atol=1e-12)
