"""Tests of ``learnopt.learned.general_compact`` (``CompactNormalizedOptimizer``: the reference
update, the eager and compiled drop-in paths) and of ``CompactLSTMOptimizer``.

References: the first step written out from the module docstring's formulas (explicit moments,
Adam's bias-corrected first step, per-tensor RMS normalization, explicit matmuls with the
module's weights); the same tensors run one instance at a time; the reference ``update`` for
``update_fast`` (eager and compiled); ``torch.nn.LSTMCell`` run by hand for the LSTM variant.
"""

from __future__ import annotations

import math

import pytest
import torch

import learnopt
from learnopt.checkpoint import export_checkpoint
from learnopt.learned import REGISTRY, CompactLSTMOptimizer, CompactNormalizedOptimizer, general_compact_kernels
from learnopt.learned.general_lstm import NormalizedLSTMOptimizer
from learnopt.learned.general_compact import warmup_cosine
from learnopt.learned.general_compact_fast import FAST_CHUNK
from conftest import assert_instances_independent

DT = torch.float64


def _lopt(seed: int = 0, **kw) -> CompactNormalizedOptimizer:
    torch.manual_seed(seed)
    kw.setdefault("output_init_scale", 1.0)  # a network that matters, not only the nominal term
    return CompactNormalizedOptimizer(**kw).double()


