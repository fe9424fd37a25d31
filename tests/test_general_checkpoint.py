"""The shipped general-purpose learned optimizer, ``checkpoints/general.pt`` (issue 23), as a user
meets it: ``learnopt.load_optimizer`` on their own model in a plain PyTorch loop and in a
Lightning Trainer, alone and composed with Newton–Schulz/AdamW, and its refusal of parameters
and gradients it cannot handle.

Reference: ``torch.optim.Adam`` at its default learning rate 1e-3 (what a new user tries first)
on the same model, data and minibatches; the digits data ship with scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional

import learnopt

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "general.pt"
STEPS = 150


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # a ReLU MLP wider and deeper than any meta-training saw (16 or 32 units)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 10))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(functional.cross_entropy(model(x), y))


def test_metadata_holds_config_curves_and_suite_summary():
    meta = learnopt.load(CHECKPOINT).checkpoint_metadata
    assert "CompactNormalizedOptimizer" in str(meta["config"]) and meta["validation"]["meta_step"] > 0
    val = meta["meta_training_curves"]["val/log10_final_loss"]
    assert meta["validation"]["val/log10_final_loss"] == pytest.approx(min(val["value"]), abs=1e-6)
    summary = meta["evaluation_suite"]["summary"]
    assert len(meta["evaluation_suite"]["problems"]) >= 8 and set(summary) == {"general", "general+ns"}


@pytest.mark.parametrize("options", [{}, {"orthogonalize": True}], ids=["rule", "orthogonalized"])
def test_trains_a_model_in_a_plain_loop_better_than_default_adam(options):
    x, y = _digits()
    model = _model()
    with torch.no_grad():
        first = float(functional.cross_entropy(model(x), y))
    learned = _train(model, learnopt.load_optimizer(CHECKPOINT, model.named_parameters(), num_steps=STEPS,
                                                    **options), x, y)
    reference = _model()
    adam = _train(reference, torch.optim.Adam(reference.parameters(), lr=1e-3), x, y)
    assert learned < adam < first


def test_trains_a_model_in_a_lightning_trainer(in_tmp):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _digits()

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return learnopt.load_optimizer(CHECKPOINT, self.named_parameters(), num_steps=STEPS)

    module = Classifier()
    with torch.no_grad():
        first = float(functional.cross_entropy(module.net(x), y))
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS
    with torch.no_grad():
        assert float(functional.cross_entropy(module.net(x), y)) < 0.1 * first


@pytest.mark.parametrize("value, match", [
    (torch.tensor(1.0), "no dimension"),
    (torch.randn(3, dtype=torch.complex64), "complex"),
    (torch.eye(3).to_sparse(), "sparse"),
])
def test_a_parameter_it_cannot_handle_is_named(value, match):
    params = [("fine", torch.ones(4, requires_grad=True)), ("odd", value.requires_grad_(True))]
    with pytest.raises(ValueError, match=match) as e:  # refused when the optimizer is built, before any step
        learnopt.load_optimizer(CHECKPOINT, params, num_steps=10)
    assert "CompactNormalizedOptimizer: parameter 'odd'" in str(e.value)


def test_a_non_finite_gradient_never_reaches_the_weights():
    model = _model()
    opt = learnopt.load_optimizer(CHECKPOINT, model.named_parameters(), num_steps=10)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="2.weight"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_a_wide_relu_net_does_not_collapse():
    # The failure the shipped rule's cap (max_amplification) was built to remove: its uncapped predecessor
    # (commit 5efc3d3) sent every run of this 128-128 ReLU MLP on mnist1d to the uniform prediction within 500
    # steps (loss ln 10 = 2.303 here too, docs/general.md); the capped rule ends at 0.75 and 0.65
    from learnopt.meta.unroll import rollout
    from learnopt.task import seeded_generator
    from tasks.mlp import MLPFamily

    lopt = learnopt.load(CHECKPOINT)
    assert lopt.config()["max_amplification"] is not None
    generator = seeded_generator("test", 0)
    task = MLPFamily(dataset="mnist1d", hidden_sizes=[128, 128], activation="relu").sample(2, generator)
    losses = rollout(lopt.transform(batch_dims=1, num_steps=500), task, 500, generator=generator)
    assert bool(torch.isfinite(losses).all()) and float(losses[-1].max()) < 1.5, losses[-1]
