"""Episodic estimators (learnopt.meta.episodic) and their use by the Lightning shell."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from learnopt.meta import TruncatedBPTT
from learnopt.meta.episodic import EpisodicBPTT, EpisodicES
from learnopt.train.module import MetaTrainModule
from tasks.quadratic import QuadraticFamily


class Linear(nn.Module):
    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


class RegressionEpisodes:
    """Episodes are draws x ~ N(0, I); the meta-loss is E (w·x − t·x)², minimised at w = t."""

    validation_name = "mse"

    def __init__(self, target=(1.0, -2.0, 0.5)) -> None:
        self.target = torch.tensor(target, dtype=torch.float64)

    def meta_loss(self, model, num_episodes, generator):
        x = torch.randn(num_episodes, len(self.target), generator=generator, dtype=torch.float64)
        loss = ((x @ model.w - x @ self.target) ** 2).mean()
        return loss, {"abs_error": float((model.w.detach() - self.target).abs().max())}

    def validation_score(self, model, generator):
        return float(((model.w - self.target) ** 2).sum())


def test_bptt_is_the_exact_gradient_and_episodes_advance():
    family, model = RegressionEpisodes(), Linear()
    est = EpisodicBPTT(family, num_episodes=16, seed=3)
    state = est.init_unroll(model, 0)
    x = torch.randn(16, 3, generator=est.init_unroll(model, 0).generator, dtype=torch.float64)
    out = est.estimate(model, state)
    # closed form: d/dw mean((x·(w − t))²) = 2 xᵀx (w − t) / n
    expected = 2 * x.T @ x @ (model.w.detach() - family.target) / 16
    torch.testing.assert_close(out.meta_grads["w"], expected)
    assert out.unroll_state.episode == 1 and out.finite
    # a resumed estimator draws the same next episode
    again = est.restore_unroll(model, est.save_unroll(out.unroll_state))
    assert torch.equal(again.generator.get_state(), out.unroll_state.generator.get_state())


def test_es_matches_the_gradient_within_its_noise():
    family, model = RegressionEpisodes(), Linear()
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64))
    exact = EpisodicBPTT(family, 64, seed=1).estimate(model).meta_grads["w"]
    es = EpisodicES(family, 64, seed=1, sigma=1e-3, num_pairs=400).estimate(model).meta_grads["w"]
    # antithetic ES on a quadratic is unbiased; with 400 pairs the relative error is ~ 1/sqrt(400)·sqrt(d)
    assert torch.linalg.norm(es - exact) < 0.25 * torch.linalg.norm(exact)
    # and the parameters are left exactly as they were
    assert torch.equal(model.w.detach(), torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64))


def test_nonfinite_meta_loss_is_skipped():
    class Broken(RegressionEpisodes):
        def meta_loss(self, model, n, g):
            loss, m = super().meta_loss(model, n, g)
            return loss * float("nan"), m

    out = EpisodicBPTT(Broken(), 4).estimate(Linear())
    assert not out.finite and torch.equal(out.meta_grads["w"], torch.zeros(3, dtype=torch.float64))


def test_only_whole_episode_estimators_are_accepted():
    with pytest.raises(ValueError, match="episode family"):
        MetaTrainModule(Linear(), RegressionEpisodes(), estimator=TruncatedBPTT())
    with pytest.raises(TypeError, match="episode family"):
        EpisodicBPTT(QuadraticFamily(3))
    with pytest.raises(TypeError, match="estimator object"):
        MetaTrainModule(Linear(), RegressionEpisodes(), estimator="full_bptt")


@pytest.mark.parametrize("estimator", [EpisodicBPTT(num_episodes=32), EpisodicES(num_episodes=32, sigma=0.01)],
                         ids=["bptt", "es"])
def test_shell_meta_trains_an_episode_family(estimator, tmp_path):
    family, model = RegressionEpisodes(), Linear()
    module = MetaTrainModule(model, family, estimator, meta_lr=0.1, grad_clip=10.0)
    assert module.monitor_key == "val/mse"
    before = module.validation_score()
    trainer = pl.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, val_check_interval=30,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module)
    assert module.validation_score() < 0.05 * before
    assert "val/mse" in trainer.callback_metrics


def test_es_runs_members_through_functional_call_on_the_es_noise_stream():
    """EpisodicES scores φ ± σz with ``call_with_weights`` (the module is never written to) and
    draws z from ``("es-noise", split, seed, episode)`` as ES draws its perturbations; the
    estimate is Σ z (L⁺ − L⁻)/(2σN), written out here with perturbed copies of the module."""
    from learnopt.task import seeded_generator

    family, model = RegressionEpisodes(), Linear()
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64))
    sigma, pairs = 0.05, 3
    est = EpisodicES(family, 8, seed=2, sigma=sigma, num_pairs=pairs)
    version = model.w._version
    out = est.estimate(model)
    assert model.w._version == version  # never modified, not even restored
    noise, expected = seeded_generator("es-noise", "train", 2, 0), torch.zeros(3, dtype=torch.float64)
    for _ in range(pairs):
        z = torch.randn(3, generator=noise, dtype=torch.float64)
        losses = []
        for sign in (1.0, -1.0):
            member = Linear()
            with torch.no_grad():
                member.w.copy_(model.w + sign * sigma * z)
            losses.append(family.meta_loss(member, 8, seeded_generator("train", 2, 0))[0])
        expected += z * (losses[0] - losses[1]) / (2 * sigma * pairs)
    torch.testing.assert_close(out.meta_grads["w"], expected, rtol=1e-12, atol=1e-15)