def _grads(params: dict, seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def test_schedule_closed_form():
    # warm-up over 5 of 100 steps, cosine from step 5 to 100 down to 0.1, held after
    assert warmup_cosine(0, 100, 0.05, 0.1) == pytest.approx(1 / 5)
    assert warmup_cosine(4, 100, 0.05, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(52.5, 100, 0.05, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 100, 0.05, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(10_000, 100, 0.05, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(7, None, 0.05, 0.1) == 1.0
    assert warmup_cosine(0, 100, 0.0, 0.0) == pytest.approx(1.0)


def test_first_step_matches_formulas_written_out():
    lopt = _lopt(hidden_size=3, momentum_decays=(0.5, 0.9), adam_decay=0.9, step_timescales=(2.0,),
                 num_steps=10, step_mult=0.02, warmup=0.2, final_ratio=0.1, magnitude_range=0.7)
    p = {"w": torch.randn(3, 4, dtype=DT)}
    g = {"w": torch.randn(3, 4, dtype=DT)}
    upd, state = lopt.update(g, lopt.init(p), p)

    gw = g["w"]
    m5, m9, v = 0.5 * gw, 0.1 * gw, 0.001 * gw * gw
    r = 1 / torch.sqrt(v / 0.001 + 1e-16)  # bias-corrected second moment at the first step: g²
    cols = [gw, m5, m9, r, m9 * r]
    cols = [x / torch.sqrt((x * x).mean() + 1e-24) for x in cols]
    progress = torch.tensor([math.tanh(0 / 2 - 1), -1.0, 1.0], dtype=DT)  # t = 0 of T = 10
    x = torch.stack(cols + [c.expand_as(gw) for c in progress], dim=-1)
    W1, b1 = lopt.layers[0].weight, lopt.layers[0].bias
    W2, b2 = lopt.layers[1].weight, lopt.layers[1].bias
    out = torch.relu(x @ W1.T + b1) @ W2.T + b2
    d = out[..., 0] + cols[4]
    d = d / torch.sqrt((d * d).mean())
    schedule = 1 / 2  # warm-up over 2 steps: step 0 takes half
    step = 0.02 * schedule * math.exp(0.7 * math.tanh(float(out[..., 1].mean().detach()))) * d
    torch.testing.assert_close(upd["w"], -step, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(state.momenta["w"], torch.stack([m5, m9]), rtol=1e-15, atol=0)
    assert int(state.count) == 1


def test_instances_do_not_mix_and_directions_have_unit_rms():
    lopt = _lopt(num_steps=7)
    p = {"w": torch.randn(2, 5, 3, dtype=DT), "b": torch.randn(2, 3, dtype=DT)}
    assert_instances_independent(lopt, p, [_grads(p, s) for s in range(3)])
    fixed = _lopt(num_steps=None, magnitude_range=0.0, step_mult=3e-3)
    u, _ = fixed.update(_grads(p, 5), fixed.init(p, batch_dims=1), p, batch_dims=1)
    for x in u.values():  # no schedule, no learned factor: every instance moves by RMS step_mult
        torch.testing.assert_close(x.pow(2).mean(dim=tuple(range(1, x.dim()))).sqrt(),
                                   torch.full((2,), 3e-3, dtype=DT), rtol=1e-9, atol=0)


def _run(lopt, params, steps, update):
    state, out = lopt.init(params), []
    for s in range(steps):
        state_copy = state
        u, state = update(_grads(params, s, scale=10.0 ** (s % 3 - 1)), state_copy, params)
        out.append({k: x.clone() for k, x in u.items()})
    return out, state


@pytest.mark.parametrize("cap", [None, 3.0])
def test_fast_path_equals_reference(cap):
    # tensors of one element, of fewer and of more than FAST_CHUNK elements, a scalar-like bias
    params = {"w": torch.randn(FAST_CHUNK + 1000, dtype=DT), "m": torch.randn(7, 5, dtype=DT),
              "b": torch.randn(1, dtype=DT)}
    lopt = _lopt(num_steps=4, max_amplification=cap)
    if cap is not None:
        lopt.amplification.data.fill_(0.02)  # the learned factor exp(0.2) enters both paths
    ref, ref_state = _run(lopt, params, 5, lopt.update)
    fast, fast_state = _run(lopt, params, 5, lopt.update_fast)
    for a, b in zip(ref, fast):
        for k in params:
            torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-15)
    for k in params:
        torch.testing.assert_close(fast_state.momenta[k], ref_state.momenta[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(fast_state.second_moment[k], ref_state.second_moment[k], rtol=1e-12, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, 3.0])
def test_compiled_path_equals_eager_and_checks_gradients(cap):
    if general_compact_kernels.compiled_kernels() is None:
        pytest.skip("torch.compile cannot build CPU kernels here")
    params = {"w": torch.randn(80, 70), "b": torch.randn(70)}  # one tensor compiled, one eager
    lopt = CompactNormalizedOptimizer(num_steps=4, output_init_scale=1.0, max_amplification=cap)
    eager, _ = _run(lopt, params, 4, lopt.update_fast)
    compiled, state = _run(lopt, params, 4, lambda g, s, p: lopt.update_fast(g, s, p, compiled=True))
    for a, b in zip(eager, compiled):
        for k in params:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-9)
    before = {k: x.clone() for k, x in state.momenta.items()}
    bad = {"w": torch.randn(80, 70), "b": torch.full((70,), float("nan"))}
    with pytest.raises(FloatingPointError, match="'b'"):
        lopt.update_fast(bad, state, params, compiled=True)
    assert all(torch.equal(state.momenta[k], before[k]) for k in params)  # nothing changed


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        def call(*args, **kwargs):
            raise RuntimeError("no backend")
        return call

    monkeypatch.setattr(general_compact_kernels, "_KERNELS", [])
    monkeypatch.setattr(general_compact_kernels.torch, "compile", broken)
    model = torch.nn.Linear(100, 60)
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    lopt = CompactNormalizedOptimizer(num_steps=10)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        opt = lopt.as_torch_optimizer(model.named_parameters(), compile=True)
        opt.step()
    assert opt.param_groups[0]["params"][0].isfinite().all()


def test_drop_in_trains_a_model_and_refuses_bad_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1)
    opt = CompactNormalizedOptimizer().as_torch_optimizer(model.named_parameters(), num_steps=100)
    with torch.no_grad():
        first = float(torch.nn.functional.mse_loss(model(x), y))
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert float(torch.nn.functional.mse_loss(model(x), y)) < 0.5 * first
    model[0].weight.grad.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="0.weight"):
        opt.step()


def test_amplification_cap_scales_each_tensor_by_adams_direction_rms():
    # the capped rule's update is the uncapped rule's (same weights) times min(1, cap · rms(m / sqrt(v̂))) per tensor
    # and instance, Adam's moments written out here; cap = 2 · exp(10 · 0.05)
    free = _lopt(num_steps=6, batch_dims=1)
    capped = _lopt(num_steps=6, batch_dims=1, max_amplification=2.0)
    capped.load_state_dict({**free.state_dict(), "amplification": torch.tensor(0.05, dtype=DT)})
    p = {"w": torch.randn(3, 6, 5, dtype=DT), "b": torch.randn(3, 5, dtype=DT)}
    sf, sc = free.init(p), capped.init(p)
    m = {k: torch.zeros_like(x) for k, x in p.items()}
    v = {k: torch.zeros_like(x) for k, x in p.items()}
    ratios = []
    for t in range(4):
        g = _grads(p, 0, scale=100.0)  # one direction: Adam's RMS grows from 0.1 to 0.34, the cap binds, then not
        uf, sf = free.update(g, sf, p)
        uc, sc = capped.update(g, sc, p)
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
            a = m[k] / torch.sqrt(v[k] / (1 - 0.999 ** (t + 1)) + 1e-16)
            rms = a.reshape(3, -1).pow(2).mean(dim=1).sqrt()
            factor = torch.clamp(2.0 * math.exp(0.5) * rms, max=1.0).view(3, *[1] * (a.dim() - 1))
            torch.testing.assert_close(uc[k], uf[k] * factor, rtol=1e-10, atol=1e-18)
            ratios += factor.flatten().tolist()
    assert min(ratios) < 0.9 and max(ratios) == 1.0  # the cap binds on some steps and not on others


def test_amplification_cap_starts_from_a_checkpoint_without_it(tmp_path):
    from learnopt.train.module import _load_initial_weights

    plain = _lopt(num_steps=5).float()
    path = export_checkpoint(plain, tmp_path / "plain.pt", {})
    assert learnopt.load(path).config()["max_amplification"] is None
    capped = CompactNormalizedOptimizer(num_steps=5, max_amplification=4.0)
    with pytest.warns(UserWarning, match="weights_from"):
        _load_initial_weights(capped, str(path))
    assert float(capped.amplification_cap().detach()) == 4.0
    assert all(torch.equal(capped.state_dict()[k], v) for k, v in plain.state_dict().items())
    with pytest.raises(ValueError, match="do not fit"):
        capped.weights_from(_lopt(num_steps=5, hidden_size=3))


def test_checkpoint_round_trip(tmp_path):
    lopt = _lopt(num_steps=30, batch_dims=1, max_amplification=4.0).float()
    lopt.amplification.data.fill_(-0.1)
    path = export_checkpoint(lopt, tmp_path / "compact.pt", {"note": "test"})
    loaded = learnopt.load(path)
    assert REGISTRY["CompactNormalizedOptimizer"] is CompactNormalizedOptimizer
    assert type(loaded) is CompactNormalizedOptimizer and loaded.config() == lopt.config()
    p = {"w": torch.randn(2, 4, 3)}
    g = _grads(p, 0)
    a, _ = lopt.update(g, lopt.init(p), p)
    b, _ = loaded.update(g, loaded.init(p), p)
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    ({"adam_decay": 0.5}, "adam_decay"),
    ({"adam_decay": None}, "nominal"),
    ({"warmup": 1.0}, "warmup"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"max_amplification": 0.0}, "max_amplification"),
    ({"max_amplification": float("inf")}, "max_amplification"),
    ({"max_amplification": 2.0, "adam_decay": None, "nominal": 0.0}, "max_amplification"),
])
def test_bad_configuration_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        CompactNormalizedOptimizer(**kw)


