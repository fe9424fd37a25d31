"""Tests of ``learnopt.learned.general`` (the normalized per-parameter MLP rule and its
orthogonalized composition), ``learnopt.meta.augmentation``, ``tasks.group`` and the issue's
configs (the compact rule has its own tests, ``test_general_compact``).

References: the rule's first step written out from its formulas (moving averages, Adam's
bias-corrected first step, per-tensor normalisation, explicit matmuls with the module's
weights); the same tensors run one instance at a time; central finite differences of an
unrolled meta-loss; ``torch.optim.AdamW`` and the SVD's polar factor for the composition; the
wrapped task's own loss and autograd for the augmentation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import learnopt
from learnopt.checkpoint import export_checkpoint
from learnopt.learned import (
    REGISTRY,
    CompactLSTMOptimizer,
    CompactNormalizedOptimizer,
    NormalizedLSTMOptimizer,
    NormalizedMLPOptimizer,
)
from learnopt.learned.general import orthogonalized_learned_optimizer, progress_features
from learnopt.meta.augmentation import ReparameterizedFamily
from conftest import assert_instances_independent, partial_derivatives
from learnopt.optim import apply_updates
from learnopt.task import seeded_generator
from tasks.group import TaskGroupFamily
from tasks.mlp import MLPFamily
from tasks.quadratic import QuadraticFamily

DT = torch.float64
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "general.yaml"


def _lopt(seed: int = 0, **kw) -> NormalizedMLPOptimizer:
    torch.manual_seed(seed)
    return NormalizedMLPOptimizer(**kw).double()


def _params(seed: int = 1, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(*batch, 5, 3, generator=g, dtype=DT), "b": torch.randn(*batch, 3, generator=g, dtype=DT)}


# --------------------------------------------------------------------------- the rule


def test_features_registry_and_shapes():
    lopt = NormalizedMLPOptimizer(num_steps=100)
    # grad, param, 5 momenta, rsqrt, adam, sign, muon, 5 momentum*rsqrt, 6 timescales, 2 progress
    assert lopt.num_features == 2 + 5 + 1 + 3 + 5 + 6 + 2 == 24
    assert NormalizedMLPOptimizer().num_features == 22  # no run length: no progress columns
    assert REGISTRY["NormalizedMLPOptimizer"] is NormalizedMLPOptimizer
    p = _params(batch=(4,))
    lopt = _lopt(num_steps=10, batch_dims=1)
    state = lopt.init(p)
    updates, state = lopt.update({k: torch.randn_like(v) for k, v in p.items()}, state, p)
    assert {k: u.shape for k, u in updates.items()} == {k: v.shape for k, v in p.items()}
    assert all(u.dtype == DT for u in updates.values()) and int(state.count) == 1


@pytest.mark.parametrize("normalize", [True, False])
def test_first_step_matches_formulas_written_out(normalize):
    lopt = _lopt(hidden_sizes=(4,), momentum_decays=(0.5,), directions=("adam",), step_timescales=(),
                 num_steps=10, magnitude_range=0.7, output_init_scale=1.0, normalize=normalize)
    p = {"w": torch.randn(3, 4, dtype=DT)}
    g = {"w": torch.randn(3, 4, dtype=DT)}
    upd, _ = lopt.update(g, lopt.init(p), p)

    gw, pw = g["w"], p["w"]
    m, v = 0.5 * gw, 0.001 * gw * gw
    r = 1 / torch.sqrt(v + 1e-6)
    adam = gw / (gw.abs() + 1e-8)  # bias-corrected Adam at its first step
    cols = [gw, pw, m, r, adam, m * r]
    cols = [x / torch.sqrt((x * x).mean() + 1e-5) for x in cols]
    x = torch.stack(cols + [torch.full_like(gw, -1.0), torch.full_like(gw, 1.0)], dim=-1)  # progress at t=0
    W1, b1 = lopt.layers[0].weight, lopt.layers[0].bias
    W2, b2 = lopt.layers[1].weight, lopt.layers[1].bias
    out = torch.relu(x @ W1.T + b1) @ W2.T + b2
    d = out[..., 0] + cols[4]
    if normalize:
        d = d / torch.sqrt((d * d).mean())
    step = 1e-3 * math.exp(0.7 * math.tanh(float(out[..., 1].mean().detach()))) * d
    torch.testing.assert_close(upd["w"], -step, rtol=1e-9, atol=1e-15)


def test_direction_has_unit_rms_per_tensor_and_instance():
    lopt = _lopt(num_steps=20, batch_dims=1, output_init_scale=3.0)
    p = _params(batch=(3,))
    state = lopt.init(p)
    for _ in range(3):
        g = {k: torch.randn_like(v) * 10 ** torch.randn(()) for k, v in p.items()}
        d, scales, state = lopt.directions_and_scales(g, state, p, batch_dims=1)
        for k, x in d.items():
            rms = x.pow(2).mean(dim=tuple(range(1, x.dim()))).sqrt()
            torch.testing.assert_close(rms, torch.ones(3, dtype=DT), rtol=1e-9, atol=0)
            s = scales[k].reshape(-1)
            assert ((s >= 1e-3 / 10 - 1e-15) & (s <= 1e-3 * 10 + 1e-15)).all()  # within exp(±ln 10)


def test_fixed_step_gives_update_rms_step_mult():
    lopt = _lopt(magnitude_range=0.0, step_mult=2e-3, output_init_scale=2.0)
    p = _params()
    u, _ = lopt.update({k: torch.randn_like(v) for k, v in p.items()}, lopt.init(p), p)
    for x in u.values():
        assert float(x.detach().pow(2).mean().sqrt()) == pytest.approx(2e-3, rel=1e-9)


def test_instances_do_not_mix():
    lopt = _lopt(num_steps=7, output_init_scale=1.0)
    p = _params(batch=(2,))
    assert_instances_independent(lopt, p, [{k: torch.randn_like(v) for k, v in p.items()} for _ in range(3)])


def test_progress_features_closed_form():
    for t, T in ((0, 10), (5, 10), (10, 10), (40, 10)):
        f = min(t / T, 1.0)
        expected = torch.tensor([2 * f - 1, math.cos(math.pi * f)], dtype=DT)
        torch.testing.assert_close(progress_features(torch.tensor(t), T, DT), expected)


def test_num_steps_changes_the_update_only_through_progress():
    lopt = _lopt(num_steps=10, output_init_scale=1.0)
    p = _params()
    g = {k: torch.randn_like(v) for k, v in p.items()}
    state = lopt.init(p)
    for _ in range(3):
        _, state = lopt.update(g, state, p)
    same, _ = lopt.update(g, state, p, num_steps=10)
    default, _ = lopt.update(g, state, p)
    other, _ = lopt.update(g, state, p, num_steps=1000)
    torch.testing.assert_close(same, default, rtol=0, atol=0)
    assert not torch.allclose(other["w"], default["w"])


def test_meta_gradient_matches_finite_differences():
    lopt = _lopt(hidden_sizes=(6,), num_steps=4, output_init_scale=1.0, step_mult=0.05)
    target = torch.randn(4, 3, dtype=DT)

    def meta_loss() -> torch.Tensor:
        # the initial parameters do not depend on the weights; they need grad for the inner gradient
        p = {"w": torch.full((4, 3), 0.1, dtype=DT, requires_grad=True),
             "b": torch.ones(3, dtype=DT, requires_grad=True)}
        state = lopt.init(p)
        for _ in range(3):
            loss = ((p["w"] - target) ** 2).sum() + (p["b"] ** 4).sum()
            grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()), create_graph=True)))
            u, state = lopt.update(grads, state, p)
            p = apply_updates(p, u)
        return ((p["w"] - target) ** 2).sum() + (p["b"] ** 4).sum()

    weights = list(lopt.parameters())
    analytic = torch.autograd.grad(meta_loss(), weights)
    for i, (w, ga) in enumerate(zip(weights, analytic)):
        for j in range(0, w.numel(), max(1, w.numel() // 4)):
            idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(j), w.shape))
            (fd,) = partial_derivatives(meta_loss, weights, [(i, idx)]).tolist()
            assert float(ga.view(-1)[j]) == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_checkpoint_round_trip(tmp_path):
    lopt = _lopt(num_steps=30, batch_dims=1, output_init_scale=1.0).float()
    path = export_checkpoint(lopt, tmp_path / "general.pt", {"note": "test"})
    loaded = learnopt.load(path)
    assert type(loaded) is NormalizedMLPOptimizer and loaded.config() == lopt.config()
    assert loaded.checkpoint_metadata["note"] == "test"
    p = {k: v.float() for k, v in _params(batch=(2,)).items()}
    g = {k: torch.randn_like(v) for k, v in p.items()}
    a, _ = lopt.update(g, lopt.init(p), p)
    b, _ = loaded.update(g, loaded.init(p), p)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("name, value, match", [
    ("scale", torch.tensor(1.0), "no dimension"),
    ("z", torch.randn(3, dtype=torch.complex64), "complex"),
    ("emb", torch.eye(3).to_sparse(), "sparse"),
])
def test_bad_parameter_is_refused_naming_it(name, value, match):
    lopt = NormalizedMLPOptimizer()
    with pytest.raises(ValueError, match=match) as e:
        lopt.init({"ok": torch.ones(2), name: value})
    assert repr(name) in str(e.value)
    p = {"ok": torch.ones(2)}
    state = lopt.init(p)
    if name != "scale":  # a gradient of the wrong kind is refused as well
        with pytest.raises(ValueError, match=match):
            lopt.update({"ok": value if value.dim() == 1 else torch.ones(2).to_sparse()}, state, p)


def test_drop_in_trains_a_model_in_a_plain_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    lopt = NormalizedMLPOptimizer(num_steps=50, step_mult=1e-2)
    opt = lopt.as_torch_optimizer(model.named_parameters(), num_steps=50)
    first = float(torch.nn.functional.mse_loss(model(x), y))
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert float(torch.nn.functional.mse_loss(model(x), y)) < 0.8 * first


def test_drop_in_trains_a_model_in_a_lightning_trainer(in_tmp):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            lopt = NormalizedMLPOptimizer(num_steps=40, step_mult=1e-2)
            return lopt.as_torch_optimizer(self.named_parameters(), num_steps=40)

    model = Regression()
    first = float(torch.nn.functional.mse_loss(model.net(x), y))
    trainer = pl.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64))
    assert trainer.global_step == 40
    assert float(torch.nn.functional.mse_loss(model.net(x), y)) < 0.8 * first


# --------------------------------------------------------------------------- the LSTM ablation


def test_lstm_variant_matches_torch_lstm_over_the_feature_sequence():
    torch.manual_seed(3)
    lopt = NormalizedLSTMOptimizer(hidden_size=5, num_layers=2, num_steps=6, output_init_scale=1.0).double()
    p = _params()
    grads = [{k: torch.randn_like(v) for k, v in p.items()} for _ in range(3)]
    state, fstate, rows_seq, updates = lopt.init(p), lopt.init(p).features, [], []
    for g in grads:
        rows, fstate = lopt.feature_rows(g, fstate, p, batch_dims=0)
        rows_seq.append(rows)
        u, state = lopt.update(g, state, p)
        updates.append(u)
    # reference: torch.nn.LSTM over the sequence of feature rows, with the cells' weights
    ref = torch.nn.LSTM(lopt.num_features, 5, num_layers=2).double()
    with torch.no_grad():
        for i, cell in enumerate(lopt.cells):
            for a, b in (("weight_ih", cell.weight_ih), ("weight_hh", cell.weight_hh),
                         ("bias_ih", cell.bias_ih), ("bias_hh", cell.bias_hh)):
                getattr(ref, f"{a}_l{i}").copy_(b)
    seq = torch.stack([torch.cat([r.reshape(-1, lopt.num_features) for r in rows.values()]) for rows in rows_seq])
    out = lopt.readout(ref(seq)[0])
    for t in range(3):
        d, s = lopt.directions_from(out[t], rows_seq[t], batch_dims=0)
        for k in p:
            torch.testing.assert_close(updates[t][k], -s[k] * d[k], rtol=1e-10, atol=1e-14)


def test_lstm_variant_checkpoint_and_state_checks(tmp_path):
    lopt = NormalizedLSTMOptimizer(hidden_size=3, num_layers=1, num_steps=5, batch_dims=1)
    assert lopt.config()["hidden_size"] == 3 and "hidden_sizes" not in lopt.config()
    loaded = learnopt.load(export_checkpoint(lopt, tmp_path / "lstm.pt"))
    assert type(loaded) is NormalizedLSTMOptimizer and loaded.config() == lopt.config()
    p = {k: v.float() for k, v in _params(batch=(2,)).items()}
    state = lopt.init(p)
    with pytest.raises(ValueError, match="coordinates"):
        lopt.update({"w": torch.ones_like(p["w"])}, state, {"w": p["w"]})
    with pytest.raises(TypeError, match="hidden_sizes"):
        NormalizedLSTMOptimizer(hidden_sizes=(4,))


# --------------------------------------------------------------------------- composition


def test_orthogonalized_composition_routes_matrices_and_vectors():
    lopt = _lopt(num_steps=5, output_init_scale=1.0)
    tx = orthogonalized_learned_optimizer(lopt, lr=1.0, adamw_lr=1e-2, adamw_weight_decay=0.1)
    p = {"w": torch.randn(6, 4, dtype=DT), "b": torch.randn(4, dtype=DT), "embed.weight": torch.randn(5, 4, dtype=DT)}
    g = {k: torch.randn_like(v) for k, v in p.items()}
    u, _ = tx.update(g, tx.init(p), p)

    # hidden matrix: the learned update's polar factor (SVD), at the learned update's RMS
    learned, _ = lopt.update({"w": g["w"]}, lopt.init({"w": p["w"]}), {"w": p["w"]})
    U, _, Vh = torch.linalg.svd(learned["w"], full_matrices=False)
    polar = U @ Vh
    cos = float((u["w"] * polar).sum().detach() / (u["w"].detach().norm() * polar.detach().norm()))
    assert cos > 0.97  # Newton-Schulz is approximate: singular values in roughly [0.7, 1.2]
    rms = float(learned["w"].detach().pow(2).mean().sqrt())
    assert float(u["w"].detach().pow(2).mean().sqrt()) == pytest.approx(rms, rel=1e-9)

    # vector and embedding: torch.optim.AdamW's first step
    for k in ("b", "embed.weight"):
        t = p[k].clone().requires_grad_(True)
        ref = torch.optim.AdamW([t], lr=1e-2, weight_decay=0.1)
        t.grad = g[k].clone()
        ref.step()
        torch.testing.assert_close(p[k] + u[k], t.detach(), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- augmentation


def test_reparameterised_loss_and_gradient():
    family = ReparameterizedFamily(QuadraticFamily(4, dtype=DT), scale_range=(0.1, 10.0), level="tensor")
    gen = seeded_generator("test", 0)
    task = family.sample(3, gen)
    theta = task.task.init(seeded_generator("init", 0))
    s = task.scales(theta)
    seen = {k: (v / s[k]).requires_grad_(True) for k, v in theta.items()}   # what the optimizer sees
    theta = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    loss_seen, loss_true = task.loss(seen), task.task.loss(theta)
    torch.testing.assert_close(loss_seen, loss_true, rtol=1e-12, atol=1e-12)
    g_seen = torch.autograd.grad(loss_seen.sum(), list(seen.values()))
    g_true = torch.autograd.grad(loss_true.sum(), list(theta.values()))
    for k, a, b in zip(seen, g_seen, g_true):
        torch.testing.assert_close(a, s[k] * b, rtol=1e-12, atol=1e-12)
    # scales: one per instance, in range, not all equal, reproducible
    for k, x in s.items():
        assert x.shape == (3,) + (1,) * (theta[k].dim() - 1)
        assert ((x >= 0.1) & (x <= 10.0)).all() and x.unique().numel() == 3
    again = family.sample(3, seeded_generator("test", 0))
    for k in s:
        torch.testing.assert_close(again.scales(theta)[k], s[k], rtol=0, atol=0)
    # init is the wrapped task's initialisation divided by s
    init = task.init(seeded_generator("init", 0))
    for k, v in task.task.init(seeded_generator("init", 0)).items():
        torch.testing.assert_close(init[k] * s[k], v, rtol=1e-12, atol=0)


def test_global_level_shares_one_scale_across_tensors():
    family = ReparameterizedFamily(MLPFamily("digits", (8,), "relu"), scale_range=(0.5, 2.0), level="global")
    task = family.sample(2, seeded_generator("g", 1))
    s = task.scales(task.init(seeded_generator("g", 2)))
    first = s["w0"].reshape(-1)
    for x in s.values():
        torch.testing.assert_close(x.reshape(-1), first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale_range"):
        ReparameterizedFamily(QuadraticFamily(2), scale_range=(0.0, 1.0))


def test_task_group_concatenates_members():
    members = [MLPFamily("digits", (8,), "relu"), MLPFamily("mnist1d", (4, 4), "tanh")]
    group = TaskGroupFamily(members).sample(5, seeded_generator("grp", 0))
    assert [t.num_instances for t in group.tasks] == [3, 2] and group.num_instances == 5
    params = group.init(seeded_generator("grp", 1))
    batch = group.sample_batch(seeded_generator("grp", 2))
    loss = group.loss(params, batch)
    parts = [{k.split("/", 1)[1]: v for k, v in params.items() if k.startswith(f"{i}/")} for i in range(2)]
    expected = torch.cat([t.loss(q, b) for t, q, b in zip(group.tasks, parts, batch)])
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(group.full_loss(params), torch.cat([t.full_loss(q) for t, q in zip(group.tasks, parts)]))
    with pytest.raises(ValueError, match="at least one instance per family"):
        TaskGroupFamily(members).sample(1)


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize("name", ["general", "general_no_features", "general_no_normalization", "general_lstm"])
def test_config_runs_end_to_end(in_tmp, name):
    from learnopt.train.cli import meta_train

    cli = meta_train([
        "--config", str(CONFIG.with_name(f"{name}.yaml")), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--model.estimator.num_tasks", "2", "--model.val_tasks", "2", "--model.estimator.horizon", "4",
        "--model.estimator.num_pairs", "1",
        "--model.estimator.schedule.low", "1", "--model.estimator.schedule.high", "2",
        "--model.learned_optimizer.init_args.num_steps", "4",
    ])
    assert cli.trainer.global_step == 2
    lopt = learnopt.load(in_tmp / f"runs/{name}/{name}.pt")
    assert isinstance(lopt, CompactNormalizedOptimizer) and lopt.batch_dims == 1 and lopt.num_steps == 4
    assert isinstance(lopt, CompactLSTMOptimizer) == (name == "general_lstm")
    assert lopt.normalize == (name != "general_no_normalization")
    assert ("adam" in lopt.feature_names) == (name != "general_no_features")
    assert (in_tmp / f"runs/{name}/lightning/last.ckpt").exists()
