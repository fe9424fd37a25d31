"""Learning-algorithm cloning (Kirsch & Schmidhuber 2021, "meta learning backpropagation"):
meta-train the shared sub-LSTM so that a one-layer VSML network *implements* a linear
softmax classifier trained online by SGD — forward pass, backward pass and weight update —
and then learns like SGD when run forward only.

The teacher is the network whose weight ``(a, b)`` is ``w_ab``, with logits
``z_b = gain · mean_a w_ab x_a`` and the per-weight SGD step ``w_ab ← w_ab − lr · x_a δ_b``
(``δ = softmax(z) − onehot(y)``). In the usual parameterisation ``V = gain · W / A`` this is
plain SGD on ``z = V x`` with learning rate ``gain · lr / A`` (``teacher_learning_rate``).
Every sub-LSTM is supervised per step on the teacher's stream (teacher forcing: the δ fed
back is the teacher's):

* its forward message (first component) must be ``gain · w_ab x_a`` — the mean over ``a``
  is then the teacher's logit;
* its backward message must be ``w_ab δ_b`` — backprop's message to a layer below;
* the network's ``weight_readout · c`` of its cell state must be the teacher's weight after
  the update.

The teacher's initial weights are the readout of the initial (random) cell states. All
sub-LSTMs are independent given the teacher's messages, so the ``E × A × B`` of them are
rows of one batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from learnopt.vsml.network import LayerState, VSMLNetwork


class CloneStream(NamedTuple):
    """Carried state along a batch of teacher streams: the VSML layer's state and the teacher's
    weights ``[E, A, B]``."""

    layer: LayerState
    teacher_w: Tensor


def check_clonable(network: VSMLNetwork) -> None:
    """Refuse a network SGD cloning cannot target.

    Args:
        network: the learner.
    Raises:
        ValueError: hidden layers or no backward pass.
    """
    if network.hidden_sizes or not network.reverse_pass:
        raise ValueError("SGD cloning needs a single VSML layer (hidden_sizes=[]) with the backward pass "
                         f"(reverse_pass=True); got hidden_sizes={network.hidden_sizes}, "
                         f"reverse_pass={network.reverse_pass}")


def start_streams(network: VSMLNetwork, episodes: int, num_features: int, num_classes: int,
                  generator: torch.Generator | None = None) -> CloneStream:
    """Fresh sub-LSTMs (the network's initialisation) and the teacher weights they encode.

    Args:
        network: a clonable ``VSMLNetwork``.
        episodes: ``E``.
        num_features: ``A``.
        num_classes: ``B``.
        generator: draws the initial cell states.
    Returns:
        A ``CloneStream``.
    Raises:
        ValueError: the network is not clonable (``check_clonable``).
    """
    check_clonable(network)
    r = network.weight_readout
    layer = network.layers[0].init_state(episodes, num_features, num_classes, generator, r.device, r.dtype)
    return CloneStream(layer, (layer.c @ r).detach())


def teacher_logits(w: Tensor, x: Tensor, gain: float) -> Tensor:
    """The teacher's logits ``gain · x W / A``.

    Args:
        w: ``[E, A, B]`` weights.
        x: ``[E, A]`` inputs.
        gain: the logit gain.
    Returns:
        ``[E, B]``.
    """
    return gain * torch.einsum("ea,eab->eb", x, w) / x.shape[-1]


def clone_step(network: VSMLNetwork, stream: CloneStream, x: Tensor, y: Tensor, lr: float, gain: float,
               ) -> tuple[CloneStream, dict[str, Tensor]]:
    """One example per stream (``x`` [E, A], ``y`` [E]): the sub-LSTMs' forward tick(s),
    backward tick(s) and cell state against the teacher's forward message, backward message
    and updated weight, as relative squared errors.

    Args:
        network: a clonable ``VSMLNetwork``.
        stream: the carried state.
        x: ``[E, A]`` inputs.
        y: ``[E]`` labels.
        lr: the teacher's per-weight SGD rate.
        gain: the teacher's logit gain.
    Returns:
        ``(stream, {"forward", "backward", "weight": error})``.
    """
    layer, w = network.layers[0], stream.teacher_w
    onehot = F.one_hot(y, w.shape[-1]).to(x.dtype)
    delta = torch.softmax(teacher_logits(w, x, gain), -1) - onehot
    forward_in = network._embed(x)
    silent = torch.zeros(x.shape[0], w.shape[-1], network.message_size, dtype=x.dtype, device=x.device)
    state = stream.layer
    for _ in range(network.micro_ticks):
        state = layer.cell(state, forward_in, silent)
    fwd = (state.h @ layer.out_forward)[..., 0]
    backward_in = network._embed(delta, onehot) if network.label_feedback else network._embed(delta)
    for _ in range(network.micro_ticks):
        state = layer.cell(state, forward_in, backward_in)
    bwd = (state.h @ layer.out_backward)[..., 0]
    new_w = w - lr * x.unsqueeze(-1) * delta.unsqueeze(1)
    targets = {"forward": (fwd, gain * w * x.unsqueeze(-1)), "backward": (bwd, w * delta.unsqueeze(1)),
               "weight": (state.c @ network.weight_readout, new_w)}
    # Relative squared errors (error² / mean target²): the three targets differ in scale by
    # orders of magnitude, and the forward product w·x is the one that matters most.
    errors = {k: (out - target).pow(2).mean() / (target.pow(2).mean() + 1e-6) for k, (out, target) in targets.items()}
    return CloneStream(state, new_w.detach()), errors


def clone_loss(network: VSMLNetwork, x: Tensor, y: Tensor, num_classes: int, lr: float, gain: float,
               generator: torch.Generator | None = None, burn_in: int = 0) -> tuple[Tensor, dict[str, float]]:
    """Mean cloning loss over streams ``x`` [E, T, A], ``y`` [E, T]; the first ``burn_in``
    steps are run without gradient (so training sees the states of late stream positions
    without backpropagating through them).

    Args:
        network: a clonable ``VSMLNetwork``.
        x: ``[E, T, A]`` inputs.
        y: ``[E, T]`` labels.
        num_classes: ``B``.
        lr: the teacher's per-weight SGD rate.
        gain: the teacher's logit gain.
        generator: draws the initial cell states.
        burn_in: steps run first without gradient.
    Returns:
        ``(loss, {"clone_<part>": mean error})``.
    Raises:
        ValueError: the network is not clonable.
    """
    stream = start_streams(network, x.shape[0], x.shape[2], num_classes, generator)
    with torch.no_grad():
        for t in range(burn_in):
            stream, _ = clone_step(network, stream, x[:, t], y[:, t], lr, gain)
    total, sums, steps = 0.0, {}, x.shape[1] - burn_in
    for t in range(burn_in, x.shape[1]):
        stream, errors = clone_step(network, stream, x[:, t], y[:, t], lr, gain)
        total = total + sum(errors.values())
        for k, v in errors.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return total / max(steps, 1), {f"clone_{k}": v / max(steps, 1) for k, v in sums.items()}


def teacher_learning_rate(lr: float, gain: float, num_features: int) -> float:
    """The learning rate of plain SGD on ``z = V x`` (``V = gain · W / A``) that a clone of
    per-weight rate ``lr`` implements on ``num_features`` inputs.

    Args:
        lr: the per-weight rate.
        gain: the logit gain.
        num_features: ``A``.
    Returns:
        ``gain · lr / A``.
    """
    return gain * lr / num_features
