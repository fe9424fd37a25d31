"""Four places where a wrong sign or a skipped check would pass every other test (found by
mutating the code): the meta-gradient guard on a finite loss with a non-finite gradient, ES's
guard when only the unperturbed run is non-finite, the evaluation curve as the mean of log10
losses, and the sign of the error a VSML network is fed back."""

from __future__ import annotations

import math

import numpy as np
import torch

from learnopt.evaluate import evaluate_optimizers
from learnopt.learned import CoordinatewiseLSTM
from learnopt.meta import ES
from learnopt.meta.base import guarded_meta_grads
from learnopt.meta.unroll import DIVERGED_LOG10
from learnopt.vsml import VSMLNetwork
from tasks.quadratic import QuadraticFamily


def test_a_finite_meta_loss_with_an_infinite_gradient_is_guarded():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([0.0], requires_grad=True)  # sqrt at 0: value 0, derivative inf
    loss = a.sum() + torch.sqrt(b).sum()
    assert torch.isfinite(loss)
    grads, finite = guarded_meta_grads(loss, [a, b])
    assert not finite
    assert all(torch.equal(g, torch.zeros_like(w)) for g, w in zip(grads, [a, b]))
    grads, finite = guarded_meta_grads(a.pow(2).sum(), [a, b])  # and a healthy one passes
    assert finite and torch.equal(grads[0], 2 * a.detach()) and torch.equal(grads[1], torch.zeros(1))


def test_es_drops_the_estimate_when_only_the_unperturbed_run_is_not_finite():
    torch.manual_seed(0)
    lopt = CoordinatewiseLSTM(hidden_size=4, num_layers=1, output_scale=0.1)
    est = ES(QuadraticFamily(dim=3), num_tasks=2, unroll_length=3, horizon=6, sigma=0.1, num_pairs=2)
    state, k, names, phi, noise, data, ref = est._begin(lopt, None)
    grads = [torch.ones_like(phi[n]) for n in names]
    losses = [torch.tensor(1.0), torch.tensor(2.0)]  # every perturbed run finite
    healthy = est._finish(lopt, names, list(grads), list(losses), ref, state, {})
    assert healthy.finite and all(torch.equal(g, torch.ones_like(g)) for g in healthy.meta_grads.values())
    bad_ref = ref._replace(meta_loss=torch.tensor(float("nan")))
    dropped = est._finish(lopt, names, list(grads), list(losses), bad_ref, state, {})
    assert not dropped.finite
    assert all(torch.equal(g, torch.zeros_like(g)) for g in dropped.meta_grads.values())
    assert dropped.unroll_state.episode == state.episode + 1 and dropped.unroll_state.step == 0


def test_the_evaluation_curve_is_the_mean_over_instances_of_log10_losses():
    family = QuadraticFamily(dim=3)

    def make(params):
        return torch.optim.SGD(params, lr=0.05)

    evaluation = evaluate_optimizers({"sgd": make}, family, steps=5, num_instances=4, seeds=[0, 1], tune=(),
                                     progress=False)
    # independently: rerun the same two seeds, take log10 per instance, then the mean
    from learnopt.evaluate import train_with_optimizer
    from learnopt.task import seeded_generator

    per_instance = []
    for seed in (0, 1):
        generator = seeded_generator("test", seed)
        task = family.sample(4, generator)
        losses = train_with_optimizer(make, task, 5, generator).numpy()
        logs = np.where(np.isfinite(losses) & (losses > 0), np.log10(np.maximum(losses, 1e-300)), DIVERGED_LOG10)
        per_instance.append(logs)
    expected = np.concatenate(per_instance, axis=1).mean(axis=1)
    np.testing.assert_allclose(evaluation.results[0].curve, expected, rtol=1e-6)
    # a mean of log10 losses, not the log10 of mean losses
    assert not np.allclose(expected, np.log10(np.concatenate([10 ** p for p in per_instance], 1).mean(1)))


def test_the_error_fed_back_to_a_vsml_network_is_softmax_minus_onehot():
    torch.manual_seed(0)
    net = VSMLNetwork(reverse_pass=False, label_feedback=True)
    state = net.init_state(2, 3, 4, torch.Generator().manual_seed(0))
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 3.0, -2.0]])
    y = torch.tensor([1, 2])
    state = net.feedback(state, logits, y)
    message = state.pending_backward[-1]
    onehot = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(message[..., 0], torch.softmax(logits, -1) - onehot)
    torch.testing.assert_close(message[..., 1], onehot)
    assert math.isclose(float(message[..., 0].sum()), 0.0, abs_tol=1e-6)