def test_lstm_variant_matches_lstm_cells_run_by_hand():
    torch.manual_seed(3)
    lopt = CompactLSTMOptimizer(hidden_size=5, num_layers=2, num_steps=6, output_init_scale=1.0).double()
    assert REGISTRY["CompactLSTMOptimizer"] is CompactLSTMOptimizer
    p = {"w": torch.randn(3, 2, dtype=DT), "b": torch.randn(2, dtype=DT)}
    reference = CompactNormalizedOptimizer(**{k: v for k, v in lopt.config().items() if k != "num_layers"}).double()
    state, ref_state = lopt.init(p), reference.init(p)
    h = [torch.zeros(8, 5, dtype=DT) for _ in range(2)]
    c = [torch.zeros(8, 5, dtype=DT) for _ in range(2)]
    for t in range(3):
        g = _grads(p, t)
        u, state = lopt.update(g, state, p)
        rows = reference.feature_rows(g, ref_state, 0)[0]
        _, ref_state = reference.update(g, ref_state, p)
        x = torch.cat([r.reshape(-1, reference.num_features) for r in rows.values()])
        x = torch.cat([x, torch.tensor(reference.progress(t, None), dtype=DT).expand(8, -1)], dim=-1)
        for i, cell in enumerate(lopt.cells):
            h[i], c[i] = cell(x, (h[i], c[i]))
            x = h[i]
        expected = reference.updates_from(lopt.readout(x), rows, t, None, 0)
        for k in p:
            torch.testing.assert_close(u[k], expected[k], rtol=1e-12, atol=1e-15)
    # the drop-in runs the LSTM's own update (update_fast is the MLP's)
    opt = lopt.as_torch_optimizer([("w", torch.nn.Parameter(p["w"].clone()))], num_steps=6)
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2, dtype=DT)
    opt.step()


