"""The GPU path: the same code on CUDA gives the CPU's numbers. Skipped without a GPU
(run on a lent accelerator with `scripts/test -m device`)."""

from __future__ import annotations

import pytest
import torch

import learnopt
from learnopt import optim as lo
from learnopt.learned import CoordinatewiseLSTM
from learnopt.meta import TruncatedBPTT
from tasks.quadratic import QuadraticFamily

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _estimate(device: str):
    torch.manual_seed(0)
    lopt = CoordinatewiseLSTM(hidden_size=8).double().to(device)
    est = TruncatedBPTT(QuadraticFamily(dim=5, dtype=torch.float64), num_tasks=16, unroll_length=5, horizon=10)
    return est.estimate(lopt, est.init_unroll(lopt))


def test_truncated_bptt_on_gpu_matches_cpu():
    cpu, gpu = _estimate("cpu"), _estimate("cuda")
    assert gpu.unroll_state.params["theta"].device.type == "cuda"
    torch.testing.assert_close(gpu.meta_loss.cpu(), cpu.meta_loss, rtol=1e-9, atol=1e-12)
    for k, g in cpu.meta_grads.items():
        torch.testing.assert_close(gpu.meta_grads[k].cpu(), g, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["sgd", "nesterov", "rmsprop", "adam"])
def test_hand_designed_transforms_on_gpu_match_cpu(name):
    torch.manual_seed(0)
    p = {"w": torch.randn(8, 4, dtype=torch.float64)}
    outs = {}
    for device in ("cpu", "cuda"):
        tx = getattr(lo, name)(lr=0.01)
        params = {k: v.to(device) for k, v in p.items()}
        state = tx.init(params)
        for _ in range(20):
            grads = {"w": torch.sin(params["w"]) + params["w"] ** 3}
            u, state = tx.update(grads, state, params)
            params = lo.apply_updates(params, u)
        outs[device] = params["w"].cpu()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-10, atol=1e-12)


def test_drop_in_learned_optimizer_runs_on_the_parameters_device(tmp_path):
    path = learnopt.export_checkpoint(CoordinatewiseLSTM(hidden_size=8), tmp_path / "l.pt")
    model = torch.nn.Linear(4, 2).cuda()
    opt = learnopt.load_optimizer(path, model.parameters())
    loss = model(torch.randn(3, 4, device="cuda")).pow(2).sum()
    loss.backward()
    opt.step()
    assert all(opt.state[p]["h"].device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("block_rows", [None, 1000])
def test_in_place_drop_in_step_on_gpu_matches_the_functional_update(block_rows):
    """The drop-in step's in-place path on CUDA (default: blocks sized for an accelerator, here
    one block; 1,000: many blocks and a ragged last one) against the functional ``update`` on CPU."""
    torch.manual_seed(0)
    lopt = CoordinatewiseLSTM(hidden_size=8, num_layers=2).double()
    grads = {"a": torch.randn(300, 41, dtype=torch.float64), "b": torch.randn(77, dtype=torch.float64)}
    state = lopt.init(grads)
    gpu_lopt = CoordinatewiseLSTM(hidden_size=8, num_layers=2).double().cuda()
    gpu_lopt.load_state_dict(lopt.state_dict())
    gpu_state = gpu_lopt.init({k: v.cuda() for k, v in grads.items()})
    for _ in range(3):
        grads = {k: torch.randn_like(v) for k, v in grads.items()}
        ref, state = lopt.update(grads, state)
        got = gpu_lopt.update_({k: v.cuda() for k, v in grads.items()}, gpu_state, block_rows=block_rows)
        for k in ref:
            torch.testing.assert_close(got[k].cpu(), ref[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu_state.c.cpu(), state.c, rtol=1e-9, atol=1e-12)


def _bowl_with_ripples(u):
    return ((u - 0.3) ** 2).sum(-1) + 0.1 * torch.sin(7 * u).sum(-1)


@pytest.mark.parametrize("trend,refine", [(False, False), (True, False), (False, True)])
def test_rnn_proposer_rollout_on_gpu_matches_cpu(trend, refine):
    from learnopt.blackbox import RNNProposer

    torch.manual_seed(0)
    p = RNNProposer(dim=3, hidden_size=16, num_layers=2, num_queries=2, trend=trend, refine=refine).double()
    if refine:  # follow the local model's suggestion (on the device: least squares, eigh, trust region)
        with torch.no_grad():
            p.refine_gate.bias.fill_(2.0)
    with torch.no_grad():
        xs, ys = p.rollout(_bowl_with_ripples, 4, 20)
        gxs, gys = p.cuda().rollout(_bowl_with_ripples, 4, 20)
    assert gxs.device.type == "cuda"
    torch.testing.assert_close(gxs.cpu(), xs, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gys.cpu(), ys, rtol=1e-9, atol=1e-10)


def _meta_grads_cpu_and_gpu(model, family, num_episodes, **kwargs):
    from learnopt.meta.episodic import EpisodicBPTT

    cpu = EpisodicBPTT(family, num_episodes, **kwargs).estimate(model)
    gpu = EpisodicBPTT(family, num_episodes, **kwargs).estimate(model.cuda())
    torch.testing.assert_close(gpu.meta_loss.cpu(), cpu.meta_loss, rtol=1e-8, atol=1e-10)
    assert cpu.meta_grads.keys() == gpu.meta_grads.keys()
    for k, g in cpu.meta_grads.items():
        assert gpu.meta_grads[k].device.type == "cuda"
        torch.testing.assert_close(gpu.meta_grads[k].cpu(), g, rtol=1e-6, atol=1e-9)


def test_rnn_proposer_meta_gradient_on_gpu_matches_cpu():
    """Whole-episode BPTT through the lazy GP chain rule; the GP samples, drawn from a CPU
    generator, are moved to the proposer's device."""
    from learnopt.blackbox import RNNProposer
    from tasks.blackbox_episodes import GPProposerEpisodes

    torch.manual_seed(0)
    p = RNNProposer(dim=2, hidden_size=16, num_layers=2).double()
    family = GPProposerEpisodes(dim=2, horizon=8, loss="oi", lengthscale_range=(0.3, 0.5))
    _meta_grads_cpu_and_gpu(p, family, 4, seed=1)


def test_vsml_online_episodes_and_meta_gradient_on_gpu_match_cpu():
    from learnopt.vsml import VSMLNetwork, online_episode
    from tasks.online import OnlineClassificationFamily

    torch.manual_seed(0)
    net = VSMLNetwork(state_size=4, message_size=2, micro_ticks=2).double()
    x, y = torch.randn(3, 12, 5, dtype=torch.float64), torch.randint(0, 4, (3, 12))
    cpu = online_episode(net, x, y, 4, torch.Generator().manual_seed(1))
    gpu = online_episode(net.cuda(), x.cuda(), y.cuda(), 4, torch.Generator().manual_seed(1))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-10)
    family = OnlineClassificationFamily(datasets=["iris"], episode_length=6, num_features=3, max_classes=3)
    _meta_grads_cpu_and_gpu(net.cpu(), family, 2)
