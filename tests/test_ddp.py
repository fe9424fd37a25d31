"""Distributed meta-training: Lightning's DDP strategy with 2 CPU processes (gloo) gives the
meta-gradient a single process computes on the union of both ranks' tasks, and ES/PES split
their antithetic pairs across ranks without changing the estimate.

Run as a script (``python tests/test_ddp.py OUTDIR``) this file is the 2-process training run
that the first test launches: Lightning's ``ddp`` strategy starts rank 1 by re-running the
same command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from learnopt.learned import CoordinatewiseLSTM
from learnopt.meta import ES, PES, TruncatedBPTT
from learnopt.meta.base import UnrollState, start_unroll, task_stream
from tasks.quadratic import QuadraticFamily, QuadraticTask

ROOT = Path(__file__).resolve().parent.parent
DT = torch.float64
SETTINGS = dict(num_tasks=3, unroll_length=3, horizon=6, seed=5)
META_LR = 0.01
STEPS = 2


def _family() -> QuadraticFamily:
    return QuadraticFamily(dim=3, dtype=DT)


def _lopt() -> CoordinatewiseLSTM:
    torch.manual_seed(0)
    return CoordinatewiseLSTM(hidden_size=4).to(DT)


def _ddp_run(out: Path) -> None:
    """Two meta-steps under DDP; each rank saves the gradients it stepped with and its weights."""
    import lightning.pytorch as pl

    from learnopt.train.module import MetaTrainModule

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.grads: list[dict[str, torch.Tensor]] = []

        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            self.grads.append({n: p.grad.detach().clone() for n, p in module.learned_optimizer.named_parameters()})

    module = MetaTrainModule(_lopt(), _family(), TruncatedBPTT(**SETTINGS), meta_lr=META_LR, grad_clip=1e12,
                             val_tasks=2)
    initial = {k: v.clone() for k, v in module.learned_optimizer.state_dict().items()}
    record = Record()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=STEPS, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
    )
    trainer.fit(module)
    torch.save({"world_size": trainer.world_size, "grads": record.grads, "initial": initial,
                "final": module.learned_optimizer.state_dict(), "episode": module._unroll.episode},
               out / f"rank{trainer.global_rank}.pt")


def _union(states: list[UnrollState], lopt: CoordinatewiseLSTM) -> UnrollState:
    """One state holding every rank's quadratics side by side."""
    task = QuadraticTask(torch.cat([s.task.W for s in states]), torch.cat([s.task.y for s in states]),
                         states[0].task.init_scale, states[0].task.loss_scale)
    params = {"theta": torch.cat([s.params["theta"] for s in states])}
    with torch.no_grad():
        opt_state = lopt.init(params)
    return UnrollState(task, params, opt_state, 0, 0, states[0].generator)


def test_ddp_two_processes_match_single_process_meta_gradient_on_the_union_of_tasks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PL_DISABLE_FORK="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # The reference: one process, plain TruncatedBPTT on both ranks' tasks at once, torch.optim.Adam.
    lopt = _lopt()
    lopt.load_state_dict(ranks[0]["initial"])
    single = TruncatedBPTT(_family(), **SETTINGS)
    states = [start_unroll(lopt, single.task_family, SETTINGS["num_tasks"], "train", SETTINGS["seed"], 0, rank=r)
              for r in range(2)]
    assert not torch.equal(states[0].task.W, states[1].task.W)  # the ranks train different tasks
    state = _union(states, lopt)
    adam = torch.optim.Adam(lopt.parameters(), lr=META_LR)
    for step in range(STEPS):
        est = single.estimate(lopt, state)
        state = est.unroll_state
        for r in ranks:
            assert len(r["grads"]) == STEPS
            for name, g in est.meta_grads.items():
                torch.testing.assert_close(r["grads"][step][name], g, rtol=1e-9, atol=1e-12)
        adam.zero_grad()
        for name, p in lopt.named_parameters():
            p.grad = est.meta_grads[name]
        adam.step()
    for r in ranks:  # the replicas stay in sync, on the single process's weights
        for name, w in lopt.state_dict().items():
            torch.testing.assert_close(r["final"][name], w, rtol=1e-9, atol=1e-12)


def test_rank_zero_draws_the_single_process_tasks_and_other_ranks_their_own():
    reference = _family().sample(3, task_stream("train", 5, 2))
    est = TruncatedBPTT(_family(), **SETTINGS)
    lopt = _lopt()
    est.distribute(0, 2)
    # the single-process stream is seeded by ("train", seed, episode), as it always was
    from learnopt.task import seeded_generator

    assert torch.equal(_family().sample(3, seeded_generator("train", 5, 2)).W, reference.W)
    assert torch.equal(est.init_unroll(lopt, episode=2).task.W, reference.W)
    est.distribute(1, 2)
    assert not torch.equal(est.init_unroll(lopt, episode=2).task.W, reference.W)


def _split_estimates(cls, steps: int, num_pairs: int = 4, world: int = 2):
    """Per step: the single-process estimate and the mean of ``world`` ranks' estimates."""
    kwargs = dict(num_tasks=4, unroll_length=2, horizon=6, sigma=0.05, num_pairs=num_pairs, seed=1)
    lopt = _lopt()
    single = cls(_family(), **kwargs)
    replicas = [cls(_family(), **kwargs) for _ in range(world)]
    for r, est in enumerate(replicas):
        est.distribute(r, world)
    s_state, r_states = None, [None] * world
    out = []
    for _ in range(steps):
        s = single.estimate(lopt, s_state)
        s_state = s.unroll_state
        parts = [est.estimate(lopt, st) for est, st in zip(replicas, r_states)]
        r_states = [p.unroll_state for p in parts]
        mean = {n: sum(p.meta_grads[n] for p in parts) / world for n in s.meta_grads}
        out.append((s, mean, parts))
    return out


def test_es_pairs_split_across_ranks_average_to_the_single_process_estimate():
    for s, mean, parts in _split_estimates(ES, steps=2):
        for n, g in s.meta_grads.items():
            torch.testing.assert_close(mean[n], g, rtol=1e-9, atol=1e-12)
        assert all(torch.equal(p.meta_loss, s.meta_loss) for p in parts)  # same tasks, same reference run


def test_pes_particles_split_across_ranks_average_to_the_single_process_estimate():
    # 3 pairs on 2 ranks: rank 0 holds pairs 0 and 2, rank 1 pair 1; the persistent particles
    # and accumulated perturbations carry over 3 truncations
    for s, mean, parts in _split_estimates(PES, steps=3, num_pairs=3):
        for n, g in s.meta_grads.items():
            torch.testing.assert_close(mean[n], g, rtol=1e-9, atol=1e-12)
    assert [len(p.unroll_state.particles) for p in parts] == [4, 2]


def test_distribute_rejects_bad_settings():
    import pytest

    with pytest.raises(ValueError, match="num_pairs"):
        ES(_family(), num_pairs=1).distribute(0, 2)
    with pytest.raises(ValueError, match="rank"):
        TruncatedBPTT(_family()).distribute(2, 2)


if __name__ == "__main__":
    _ddp_run(Path(sys.argv[1]))