def test_orthogonalized_drop_in_is_the_composition(monkeypatch):
    from learnopt.learned.general import orthogonalized_learned_optimizer
    from learnopt.optim.torch_optimizer import TransformOptimizer

    lopt = CompactNormalizedOptimizer(num_steps=10, output_init_scale=1.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    twin = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    twin.load_state_dict(model.state_dict())
    named = lambda m: [(k.replace("0.", "embed.", 1) if k.startswith("0.") else k, p)  # noqa: E731
                       for k, p in m.named_parameters()]
    fast_calls = []
    original = CompactNormalizedOptimizer.update_fast
    monkeypatch.setattr(CompactNormalizedOptimizer, "update_fast",
                        lambda self, *a, **k: fast_calls.append(1) or original(self, *a, **k))
    a = lopt.as_torch_optimizer(named(model), orthogonalize=True)
    b = TransformOptimizer(orthogonalized_learned_optimizer(lopt), named(twin))
    x, y = torch.tensor([0, 1, 2, 3]), torch.randn(4, 1)
    for _ in range(3):
        for m, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    assert len(fast_calls) == 3  # the drop-in ran update_fast, the twin the reference update
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="compile"):
        lopt.as_torch_optimizer(named(model), orthogonalize=True, compile=True)


@pytest.mark.parametrize("make", [
    lambda: CompactLSTMOptimizer(hidden_size=5, num_steps=10, output_init_scale=1.0),
    lambda: NormalizedLSTMOptimizer(hidden_size=5, num_steps=10, output_init_scale=1.0),
], ids=["compact", "normalized"])
def test_lstm_variants_load_as_drop_ins_equal_to_their_joint_update(make, tmp_path):
    torch.manual_seed(0)
    lopt = make()
    path = export_checkpoint(lopt, tmp_path / "lstm.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = learnopt.load_optimizer(path, model.named_parameters(), num_steps=10)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    state = lopt.init(params)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        updates, state = lopt.update(grads, state, params, num_steps=10)  # every tensor at once
        params = {k: params[k] + updates[k] for k in params}
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: CompactNormalizedOptimizer(adam_decay=None, nominal=0.0),
    lambda: CompactNormalizedOptimizer(normalize=False),
    lambda: CompactLSTMOptimizer(hidden_size=3),
], ids=["no_features", "no_normalization", "lstm"])
def test_compile_on_a_rule_without_the_fast_update_keeps_the_finite_guard(make):
    model = torch.nn.Linear(3, 2)
    opt = make().as_torch_optimizer(model.named_parameters(), num_steps=10, compile=True)
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    model.bias.grad = torch.zeros_like(model.bias)
    before = model.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="weight"):
        opt.step()
    assert torch.equal(model.weight, before)
