"""VSML learners (learnopt.vsml), online episodes and their task families (tasks/online.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import learnopt
from learnopt.meta.episodic import EpisodicBPTT, EpisodicES
from learnopt.task import haar_orthogonal
from learnopt.vsml import BlackBoxOnlineLSTM, OnlineLinear, VSMLNetwork, online_episode
from learnopt.vsml.clone import clone_loss, start_streams, teacher_logits, teacher_learning_rate
from tasks.online import OnlineClassificationFamily, SGDCloneFamily

VARIANTS = [
    dict(),
    dict(reverse_pass=False),
    dict(label_feedback=False),
    dict(hidden_sizes=[3], micro_ticks=1),
    dict(hidden_sizes=[4, 3], reverse_pass=False, micro_ticks=3),
    dict(bias_input=True),
    dict(hidden_sizes=[3], bias_input=True, reverse_pass=False),
    dict(rotate_inputs=True, reverse_pass=False),
    dict(hidden_sizes=[3], rotate_inputs=True, input_copies=2),
    dict(rotate_inputs=True, ensemble=2),
]


def test_rotated_inputs_are_the_plain_network_on_rotated_features():
    torch.manual_seed(0)
    plain = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2)
    rotating = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2, rotate_inputs=True)
    rotating.load_state_dict(plain.state_dict())
    E, T, A, C = 3, 10, 5, 4
    x, y = torch.randn(E, T, A), torch.randint(0, C, (E, T))
    q = rotating.init_state(E, A, C, torch.Generator().manual_seed(1)).rotation
    eye = torch.eye(A).expand(E, A, A)
    assert q.shape == (E, A, A) and torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-5)
    assert not torch.allclose(q[0], q[1])  # one rotation per episode
    got = online_episode(rotating, x, y, C, torch.Generator().manual_seed(1))
    want = online_episode(plain, x @ q, y, C, torch.Generator().manual_seed(1))
    assert torch.allclose(got, want, atol=1e-5)
    # Haar: the entries of a random rotation have mean 0 and variance 1/A
    big = rotating.init_state(400, A, C, torch.Generator().manual_seed(2)).rotation
    assert abs(float(big.mean())) < 0.01 and abs(float(big.var()) - 1 / A) < 0.01
    assert VSMLNetwork().init_state(2, A, C).rotation is None


def test_input_copies_are_the_plain_network_on_concatenated_rotations():
    # K copies: the plain network (same shared weights) on [x Q_1, ..., x Q_K], K*A input units
    torch.manual_seed(0)
    plain = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2)
    copies = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2, rotate_inputs=True, input_copies=3)
    copies.load_state_dict(plain.state_dict())
    E, T, A, C = 2, 8, 4, 3
    x, y = torch.randn(E, T, A), torch.randint(0, C, (E, T))
    state = copies.init_state(E, A, C, torch.Generator().manual_seed(1))
    q = state.rotation
    assert q.shape == (E, A, 3 * A) and state.layers[0].h.shape[1:3] == (3 * A, C)
    for k in range(3):  # each copy is its own rotation
        block = q[:, :, k * A:(k + 1) * A]
        assert torch.allclose(block.transpose(1, 2) @ block, torch.eye(A).expand(E, A, A), atol=1e-5)
    assert not torch.allclose(q[:, :, :A], q[:, :, A:2 * A])
    got = online_episode(copies, x, y, C, torch.Generator().manual_seed(1))
    want = online_episode(plain, x @ q, y, C, torch.Generator().manual_seed(1))
    assert torch.allclose(got, want, atol=1e-5)
    # one copy draws exactly what rotate_inputs drew before copies existed (the layer's initial
    # state, then one Haar rotation), so committed learners see the same rotations as before
    one = VSMLNetwork(state_size=6, message_size=3, rotate_inputs=True)
    g = torch.Generator().manual_seed(2)
    one.layers[0].init_state(E, A, C, g, torch.device("cpu"), torch.float32)
    before = haar_orthogonal(E, n=A, generator=g, dtype=torch.float64).float()
    assert torch.equal(one.init_state(E, A, C, torch.Generator().manual_seed(2)).rotation, before)
    assert copies.config()["input_copies"] == 3 and VSMLNetwork(**copies.config()).input_copies == 3
    with pytest.raises(ValueError, match="input_copies > 1 needs rotate_inputs"):
        VSMLNetwork(input_copies=2)
    with pytest.raises(ValueError, match="input_copies must be an integer >= 1"):
        VSMLNetwork(rotate_inputs=True, input_copies=0)


def test_ensemble_averages_the_probabilities_of_independent_members():
    # R members: the single network on each episode repeated R times (same draws, each member fed
    # its own error), probabilities averaged over the members by hand
    torch.manual_seed(0)
    for extra in (dict(), dict(rotate_inputs=True, input_copies=2), dict(hidden_sizes=[3], reverse_pass=False)):
        single = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2, **extra)
        ens = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2, ensemble=3, **extra)
        ens.load_state_dict(single.state_dict())
        E, T, A, C, R = 2, 9, 4, 3, 3
        x, y = torch.randn(E, T, A), torch.randint(0, C, (E, T))
        got = online_episode(ens, x, y, C, torch.Generator().manual_seed(1))
        members = online_episode(single, x.repeat_interleave(R, 0), y.repeat_interleave(R, 0), C,
                                 torch.Generator().manual_seed(1))
        want = members.softmax(-1).unflatten(0, (E, R)).mean(1)
        assert got.shape == (E, T, C) and torch.allclose(got.exp(), want, atol=1e-5)
        # the members differ (own draws), so the average is not any one of them
        assert not torch.allclose(members[0], members[1], atol=1e-3)
    assert ens.config()["ensemble"] == 3 and VSMLNetwork(**ens.config()).ensemble == 3
    assert learnopt.load("checkpoints/vsml_meta_stage1.pt").ensemble == 1  # saved before the option existed
    with pytest.raises(ValueError, match="ensemble must be an integer >= 1"):
        VSMLNetwork(ensemble=0)


def test_bias_input_is_a_constant_input_unit():
    # one layer with the bias unit is the same network fed [x, 1] without it
    torch.manual_seed(0)
    plain = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2)
    biased = VSMLNetwork(state_size=6, message_size=3, micro_ticks=2, bias_input=True)
    biased.load_state_dict(plain.state_dict())
    x, y = torch.randn(3, 12, 5), torch.randint(0, 4, (3, 12))
    ones = torch.ones(3, 12, 1)
    got = online_episode(biased, x, y, 4, torch.Generator().manual_seed(1))
    want = online_episode(plain, torch.cat([x, ones], -1), y, 4, torch.Generator().manual_seed(1))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, online_episode(plain, x, y, 4, torch.Generator().manual_seed(1)), atol=1e-3)
    stacked = VSMLNetwork(hidden_sizes=[3], state_size=6, message_size=3, bias_input=True)
    assert [tuple(s.h.shape[1:3]) for s in stacked.init_state(2, 5, 4).layers] == [(6, 3), (4, 4)]


def test_layer_tick_is_one_shared_lstm_cell_per_weight():
    """Every sub-LSTM (e, a, b) is torch.nn.LSTMCell with the shared weights, reading
    [forward message of a, backward message of b]; messages are means over the other side."""
    torch.manual_seed(0)
    layer = VSMLNetwork(state_size=6, message_size=4).layers[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    E, A, B, H, M = 2, 3, 4, 6, 4
    state = layer.init_state(E, A, B, torch.Generator().manual_seed(1))
    state = state._replace(h=torch.randn(E, A, B, H))
    fwd, bwd = torch.randn(E, A, M), torch.randn(E, B, M)
    new, out_f, out_b = layer.tick(state, fwd, bwd)

    cell = nn.LSTMCell(2 * M, H)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([layer.w_forward, layer.w_backward]).T)
        cell.weight_hh.copy_(layer.w_hidden.T)
        cell.bias_ih.copy_(layer.bias)
        cell.bias_hh.zero_()
    for e in range(E):
        for a in range(A):
            for b in range(B):
                h, c = cell(torch.cat([fwd[e, a], bwd[e, b]])[None], (state.h[e, a, b][None], state.c[e, a, b][None]))
                torch.testing.assert_close(new.h[e, a, b], h[0])
                torch.testing.assert_close(new.c[e, a, b], c[0])
    torch.testing.assert_close(out_f, (new.h @ layer.out_forward).mean(1))
    torch.testing.assert_close(out_b, (new.h @ layer.out_backward).mean(2))


def test_initialisation_follows_the_papers_code():
    layer = VSMLNetwork(state_size=16).layers[0]
    H = 16
    assert torch.all(layer.bias[:H] == -5) and torch.all(layer.bias[H:2 * H] == 5)
    assert torch.all(layer.bias[2 * H:] == 0)
    A = 100
    state = layer.init_state(4, A, 50, torch.Generator().manual_seed(0))
    assert torch.all(state.h == 0) and torch.all(state.c[..., H // 2:] == 0)
    std = float(state.c[..., : H // 2].std())
    assert abs(std - 1 / math.sqrt(A)) < 0.02 / math.sqrt(A) * 5
    bound = 2 / math.sqrt(16 + H)  # truncated normal at two standard deviations
    assert float(layer.w_hidden.detach().abs().max()) <= bound + 1e-6


@pytest.mark.parametrize("options", VARIANTS)
def test_predictions_are_made_before_the_label_is_seen(options):
    torch.manual_seed(0)
    net = VSMLNetwork(state_size=8, message_size=4, **options)
    with torch.no_grad():  # make every path carry signal
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(2, 6, 5), torch.randint(0, 3, (2, 6))
    base = online_episode(net, x, y, 3, torch.Generator().manual_seed(0))
    y2 = y.clone()
    y2[:, 2] = (y[:, 2] + 1) % 3
    changed = online_episode(net, x, y2, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(base[:, :3], changed[:, :3])  # steps 0..2 predicted before y[2]
    later = 3 if options.get("reverse_pass", True) else 3 + len(options.get("hidden_sizes", []))
    assert not torch.allclose(base[:, later:], changed[:, later:])  # the label did reach the learner


def test_any_input_size_and_class_count_with_one_set_of_parameters():
    net = VSMLNetwork(hidden_sizes=[4], micro_ticks=1)
    n_params = sum(p.numel() for p in net.parameters())
    for features, classes in [(3, 2), (17, 7), (64, 10)]:
        preds = net.online(torch.randn(12, features), torch.randint(0, classes, (12,)), num_classes=classes)
        assert preds.shape == (12,) and preds.dtype == torch.int64 and int(preds.max()) < classes
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_online_rejects_bad_input_clearly():
    net = VSMLNetwork()
    with pytest.raises(ValueError, match="examples, features"):
        net.online(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        net.online(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4]), num_classes=3)
    with pytest.raises(ValueError, match="class indices"):
        net.online(torch.randn(3, 3), torch.tensor([0.5, 1.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        net.online(torch.full((3, 3), float("nan")), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="micro_ticks"):
        VSMLNetwork(micro_ticks=0)


@pytest.mark.parametrize("name,torch_opt,kwargs", [("sgd", torch.optim.SGD, dict(lr=0.3)),
                                                   ("adam", torch.optim.Adam, dict(lr=0.05))])
def test_online_linear_baseline_matches_torch_optim(name, torch_opt, kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(1, 30, 6), torch.randint(0, 4, (1, 30))
    logits = online_episode(OnlineLinear(name, **kwargs), x, y, 4)
    model = nn.Linear(6, 4)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    opt = torch_opt(model.parameters(), **kwargs)
    for t in range(30):
        z = model(x[0, t])
        torch.testing.assert_close(logits[0, t], z.detach(), atol=1e-5, rtol=1e-5)
        opt.zero_grad()
        nn.functional.cross_entropy(z[None], y[0, t][None]).backward()
        opt.step()


def test_clone_teacher_is_plain_sgd_at_the_stated_rate():
    """gain·mean_a(w x) with w ← w − lr·x·δ is SGD on z = V x (V = gain·W/A) at gain·lr/A."""
    torch.manual_seed(0)
    A, B, lr, gain = 7, 3, 0.1, 8.0
    w, x, y = torch.randn(1, A, B), torch.randn(1, A), torch.tensor([2])
    delta = torch.softmax(teacher_logits(w, x, gain), -1) - nn.functional.one_hot(y, B)
    new_w = w - lr * x.unsqueeze(-1) * delta.unsqueeze(1)
    V = (gain * w[0] / A).T.clone().requires_grad_(True)
    nn.functional.cross_entropy((V @ x[0])[None], y).backward()
    with torch.no_grad():
        V -= teacher_learning_rate(lr, gain, A) * V.grad
    torch.testing.assert_close(gain * new_w[0] / A, V.T)


def test_clone_loss_starts_from_the_encoded_weights_and_is_differentiable():
    net = VSMLNetwork(state_size=8, message_size=4, micro_ticks=1)
    stream = start_streams(net, 2, 5, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(stream.teacher_w, stream.layer.c[..., 0])  # readout starts at e_0
    x, y = torch.rand(2, 6, 5), torch.randint(0, 3, (2, 6))
    loss, metrics = clone_loss(net, x, y, 3, 0.1, 4.0, torch.Generator().manual_seed(0), burn_in=2)
    loss.backward()
    assert set(metrics) == {"clone_forward", "clone_backward", "clone_weight"}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="single VSML layer"):
        start_streams(VSMLNetwork(hidden_sizes=[2]), 1, 2, 2)


def test_episode_family_draws_class_subsets_and_projections():
    fam = OnlineClassificationFamily(datasets=["digits"], episode_length=40, num_features=9, min_classes=3,
                                     max_classes=4)
    x, y, C = fam.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 40, 9) and y.shape == (5, 40) and C in (3, 4)
    assert int(y.min()) >= 0 and int(y.max()) < C
    assert not torch.allclose(x[0], x[1])  # each episode has its own projection and examples
    perm = OnlineClassificationFamily(datasets=["iris"], projection="permutation", min_classes=2, max_classes=3)
    x, y, C = perm.sample(2, torch.Generator().manual_seed(0))
    assert x.shape[-1] == 4
    with pytest.raises(ValueError, match="projection"):
        OnlineClassificationFamily(projection="rotate")
    with pytest.raises(ValueError, match="projection"):
        OnlineClassificationFamily(projection=[])


def test_subset_projection_keeps_raw_features_and_a_list_draws_one_per_call():
    from tasks.online import dataset_arrays

    data_x, _ = dataset_arrays("wine", "train")
    fam = OnlineClassificationFamily(datasets=["wine"], projection="subset", num_features=5, max_classes=3,
                                     episode_length=30)
    x, _, _ = fam.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 30, 5)
    for xe in x:  # each column of the episode is one of the 13 raw columns
        for j in range(5):
            assert any(bool(torch.isin(xe[:, j], data_x[:, c]).all()) for c in range(13))
    mixed = OnlineClassificationFamily(datasets=["wine"], projection=["gaussian", "subset"], num_features=5,
                                       max_classes=3, episode_length=10)
    raw = []
    for k in range(12):
        x, _, _ = mixed.sample(1, torch.Generator().manual_seed(k))
        raw.append(bool(torch.isin(x[0, 0], data_x).all()))
    assert any(raw) and not all(raw)
    ranged = OnlineClassificationFamily(datasets=["digits"], num_features=[3, 6], max_classes=3, episode_length=5)
    sizes = {ranged.sample(2, torch.Generator().manual_seed(k))[0].shape[-1] for k in range(30)}
    assert sizes == {3, 4, 5, 6}
    for bad in ([0, 4], [5, 4], [1, 2, 3]):
        with pytest.raises(ValueError, match="num_features"):
            OnlineClassificationFamily(num_features=bad)


def test_imbalanced_streams_draw_class_proportions_from_a_dirichlet():
    from tasks.online import _gamma, dataset_arrays

    g = torch.Generator().manual_seed(0)
    alpha = torch.tensor([0.3, 1.0, 4.0])
    draws = torch.stack([_gamma(alpha, g) for _ in range(4000)])
    # Gamma(α, 1): mean α, variance α
    assert torch.allclose(draws.mean(0), alpha, rtol=0.08)
    assert torch.allclose(draws.var(0), alpha, rtol=0.15)
    fam = OnlineClassificationFamily(datasets=["iris"], projection="none", episode_length=60, min_classes=2,
                                     max_classes=2, class_concentration=1.0)
    data_x, data_y = dataset_arrays("iris", "train")
    shares = []
    for k in range(40):
        x, y, C = fam.sample(4, torch.Generator().manual_seed(k))
        assert C == 2 and x.shape == (4, 60, 4)
        for xe, ye in zip(x, y):
            # every example is a real row of the dataset, and one class maps to one label
            rows = (xe[:, None, :] == data_x[None]).all(-1).float().argmax(1)
            assert torch.equal(data_x[rows], xe)
            for label in range(C):
                assert len(data_y[rows[ye == label]].unique()) <= 1
            shares.append(float((ye == 0).float().mean()))
    shares = torch.tensor(shares)
    # Dirichlet(1, 1): the share of a class is uniform on [0, 1] (variance 1/12), where drawing
    # from the pool of two balanced iris classes gives shares near 1/2 (variance ≈ 1/240).
    assert abs(float(shares.mean()) - 0.5) < 0.06 and abs(float(shares.var()) - 1 / 12) < 0.025
    balanced = OnlineClassificationFamily(datasets=["iris"], projection="none", episode_length=60, max_classes=2)
    even = torch.tensor([float((balanced.sample(1, torch.Generator().manual_seed(k))[1] == 0).float().mean())
                         for k in range(40)])
    assert float(even.var()) < 0.01
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="class_concentration"):
            OnlineClassificationFamily(class_concentration=bad)


def test_gaussian_class_tasks_have_the_documented_moments_and_separation():
    from scipy.stats import norm

    F, s, T = 6, 2.0, 4000
    fam = OnlineClassificationFamily(datasets=["gaussian_classes"], projection="none", episode_length=T,
                                     min_classes=2, max_classes=2, synthetic_features=F, synthetic_separation=(s, s))
    ratios = []
    for k in range(60):
        x, y, C = fam.sample(1, torch.Generator().manual_seed(k))
        x, y = x[0].double(), y[0]
        assert C == 2 and x.shape == (T, F)
        # standardised with the task's exact moments under balanced classes
        assert x.mean(0).abs().max() < 0.15 and (x.var(0) - 1).abs().max() < 0.15
        m0, m1 = x[y == 0].mean(0), x[y == 1].mean(0)
        pooled = torch.cov(torch.cat([x[y == 0] - m0, x[y == 1] - m1]).T)
        w = torch.linalg.solve(pooled, m1 - m0)
        d = float((m1 - m0) @ w).__pow__(0.5)  # Mahalanobis distance between the classes
        ratios.append(d * d / (2 * s * s))
        # Gaussian classes with a shared covariance: the LDA rule's accuracy is Φ(d / 2)
        lda = ((x - (m0 + m1) / 2) @ w > 0).long()
        assert abs(float((lda == y).double().mean()) - norm.cdf(d / 2)) < 0.03
    # E‖m_a − m_b‖² = 2 with m ~ N(0, I/F): distance² ≈ 2 s² on average (a χ²_F / F spread)
    assert abs(sum(ratios) / len(ratios) - 1) < 0.15
    # skewed marginals: a monotone map of each feature of the same task, standardised again
    skewed = OnlineClassificationFamily(datasets=["gaussian_classes"], projection="none", episode_length=T,
                                        min_classes=2, max_classes=2, synthetic_features=F,
                                        synthetic_separation=(s, s), synthetic_skew=1.0)
    for k in range(10):
        x, y, _ = fam.sample(1, torch.Generator().manual_seed(k))
        xs, ys, _ = skewed.sample(1, torch.Generator().manual_seed(k))
        assert torch.equal(y, ys)
        order = x[0].argsort(0)  # each feature non-decreasing in the unskewed one (float32 ties aside)
        assert (xs[0].gather(0, order).diff(dim=0) > -1e-5).all()
        xs = xs[0].double()
        assert xs.mean(0).abs().max() < 0.2 and (xs.var(0) - 1).abs().max() < 0.3
        skewness = ((xs - xs.mean(0)) ** 3).mean(0) / xs.var(0) ** 1.5
        assert skewness.abs().max() > 0.5  # k ~ U[-1, 1]: some feature is clearly skewed
    mixed = OnlineClassificationFamily(datasets=["digits", "gaussian_classes"], projection=["gaussian", "subset"],
                                       num_features=5, max_classes=4, class_concentration=1.0, episode_length=30)
    for k in range(20):
        x, y, C = mixed.sample(3, torch.Generator().manual_seed(k))
        assert x.shape == (3, 30, 5) and int(y.max()) < C and torch.isfinite(x).all()
    for bad in (dict(synthetic_features=0), dict(synthetic_separation=(0.0, 1.0)),
                dict(synthetic_separation=(2.0, 1.0)), dict(synthetic_skew=-1.0)):
        with pytest.raises(ValueError, match="synthetic"):
            OnlineClassificationFamily(datasets=["gaussian_classes"], **bad)


def test_meta_training_can_start_from_an_exported_learner(tmp_path):
    from learnopt.checkpoint import CheckpointError
    from learnopt.train.module import MetaTrainModule

    fam = OnlineClassificationFamily(datasets=["iris"], episode_length=8, num_features=3, max_classes=3)
    source = VSMLNetwork(state_size=4, message_size=2, micro_ticks=1)
    path = learnopt.export_checkpoint(source, tmp_path / "start.pt")
    net = VSMLNetwork(state_size=4, message_size=2, micro_ticks=1)
    assert not torch.equal(net.layers[0].w_forward, source.layers[0].w_forward)
    MetaTrainModule(net, fam, init_from=str(path))
    for a, b in zip(net.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="do not fit.*w_forward.*state_size"):
        MetaTrainModule(VSMLNetwork(state_size=6, message_size=2, micro_ticks=1), fam, init_from=str(path))
    biased = VSMLNetwork(state_size=4, message_size=2, micro_ticks=1, bias_input=True)
    with pytest.warns(UserWarning, match="bias_input"):
        MetaTrainModule(biased, fam, init_from=str(path))
    assert torch.equal(biased.layers[0].w_hidden, source.layers[0].w_hidden)
    with pytest.raises(CheckpointError, match="holds a VSMLNetwork"):
        MetaTrainModule(BlackBoxOnlineLSTM(num_features=3, num_classes=3, hidden_size=4), fam,
                        init_from=str(path))


def test_bptt_meta_gradient_matches_finite_differences():
    from learnopt.task import seeded_generator

    net = VSMLNetwork(state_size=4, message_size=2, micro_ticks=1).double()
    fam = OnlineClassificationFamily(datasets=["iris"], episode_length=6, num_features=3, max_classes=3)
    # the estimator's first episode batch is drawn from the seed stream ("train", seed, 0)
    fam_loss = lambda: fam.meta_loss(net, 2, seeded_generator("train", 0, 0))[0]
    grad = EpisodicBPTT(fam, 2).estimate(net).meta_grads["layers.0.w_backward"][0, 3]
    with torch.no_grad():
        p = net.layers[0].w_backward
        p[0, 3] += 1e-6
        up = float(fam_loss())
        p[0, 3] -= 2e-6
        down = float(fam_loss())
        p[0, 3] += 1e-6
    assert abs(grad) > 1e-8
    assert abs(float(grad) - (up - down) / 2e-6) < 1e-7 + 1e-4 * abs(float(grad))


def test_shell_meta_trains_vsml_by_bptt_and_es(tmp_path):
    import lightning.pytorch as pl

    from learnopt.train.module import MetaTrainModule

    fam = OnlineClassificationFamily(datasets=["iris"], episode_length=8, num_features=3, max_classes=3,
                                     val_episodes=8)
    for estimator in (EpisodicBPTT(num_episodes=2), EpisodicES(num_episodes=2, num_pairs=2, sigma=0.05)):
        net = VSMLNetwork(state_size=4, message_size=2, micro_ticks=1)
        before = [p.detach().clone() for p in net.parameters()]
        module = MetaTrainModule(net, fam, estimator, meta_lr=0.01)
        assert module.monitor_key == "val/online_ce"
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module)
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        assert math.isfinite(module.validation_score())


def test_checkpoint_round_trip_and_user_api(tmp_path):
    net = VSMLNetwork(hidden_sizes=[3], micro_ticks=1, reverse_pass=False)
    path = learnopt.export_checkpoint(net, tmp_path / "vsml.pt", {"note": "test"})
    loaded = learnopt.load(path)
    assert isinstance(loaded, VSMLNetwork) and loaded.config() == net.config()
    x, y = torch.randn(20, 11), torch.randint(0, 4, (20,))
    assert torch.equal(loaded.online(x, y), net.online(x, y))
    assert loaded.checkpoint_metadata["note"] == "test"
    bb = BlackBoxOnlineLSTM(num_features=5, num_classes=3, hidden_size=8)
    assert isinstance(learnopt.load(learnopt.export_checkpoint(bb, tmp_path / "bb.pt")), BlackBoxOnlineLSTM)


def test_black_box_learner_cannot_change_its_sizes():
    bb = BlackBoxOnlineLSTM(num_features=5, num_classes=3, hidden_size=8)
    assert bb.online(torch.randn(7, 5), torch.randint(0, 2, (7,))).shape == (7,)
    with pytest.raises(ValueError, match="cannot change its input or output size"):
        bb.online(torch.randn(7, 6), torch.randint(0, 2, (7,)))


def test_clone_family_runs_in_the_estimator():
    fam = SGDCloneFamily(lr=0.1, gain=8.0, max_burn_in=3, datasets=["iris"], episode_length=4,
                         projection="none", max_classes=3)
    net = VSMLNetwork(state_size=4, message_size=2, micro_ticks=1)
    out = EpisodicES(fam, 2, sigma=0.05, num_pairs=1).estimate(net)
    assert out.finite and set(out.meta_grads) == {n for n, _ in net.named_parameters()}


def test_evaluation_helpers_against_closed_forms():
    from learnopt.metrics import t_interval
    from learnopt.vsml.evaluate import log_grid, running_accuracy, tune_learning_rate

    assert log_grid(1e-2, 1.0) == pytest.approx([0.01, 0.01 * 10 ** 0.5, 0.1, 0.1 * 10 ** 0.5, 1.0])
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # t(0.975, 2)
    correct = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(running_accuracy(correct), torch.tensor([0.5, 0.25, 0.5, 0.5]))
    # a learning rate of 0 never learns: tuning must prefer a positive one on a separable stream
    x = torch.randn(1, 60, 4)
    y = (x[..., 0] > 0).long()
    best, scores = tune_learning_rate(lambda lr: OnlineLinear("sgd", lr=lr), [0.0, 1.0], [(x, y, 2)])
    assert best == 1.0 and scores[1.0] > scores[0.0]


def test_committed_sgd_clone_learns_digits_like_sgd_forward_only():
    """The shipped clone, run forward only on the first 400 digits (pixels/16, 10 classes),
    predicts online about as well as real SGD at the rate it was cloned from (0.05)."""
    from learnopt.vsml.evaluate import online_correct
    from tasks.online import dataset_arrays

    clone = learnopt.load("checkpoints/vsml_sgd_clone.pt")
    assert isinstance(clone, VSMLNetwork) and clone.checkpoint_metadata["task_family"]["init_args"]["lr"] == 0.1
    x, y = dataset_arrays("digits", "all", standardize=False)
    x, y = x[:400], y[:400]
    clone_acc = float((clone.online(x, y) == y).float().mean())
    sgd_acc = float(online_correct(OnlineLinear("sgd", lr=0.05, bias=False), [(x[None], y[None], 10)]).mean())
    assert clone_acc > 0.5 and abs(clone_acc - sgd_acc) < 0.05


def test_committed_meta_learner_learns_new_sizes_online():
    """The shipped meta-learned VSML (meta-trained on 16 projected features, 2–5 classes)
    learns sklearn's wine data (13 raw features, 3 classes, never seen) online."""
    from tasks.online import dataset_arrays

    meta = learnopt.load("checkpoints/vsml_meta.pt")
    x, y = dataset_arrays("wine", "all")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    predictions = meta.online(x[order], y[order])
    assert predictions.shape == y.shape
    assert float((predictions == y[order]).float().mean()) > 0.8  # chance: 0.40 (largest class)


