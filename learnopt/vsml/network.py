"""VSML: networks whose every weight is a small LSTM with shared parameters
(Kirsch & Schmidhuber 2021, "Meta Learning Backpropagation And Improving It", arXiv 2012.14905).

A dense layer from ``A`` inputs to ``B`` outputs holds ``A × B`` sub-LSTMs that all share one
set of parameters ``V``. Sub-LSTM ``(a, b)`` reads the forward message of input ``a`` and the
backward message of output ``b``; the forward message of output ``b`` is the mean over ``a``
of what the sub-LSTMs emit forward, the backward message of input ``a`` the mean over ``b``
of what they emit backward. Because ``V`` does not depend on ``A`` or ``B``, one learned
``V`` runs on any input size and class count. The states play the role of the weights and
of the learning state, so running the network forward *is* learning: nothing is trained by
gradient descent at meta-test time.

Per example (``reverse_pass=True``)::

    forward:  m⁰ = [x, 0, …]; for each layer l: micro_ticks ticks with (mˡ, 0) → mˡ⁺¹
              ŷ_b = bound · tanh(m^L_b[0] / bound)                       (prediction)
    backward: e = softmax(ŷ) − onehot(y);  bᴸ = [e, onehot(y) if label_feedback, 0, …]
              for each layer l from the top: micro_ticks ticks with (mˡ, bˡ) → bˡ⁻¹

With ``reverse_pass=False`` there is one pass per example: every layer ticks once with the
forward message of this example and the backward message left by the previous example (the
error reaches the last layer one step late and lower layers one step later per layer).

All sub-LSTMs of a layer are one batched op over ``[episodes, A, B]`` rows; the message
inputs are projected before broadcasting (``[E, A, 4H] + [E, B, 4H]``) so only the recurrent
matmul runs per row.

Initialisation follows the paper's code: truncated-normal weights, forget-gate bias +5 and
input-gate bias −5 (a fresh sub-LSTM keeps its state), hidden state zero, and the first half
of each cell state drawn at random with std ``1/√A`` per episode (the random "initial
weights" of the network).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnopt.task import haar_orthogonal


class LayerState(NamedTuple):
    """Hidden and cell state of one VSML layer, ``[E, A, B, H]`` each."""

    h: Tensor
    c: Tensor


class VSMLState(NamedTuple):
    """The whole network's carried state: per-layer LSTM states, the forward inputs of each
    layer for the current example (read again by the backward pass), and the backward message
    waiting for the next example (``reverse_pass=False``); with ``rotate_inputs``, each
    episode's random rotation of the input ``[E, A, A]``."""

    layers: tuple[LayerState, ...]
    forward_inputs: tuple[Tensor, ...]
    pending_backward: tuple[Tensor, ...]
    rotation: Tensor | None = None
    member_logits: Tensor | None = None  # with ``ensemble > 1``: each member's logits [E·R, C]


def _trunc_normal(*shape: int, std: float) -> Tensor:
    return nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-2 * std, b=2 * std)


