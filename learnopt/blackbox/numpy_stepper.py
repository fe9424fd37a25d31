"""The proposer's step for one instance in numpy (``NumpyStepper``): what the ask/tell session
runs, because per proposal it is faster than the torch step (``docs/blackbox``); it equals the
torch step to float32 rounding (tested in ``tests/test_blackbox.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from learnopt.blackbox.refine import clock


class NumpyStepper:
    """``RNNProposer.step`` for a single instance, in numpy, from a snapshot of the proposer's
    weights (in the proposer's dtype).

    A sequential session proposes one query at a time, so each proposal is a few dozen
    operations on vectors of a few hundred numbers, where numpy's dispatch costs less than
    torch's (``docs/blackbox/README.md`` has the timings). The arithmetic is ``nn.LSTMCell``'s
    (gate order i, f, g, o); sigmoids are written ``(1 + tanh(z / 2)) / 2``, which cannot
    overflow. Inputs may be float64 (they are cast); the queries come back as float64. Later
    changes to the proposer's weights do not reach an existing stepper.

    Args:
        proposer: the ``RNNProposer`` whose weights are copied.
    """

    def __init__(self, proposer: Any) -> None:
        dtype = torch.float64 if proposer.dtype == torch.float64 else torch.float32
        self.dtype = np.float64 if dtype == torch.float64 else np.float32

        def arr(t: Tensor) -> np.ndarray:
            return t.detach().to("cpu", dtype).numpy().copy()

        self.dim, self.num_queries, self.explore = proposer.dim, proposer.num_queries, proposer.explore
        self.hidden_size, self.input_size = proposer.hidden_size, proposer.input_size
        self.incumbent_at, self.trend, self.refine = proposer.incumbent_at, proposer.trend, proposer.refine
        hid = self.hidden_size
        # one matrix per layer acting on [input; h]; the sigmoid gates' rows are pre-scaled by 1/2
        scale = np.full(4 * hid, 0.5, dtype=self.dtype)
        scale[2 * hid:3 * hid] = 1.0
        self.layers = [(np.concatenate([arr(c.weight_ih), arr(c.weight_hh)], 1) * scale[:, None],
                        (arr(c.bias_ih) + arr(c.bias_hh)) * scale) for c in proposer.cells]
        head_w, head_b = arr(proposer.head.weight) * 0.5, arr(proposer.head.bias) * 0.5
        if self.explore:
            head_w = np.concatenate([head_w, arr(proposer.gate.weight) * 0.5])
            head_b = np.concatenate([head_b, arr(proposer.gate.bias) * 0.5])
        self.head = (head_w, head_b)
        self.stretch = None if proposer.stretch is None else max(float(proposer.stretch), 0.0)
        self.local = proposer.local
        if self.local:  # offsets (not halved: they are added to a logit) and the gate (halved)
            lh, lg = proposer.local_head, proposer.local_gate
            self.local_head = (np.concatenate([arr(lh.weight), arr(lg.weight) * 0.5]),
                               np.concatenate([arr(lh.bias), arr(lg.bias) * 0.5]))
        if self.refine:  # the gate (halved, as a sigmoid)
            self.refine_gate = (arr(proposer.refine_gate.weight) * 0.5, arr(proposer.refine_gate.bias) * 0.5)

    def initial_state(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``RNNProposer.initial_state`` for one instance: per layer ``(h, c)``, zeros."""
        zeros = np.zeros(self.hidden_size, dtype=self.dtype)
        return [(zeros, zeros) for _ in self.layers]

    def start_input(self) -> np.ndarray:
        """``RNNProposer.start_input`` for one instance: ``[input_size]``."""
        inp = np.zeros(self.input_size, dtype=self.dtype)
        inp[-1] = 1.0
        return inp

    def observation_input(self, x: np.ndarray, y_std: np.ndarray, best_std: float, best_x: np.ndarray,
                          trend: np.ndarray | None = None) -> np.ndarray:
        """``RNNProposer.observation_input`` for one instance.

        Args:
            x: ``[q, D]`` queries.
            y_std: ``[q]`` standardised observations.
            best_std: the standardised best value.
            best_x: ``[D]`` its query.
            trend: ``[D + 1]`` trend features (required with ``trend``).
        Returns:
            ``[input_size]``.
        Raises:
            ValueError: the proposer reads the trend and none is given.
        """
        q = x.shape[0]
        per_query = np.concatenate([2 * x - 1, y_std[:, None], np.full((q, 1), best_std)], 1)
        parts = [per_query.ravel(), 2 * best_x - 1]
        if self.trend:
            if trend is None:
                raise ValueError("NumpyStepper.observation_input: a proposer with trend=True needs the trend features")
            parts.append(trend)
        return np.concatenate(parts + [[0.0]]).astype(self.dtype)

    def refine_weight(self, state: list[tuple[np.ndarray, np.ndarray]], count: int) -> np.ndarray:
        """``RNNProposer.refine_weight`` for one instance.

        Args:
            state: per layer ``(h, c)``.
            count: observations so far.
        Returns:
            ``[q]``.
        """
        w, b = self.refine_gate
        return 0.5 + 0.5 * np.tanh(w @ np.concatenate([state[-1][0], clock(count).astype(self.dtype)]) + b)

    def step(self, inp: np.ndarray, state: list[tuple[np.ndarray, np.ndarray]], noise: np.ndarray | None = None,
             suggestion: np.ndarray | None = None, count: int = 0
             ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """``RNNProposer.step`` for one instance: the next queries and the new state.

        Args:
            inp: ``[input_size]``.
            state: per layer ``(h, c)``.
            noise: ``[q, D]`` uniform draws (required when exploring).
            suggestion: ``[D]`` the local model's suggestion, if any.
            count: observations so far.
        Returns:
            ``(x [q, D] float64, state)``.
        Raises:
            ValueError: an exploring proposer without ``noise``.
        """
        hid, h, new_state = self.hidden_size, inp.astype(self.dtype, copy=False), []
        for (w, b), (h_prev, c_prev) in zip(self.layers, state):
            t = np.tanh(w @ np.concatenate([h, h_prev]) + b)
            sig = 0.5 + 0.5 * t  # i, f, (unused), o
            c = sig[hid:2 * hid] * c_prev + sig[:hid] * t[2 * hid:3 * hid]
            h = sig[3 * hid:] * np.tanh(c)
            new_state.append((h, c))
        w, b = self.head
        out = 0.5 + 0.5 * np.tanh(w @ h + b)
        q, d = self.num_queries, self.dim
        x = out[:q * d].reshape(q, d)
        if self.stretch is not None:
            x = np.clip((1 + self.stretch) * x - self.stretch / 2, 0.0, 1.0)
        if self.local:
            at = self.incumbent_at
            best = np.clip((inp[at:at + d] + 1) / 2, 1e-4, 1 - 1e-4).astype(self.dtype)
            lw, lb = self.local_head
            raw = lw @ h + lb
            z = np.log(best / (1 - best))[None, :] + raw[:q * d].reshape(q, d)
            near = 0.5 + 0.5 * np.tanh(z / 2)
            r = (0.5 + 0.5 * np.tanh(raw[q * d:]))[:, None]
            x = r * near + (1 - r) * x
        if self.refine and suggestion is not None:
            r = self.refine_weight(new_state, count)[:, None]
            x = r * suggestion.astype(self.dtype)[None, :] + (1 - r) * x
        if self.explore:
            if noise is None:
                raise ValueError("NumpyStepper.step: an exploring proposer needs noise [q, D]")
            g = out[q * d:, None]
            x = g * noise.astype(self.dtype) + (1 - g) * x
        return x.astype(np.float64), new_state
