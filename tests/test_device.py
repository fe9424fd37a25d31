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
    assert opt.tx_state.h.device.type == "cuda"