class VSMLLayer(nn.Module):
    """One dense VSML layer: the shared sub-LSTM parameters ``V`` and the batched tick.

    Args:
        state_size: ``H``, the sub-LSTM's state size.
        message_size: ``M``, the message size.
    """

    def __init__(self, state_size: int = 16, message_size: int = 8) -> None:
        super().__init__()
        H, M = state_size, message_size
        self.state_size, self.message_size = H, M
        self.w_forward = nn.Parameter(_trunc_normal(M, 4 * H, std=1 / math.sqrt(2 * M + H)))
        self.w_backward = nn.Parameter(_trunc_normal(M, 4 * H, std=1 / math.sqrt(2 * M + H)))
        self.w_hidden = nn.Parameter(_trunc_normal(H, 4 * H, std=1 / math.sqrt(2 * M + H)))
        bias = torch.zeros(4 * H)
        bias[:H] = -5.0          # input gate: closed at first
        bias[H:2 * H] = 5.0      # forget gate: open, the state persists
        self.bias = nn.Parameter(bias)
        self.out_forward = nn.Parameter(_trunc_normal(H, M, std=1 / math.sqrt(H)))
        self.out_backward = nn.Parameter(_trunc_normal(H, M, std=1 / math.sqrt(H)))

    def init_state(self, episodes: int, fan_in: int, fan_out: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LayerState:
        """Zero hidden states and random cell states (half of each) for every sub-LSTM.

        Args:
            episodes: ``E``.
            fan_in: ``A``, input units.
            fan_out: ``B``, output units.
            generator: draws the cell states.
            device: where the state lives.
            dtype: its dtype.
        Returns:
            A ``LayerState``, ``[E, A, B, H]`` each.
        """
        H = self.state_size
        h = torch.zeros(episodes, fan_in, fan_out, H, device=device, dtype=dtype)
        half = H // 2
        noise = torch.randn(episodes, fan_in, fan_out, half, generator=generator,
                            device=generator.device if generator is not None else "cpu", dtype=dtype)
        c = torch.cat([noise.to(device) / math.sqrt(fan_in), h[..., half:]], dim=-1)
        return LayerState(h, c)

    def cell(self, state: LayerState, forward_in: Tensor, backward_in: Tensor) -> LayerState:
        """One LSTM tick of every sub-LSTM.

        Args:
            state: ``[E, A, B, H]`` hidden and cell states.
            forward_in: ``[E, A, M]`` forward messages.
            backward_in: ``[E, B, M]`` backward messages.
        Returns:
            The new ``LayerState``.
        """
        H = self.state_size
        gates = ((forward_in @ self.w_forward).unsqueeze(2) + (backward_in @ self.w_backward).unsqueeze(1)
                 + state.h @ self.w_hidden + self.bias)
        i, f, g, o = gates.split(H, dim=-1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return LayerState(h, c)

    def tick(self, state: LayerState, forward_in: Tensor, backward_in: Tensor) -> tuple[LayerState, Tensor, Tensor]:
        """A tick and the aggregated messages: forward (mean over inputs) and backward (mean over outputs).

        Args:
            state: the layer's state.
            forward_in: ``[E, A, M]``.
            backward_in: ``[E, B, M]``.
        Returns:
            ``(state, forward [E, B, M], backward [E, A, M])``.
        """
        state = self.cell(state, forward_in, backward_in)
        return state, (state.h.mean(1) @ self.out_forward), (state.h.mean(2) @ self.out_backward)


class VSMLNetwork(nn.Module):
    """A stack of VSML layers that learns online by message passing alone.

    Args:
        hidden_sizes: widths of the hidden VSML layers (``[]``: a single layer from the inputs
            straight to the class outputs).
        state_size: the sub-LSTM's state size (paper's code: 16).
        message_size: the message size (paper's code: 8).
        micro_ticks: LSTM ticks per layer per pass (paper: 2).
        reverse_pass: a backward pass per example (else errors travel with the next example's
            forward pass).
        label_feedback: the label is part of the last layer's backward message beside the error.
        output_bound: ``ŷ = bound · tanh(m / bound)``.
        bias_input: every layer gets one more input unit whose forward message is the constant 1
            (the bias of a dense layer); its sub-LSTMs share ``V`` with the others, so a learner
            trained without it can be fine-tuned with it (``init_from``).
        rotate_inputs: each episode multiplies its inputs by a random orthogonal matrix (Haar,
            drawn with the initial state), so the learner sees the features in a random basis. On
            Gaussian-projected inputs this changes nothing in distribution; on raw features it
            removes their axis-aligned structure (docs/vsml/experiments.md).
        input_copies: with ``rotate_inputs``, the first layer reads ``K`` copies of each example,
            each in its own random basis (``K·A`` input units whose forward messages the outputs
            average). ``V`` is shared, so ``K`` is a meta-test setting too: an ensemble of
            differently rotated weights that share the errors fed back (cost ``K`` times the
            first layer's).
        ensemble: ``R`` independent copies of the whole network per episode, each with its own
            initial state, rotations and error; the logits returned are
            ``log mean_r softmax(logits_r)``. A meta-test setting too (cost ``R`` times).
    Raises:
        ValueError: non-positive sizes, ``state_size`` or ``message_size`` below 2, ``micro_ticks``
            below 1, ``input_copies`` > 1 without ``rotate_inputs``, or a non-integer copy count.
    References:
        Kirsch & Schmidhuber 2021, "Meta Learning Backpropagation And Improving It", arXiv 2012.14905.
    """

    kind = "vsml_learner"

    def __init__(self, hidden_sizes: list[int] | tuple[int, ...] = (), state_size: int = 16, message_size: int = 8,
                 micro_ticks: int = 2, reverse_pass: bool = True, label_feedback: bool = True,
                 output_bound: float = 100.0, bias_input: bool = False, rotate_inputs: bool = False,
                 input_copies: int = 1, ensemble: int = 1) -> None:
        super().__init__()
        hidden_sizes = [int(s) for s in hidden_sizes]
        if any(s < 1 for s in hidden_sizes):
            raise ValueError(f"VSMLNetwork: hidden_sizes must be positive, got {hidden_sizes}")
        if state_size < 2 or message_size < 2:
            raise ValueError(f"VSMLNetwork: state_size and message_size must be >= 2 (the error and label "
                             f"share the backward message), got {state_size}, {message_size}")
        if micro_ticks < 1:
            raise ValueError(f"VSMLNetwork: micro_ticks must be >= 1, got {micro_ticks}")
        self.hidden_sizes = hidden_sizes
        self.state_size, self.message_size = state_size, message_size
        self.micro_ticks, self.reverse_pass, self.label_feedback = micro_ticks, reverse_pass, label_feedback
        self.output_bound = output_bound
        self.bias_input = bool(bias_input)
        self.rotate_inputs = bool(rotate_inputs)
        if int(input_copies) != input_copies or input_copies < 1:
            raise ValueError(f"VSMLNetwork: input_copies must be an integer >= 1, got {input_copies}")
        if input_copies > 1 and not self.rotate_inputs:
            raise ValueError("VSMLNetwork: input_copies > 1 needs rotate_inputs=True (copies in the same basis "
                             "would be the same input units)")
        self.input_copies = int(input_copies)
        if int(ensemble) != ensemble or ensemble < 1:
            raise ValueError(f"VSMLNetwork: ensemble must be an integer >= 1, got {ensemble}")
        self.ensemble = int(ensemble)
        self.layers = nn.ModuleList(VSMLLayer(state_size, message_size) for _ in range(len(hidden_sizes) + 1))
        # What weight a sub-LSTM currently implements, read linearly from its cell state. Only
        # learning-algorithm cloning trains it (learnopt.vsml.clone); it is a diagnostic otherwise.
        readout = torch.zeros(state_size)
        readout[0] = 1.0
        self.weight_readout = nn.Parameter(readout)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, what a checkpoint stores.

        Returns:
            ``{argument: value}``.
        """
        return {"hidden_sizes": list(self.hidden_sizes), "state_size": self.state_size,
                "message_size": self.message_size, "micro_ticks": self.micro_ticks,
                "reverse_pass": self.reverse_pass, "label_feedback": self.label_feedback,
                "output_bound": self.output_bound, "bias_input": self.bias_input,
                "rotate_inputs": self.rotate_inputs, "input_copies": self.input_copies, "ensemble": self.ensemble}

    # -- the online-learner protocol --------------------------------------------------------------
    def init_state(self, episodes: int, num_features: int, num_classes: int,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None) -> VSMLState:
        """Fresh learners for ``episodes`` episodes: random initial "weights" (half cell states).
        With ``ensemble = R``, member ``r`` of episode ``e`` is row ``e·R + r`` of the states.

        Args:
            episodes: ``E``.
            num_features: ``A``, input features.
            num_classes: ``C``.
            generator: draws the initial cell states (and rotations).
            device: where the state lives (None: the parameters' device).
        Returns:
            A ``VSMLState``.
        Raises:
            ValueError: no feature or fewer than 2 classes.
        """
        if num_features < 1 or num_classes < 2:
            raise ValueError(f"VSMLNetwork: needs >= 1 feature and >= 2 classes, got {num_features}, {num_classes}")
        episodes = episodes * self.ensemble
        device = device if device is not None else self.layers[0].bias.device
        dtype = self.layers[0].bias.dtype
        sizes = [num_features * self.input_copies, *self.hidden_sizes, num_classes]
        fan_ins = [a + self.bias_input for a in sizes[:-1]]
        layers = tuple(layer.init_state(episodes, a, b, generator, device, dtype)
                       for layer, a, b in zip(self.layers, fan_ins, sizes[1:]))
        M = self.message_size
        zeros_out = tuple(torch.zeros(episodes, b, M, device=device, dtype=dtype) for b in sizes[1:])
        zeros_in = tuple(torch.zeros(episodes, a, M, device=device, dtype=dtype) for a in fan_ins)
        rotation = None
        if self.rotate_inputs:
            rotation = torch.cat([haar_orthogonal(episodes, n=num_features, generator=generator, dtype=torch.float64)
                                  for _ in range(self.input_copies)], dim=2).to(device, dtype)
        return VSMLState(layers, zeros_in, zeros_out, rotation)

    def _embed(self, values: Tensor, *extra: Tensor) -> Tensor:
        """Scalars per unit [E, n] (and optional extra channels) into messages [E, n, M]."""
        parts = [values.unsqueeze(-1), *(e.unsqueeze(-1) for e in extra)]
        pad = self.message_size - len(parts)
        return F.pad(torch.cat(parts, -1), (0, pad))

    def _with_bias(self, message: Tensor) -> Tensor:
        """A layer's input messages [E, A, M], with the bias unit's [1, 0, …] appended if any."""
        if not self.bias_input:
            return message
        one = torch.zeros_like(message[:, :1])
        one[..., 0] = 1.0
        return torch.cat([message, one], 1)

    def _without_bias(self, backward: Tensor) -> Tensor:
        """Backward messages to a layer's inputs [E, A(+1), M], without the bias unit's."""
        return backward[:, :-1] if self.bias_input else backward

    def predict(self, state: VSMLState, x: Tensor) -> tuple[VSMLState, Tensor]:
        """Forward pass for one example per episode.

        Args:
            state: the current state.
            x: ``[E, A]``.
        Returns:
            ``(state, logits [E, C])``.
        """
        if self.ensemble > 1:
            x = x.repeat_interleave(self.ensemble, 0)
        if state.rotation is not None:
            x = (x.unsqueeze(1) @ state.rotation).squeeze(1)
        message = self._embed(x)
        layers, inputs = list(state.layers), []
        for l, layer in enumerate(self.layers):
            message = self._with_bias(message)
            inputs.append(message)
            waiting = state.pending_backward[l]
            backward = waiting if not self.reverse_pass else torch.zeros_like(waiting)
            for _ in range(self.micro_ticks):
                layers[l], out, below = layer.tick(layers[l], message, backward)
            if not self.reverse_pass:  # the lower layer's next backward message
                pending = list(state.pending_backward)
                if l > 0:
                    pending[l - 1] = self._without_bias(below)
                state = state._replace(pending_backward=tuple(pending))
            message = out
        logits = self.output_bound * torch.tanh(message[..., 0] / self.output_bound)
        state = VSMLState(tuple(layers), tuple(inputs), state.pending_backward, state.rotation)
        if self.ensemble == 1:
            return state, logits
        log_probs = torch.log_softmax(logits, -1).unflatten(0, (-1, self.ensemble))
        return state._replace(member_logits=logits), torch.logsumexp(log_probs, 1) - math.log(self.ensemble)

    def feedback(self, state: VSMLState, logits: Tensor, y: Tensor) -> VSMLState:
        """Tell the learner the labels of the example it just predicted. Ensemble
        members each get their own error (``logits`` is then the ensemble's, not used).

        Args:
            state: the state after ``predict``.
            logits: ``[E, C]`` what ``predict`` returned.
            y: ``[E]`` the labels.
        Returns:
            The new state.
        """
        if self.ensemble > 1:
            logits, y = state.member_logits, y.repeat_interleave(self.ensemble, 0)
        onehot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
        error = torch.softmax(logits, -1) - onehot
        backward = self._embed(error, onehot) if self.label_feedback else self._embed(error)
        if not self.reverse_pass:
            pending = list(state.pending_backward)
            pending[-1] = backward
            return state._replace(pending_backward=tuple(pending))
        layers = list(state.layers)
        for l in reversed(range(len(self.layers))):
            for _ in range(self.micro_ticks):
                layers[l], _, below = self.layers[l].tick(layers[l], state.forward_inputs[l], backward)
            backward = self._without_bias(below)
        return state._replace(layers=tuple(layers))

    # -- user-facing ------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
        """Online episodes, each step predicted before its label was fed back.

        Args:
            x: ``[E, T, A]`` inputs.
            y: ``[E, T]`` labels.
            num_classes: ``C``.
            generator: draws the initial states.
        Returns:
            ``[E, T, C]`` logits.
        """
        from learnopt.vsml.online import online_episode

        return online_episode(self, x, y, num_classes, generator)

    @torch.no_grad()
    def online(self, x: Any, y: Any, num_classes: int | None = None, seed: int = 0) -> Tensor:
        """Learn online from one stream: the class predicted for each example before its label was seen.

        Args:
            x: ``[N, features]`` inputs.
            y: ``[N]`` class indices.
            num_classes: ``C`` (None: from ``y``).
            seed: the episode's generator seed.
        Returns:
            ``[N]`` int64 predictions.
        """
        from learnopt.vsml.online import online_predictions

        return online_predictions(self, x, y, num_classes, seed)