def test_choose_ensemble_takes_the_smallest_size_near_the_best():
    from learnopt.vsml.evaluate import choose_ensemble, online_correct

    torch.manual_seed(0)
    net = VSMLNetwork(state_size=6, message_size=3, rotate_inputs=True)
    x, y = torch.randn(6, 12, 4), torch.randint(0, 3, (6, 12))
    streams = [(x[:3], y[:3], 3), (x[3:], y[3:], 3)]
    chosen, scores = choose_ensemble(net, streams, sizes=(1, 2, 3))
    for r in (1, 2, 3):  # each score is the learner run with that many members
        net.ensemble = r
        assert scores[r] == float(online_correct(net, streams).mean())
    net.ensemble = 1
    best = max(scores.values())
    assert chosen == min(r for r in scores if scores[r] >= best - 0.0005) and net.ensemble == 1
    assert choose_ensemble(net, streams, sizes=(1, 2, 3), tolerance=1.0)[0] == 1  # everything is near the best
    with pytest.raises(ValueError, match="sizes must be integers >= 1"):
        choose_ensemble(net, streams, sizes=(0, 2))


def test_meta_test_families_are_the_protocols_sets():
    from learnopt.task import seeded_generator
    from tasks.online import vsml_meta_test_families

    families = vsml_meta_test_families(episode_length=20)
    assert len(families) == 6 and sum("never seen" in t for t in families) == 5
    for test, family in families.items():
        x, y, C = family.sample(4, seeded_generator("test", family.name, 0))
        raw_mnist1d = "raw 40" in test
        assert x.shape == (4, 20, 40 if raw_mnist1d else 16) and y.shape == (4, 20)
        assert (C == 10) if raw_mnist1d else (
            2 <= C <= (2 if "breast" in test else 3 if "iris" in test or "wine" in test else 5))
        assert int(y.max()) < C
    # seeded batches: a longer sample starts with the shorter one (the protocol's 256 inside 4,096)
    from tasks.online import seeded_batches

    iris = families["iris (never seen), 16-d projection, 2–3 classes"]
    short, long = seeded_batches(iris, "test", n=2, per=3), seeded_batches(iris, "test", n=4, per=3)
    assert len(long) == 4 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(short, long))
    assert not torch.equal(long[0][0], long[1][0])
    assert not torch.equal(short[0][0], seeded_batches(iris, "tune", 1, 3)[0][0])
