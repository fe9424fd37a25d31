"""The coordinate-wise LSTM optimizer of Andrychowicz et al. 2016 (arXiv 1606.04474)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.preprocess import log_and_sign
from learnopt.optim.base import Params


class LSTMOptimizerState(NamedTuple):
    """One (h, c) per coordinate and layer: ``[num_layers, num_coordinates, hidden_size]``."""

    h: Tensor
    c: Tensor


class CoordinatewiseLSTM(LearnedOptimizer):
    """θ_{t+1} = θ_t + g_t,  [g_t, h_{t+1}] = m(∇f(θ_t), h_t; φ).

    ``m`` is a ``num_layers``-layer LSTM with ``hidden_size`` units followed by a linear layer
    to one output, multiplied by ``output_scale``. Its weights φ are shared by every
    coordinate; every coordinate has its own (h, c). All coordinates of all parameter
    tensors (and of all task instances, which are just more coordinates) are flattened into
    the rows of one matrix, so each LSTM layer is one matmul per step.

    Paper defaults: 2 layers of 20 units. ``preprocess="log_sign"`` feeds
    ``log_and_sign(g, preprocess_p)`` (paper p = 10, authors' code p = 5); ``"none"`` feeds
    the raw gradient (the paper's quadratic setting, output scale 1). Output scale: paper 0.1
    on MNIST, the authors' code 0.01.
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess: Literal["none", "log_sign"] = "none",
        preprocess_p: float = 10.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if preprocess not in ("none", "log_sign"):
            raise ValueError(f"CoordinatewiseLSTM: preprocess must be 'none' or 'log_sign', got {preprocess!r}")
        if hidden_size < 1 or num_layers < 1:
            raise ValueError("CoordinatewiseLSTM: hidden_size and num_layers must be >= 1")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess = preprocess
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        in_features = 2 if preprocess == "log_sign" else 1
        self.cells = nn.ModuleList(
            nn.LSTMCell(in_features if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.output = nn.Linear(hidden_size, 1)

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess": self.preprocess,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
        }

    def init(self, params: Params) -> LSTMOptimizerState:
        n = sum(p.numel() for p in params.values())
        shape = (self.num_layers, n, self.hidden_size)
        zeros = torch.zeros(shape, device=self.device, dtype=self.dtype)
        return LSTMOptimizerState(zeros, zeros.clone())

    def _inputs(self, flat_grad: Tensor) -> Tensor:
        if self.preprocess == "log_sign":
            return log_and_sign(flat_grad, self.preprocess_p)
        return flat_grad.unsqueeze(-1)

    def update(self, grads: Params, state: LSTMOptimizerState, params: Params | None = None, **extra: Any):
        flat = torch.cat([g.reshape(-1).to(self.dtype) for g in grads.values()])
        if flat.shape[0] != state.h.shape[1]:
            raise ValueError(
                f"CoordinatewiseLSTM: state is for {state.h.shape[1]} coordinates, gradients have {flat.shape[0]}"
            )
        x = self._inputs(flat)
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            h, c = cell(x, (state.h[layer], state.c[layer]))
            hs.append(h)
            cs.append(c)
            x = h
        step = self.output(x).squeeze(-1) * self.output_scale
        updates, offset = {}, 0
        for k, g in grads.items():
            updates[k] = step[offset : offset + g.numel()].view(g.shape)
            offset += g.numel()
        return updates, LSTMOptimizerState(torch.stack(hs), torch.stack(cs))
