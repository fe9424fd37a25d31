"""The coordinate-wise LSTM optimizer of Andrychowicz et al. 2016 (arXiv 1606.04474)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.preprocess import log_and_sign
from learnopt.optim.base import Params
from learnopt.optim.torch_optimizer import TransformOptimizer

# Rows per block of the in-place step: large enough that the ~35 tensor operations per block
# cost little next to its arithmetic, small enough that a block's gates stay in cache.
INPLACE_BLOCK_ROWS = 8192


class LSTMOptimizerState(NamedTuple):
    """One (h, c) per coordinate and layer: ``[num_layers, num_coordinates, hidden_size]``."""

    h: Tensor
    c: Tensor


class FusedLSTMCell(torch.autograd.Function):
    """One step of ``nn.LSTMCell`` with the weights fused by ``CoordinatewiseLSTM._fused_weights``
    and a hand-written backward pass.

    Forward: one ``addmm`` on ``[x, h]``, one contiguous sigmoid for all four gates (the cell
    input's tanh(z) = 1 − 2 σ(−2z), its pre-activation scaled by −2 in ``w`` and ``b``), the
    tanh of the new cell state through the same identity. Backward: the LSTM's gate
    derivatives written into one ``[N, 4H]`` buffer, then one matmul each for the inputs and
    the weights. Same values and gradients as ``nn.LSTMCell`` up to rounding (tested against
    it); on CPU ``torch.tanh``, sigmoids of strided gate slices and autograd's per-operation
    temporaries cost several times more than this. Differentiable once (meta-gradients need
    no more: the inner gradients fed to the LSTM are constants or come from the task's graph).
    """

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, c: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        hidden = h.shape[-1]
        xh = torch.cat([x, h], dim=1)
        s = torch.addmm(b, xh, w).sigmoid_()
        i, f, o, s_g = s.split(hidden, dim=1)
        tanh_g = torch.mul(s_g, -2.0).add_(1.0)
        c_new = torch.mul(f, c).addcmul_(i, tanh_g)
        tanh_c = torch.mul(c_new, -2.0).sigmoid_().mul_(-2.0).add_(1.0)
        h_new = o * tanh_c
        ctx.save_for_backward(xh, w, s, c, tanh_g, tanh_c)
        ctx.in_features = x.shape[1]
        return h_new, c_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor | None, dc: Tensor | None):
        xh, w, s, c, tanh_g, tanh_c = ctx.saved_tensors
        hidden = tanh_c.shape[-1]
        i, f, o, _ = s.split(hidden, dim=1)
        if dh is None:
            dh = torch.zeros_like(tanh_c)
        dc_total = torch.mul(tanh_c, tanh_c).neg_().add_(1.0).mul_(o).mul_(dh)  # dh o (1 − tanh² c)
        if dc is not None:
            dc_total.add_(dc)
        d_gates = torch.addcmul(s, s, s, value=-1.0)  # σ' = s (1 − s), then times each gate's upstream
        d_i, d_f, d_o, d_g = d_gates.split(hidden, dim=1)
        d_i.mul_(dc_total).mul_(tanh_g)
        d_f.mul_(dc_total).mul_(c)
        d_o.mul_(dh).mul_(tanh_c)
        d_g.mul_(dc_total).mul_(i).mul_(-2.0)  # tanh_g = 1 − 2 s_g
        needs = ctx.needs_input_grad
        dx = dh_prev = dw = db = None
        if needs[0] or needs[1]:
            dxh = d_gates @ w.t()
            dx, dh_prev = dxh[:, : ctx.in_features], dxh[:, ctx.in_features:]
        dc_prev = dc_total.mul_(f) if needs[2] else None
        if needs[3]:
            dw = xh.t() @ d_gates
        if needs[4]:
            db = d_gates.sum(0)
        return dx, dh_prev, dc_prev, dw, db


def fused_lstm_cell(x: Tensor, h: Tensor, c: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, c)`` after one LSTM step of ``FusedLSTMCell``."""
    return FusedLSTMCell.apply(x, h, c, w, b)


class CoordinatewiseLSTM(LearnedOptimizer):
    """θ_{t+1} = θ_t + g_t,  [g_t, h_{t+1}] = m(∇f(θ_t), h_t; φ).

    ``m`` is a ``num_layers``-layer LSTM with ``hidden_size`` units followed by a linear layer
    to one output, multiplied by ``output_scale``. Its weights φ are shared by every
    coordinate; every coordinate has its own (h, c). All coordinates of all parameter
    tensors (and of all task instances, which are just more coordinates) are flattened into
    the rows of one matrix, so each LSTM layer is one matmul per step (``fused_lstm_cell``;
    the weights stay those of ``nn.LSTMCell`` modules, so checkpoints keep their layout).

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
        # unbind, not state.h[layer]: its backward is one stack, where each index's backward
        # would fill a zero tensor of the whole state
        h_in, c_in = state.h.unbind(0), state.c.unbind(0)
        for layer, (w, b) in enumerate(self._fused_weights()):
            h, c = fused_lstm_cell(x, h_in[layer], c_in[layer], w, b)
            hs.append(h)
            cs.append(c)
            x = h
        step = self.output(x).squeeze(-1) * self.output_scale
        updates, offset = {}, 0
        for k, g in grads.items():
            updates[k] = step[offset : offset + g.numel()].view(g.shape)
            offset += g.numel()
        return updates, LSTMOptimizerState(torch.stack(hs), torch.stack(cs))

    # -- the fast drop-in path --------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, grads: Params, state: LSTMOptimizerState, params: Params | None = None,
                block_rows: int = INPLACE_BLOCK_ROWS) -> Params:
        """``update`` for a caller that owns ``state`` and needs no graph (the drop-in
        ``torch.optim`` step): overwrites ``state`` in place and returns the updates.

        Same arithmetic as ``update`` (tested to match it), arranged for speed: the rows are
        processed in blocks of ``block_rows`` so each block's gates stay in cache; each layer is
        one ``addmm`` on ``[x, h]`` with the two weight matrices and biases fused, its gate
        columns reordered to (i, f, o, g) with the g columns scaled by −2, so that one in-place
        sigmoid over the whole block gives the three gates and, through
        tanh(z) = 1 − 2 σ(−2z), the cell input (``torch.tanh`` is ~10× slower than
        ``torch.sigmoid`` on this CPU); each remaining elementwise formula is one
        ``addcmul``; no tensor of the size of the state is allocated.
        """
        flat = torch.cat([g.reshape(-1).to(self.dtype) for g in grads.values()])
        n, hidden = flat.shape[0], self.hidden_size
        if state.h.shape[1] != n:
            raise ValueError(f"CoordinatewiseLSTM: state is for {state.h.shape[1]} coordinates, gradients have {n}")
        fused, out_w, out_b = self._inference_weights()
        step = torch.empty(n, 1, device=flat.device, dtype=self.dtype)
        rows = min(block_rows, n)
        width = max(w.shape[0] for w, _ in fused)
        xh = torch.empty(rows, width, device=flat.device, dtype=self.dtype)
        gates = torch.empty(rows, 4 * hidden, device=flat.device, dtype=self.dtype)
        tanh_c = torch.empty(rows, hidden, device=flat.device, dtype=self.dtype)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            m = end - start
            x = self._inputs_into(flat[start:end], xh[:m])
            for layer, (w, b) in enumerate(fused):
                h, c = state.h[layer, start:end], state.c[layer, start:end]
                k = x.shape[1]
                if layer > 0:
                    xh[:m, :k].copy_(x)
                xh[:m, k: k + hidden].copy_(h)
                g = gates[:m]
                torch.addmm(b, xh[:m, : k + hidden], w, out=g)
                g.sigmoid_()
                i, f, o, s = g[:, :hidden], g[:, hidden: 2 * hidden], g[:, 2 * hidden: 3 * hidden], g[:, 3 * hidden:]
                torch.addcmul(i, i, s, value=-2.0, out=s)  # i tanh(z_g) = i (1 − 2 σ(−2 z_g))
                torch.addcmul(s, f, c, out=c)  # c ← f c + i tanh(z_g)
                t = tanh_c[:m]
                torch.mul(c, -2.0, out=t).sigmoid_()
                torch.addcmul(o, o, t, value=-2.0, out=h)  # o tanh(c) = o (1 − 2 σ(−2c))
                x = h
            torch.addmm(out_b, x, out_w, out=step[start:end])
        step = step.view(-1)
        updates, offset = {}, 0
        for name, g in grads.items():
            updates[name] = step[offset: offset + g.numel()].view(g.shape)
            offset += g.numel()
        return updates

    def _inputs_into(self, g: Tensor, out: Tensor) -> Tensor:
        """``_inputs(g)`` written into the first columns of ``out`` (the block's ``[x, h]``)."""
        if self.preprocess == "none":
            out[:, 0].copy_(g)
            return out[:, :1]
        p = self.preprocess_p
        threshold = math.exp(-p)
        big = g.abs() >= threshold
        first, second = out[:, 0], out[:, 1]
        minus_one = torch.tensor(-1.0, dtype=out.dtype, device=out.device)
        torch.where(big, torch.log(g.abs().clamp_min(threshold)).div_(p), minus_one, out=first)
        torch.where(big, torch.sign(g), g * math.exp(p), out=second)
        return out[:, :2]

    def _inference_weights(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
        """``_fused_weights()`` and the output layer (scale folded in) for ``update_``, cached
        until a weight changes (tensor versions), so a drop-in step on a small model does not
        rebuild them every time."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cached = getattr(self, "_inference_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weights = (self._fused_weights(), self.output.weight.t().mul(self.output_scale),
                           self.output.bias.mul(self.output_scale))
            self._inference_cache = (key, weights)
        return self._inference_cache[1]

    def _fused_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(W, b)`` with ``[x, h] @ W + b`` the gate pre-activations in the order
        (i, f, o, g), the g columns scaled by −2 (see ``update_``)."""
        hidden = self.hidden_size
        order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                           torch.arange(2 * hidden, 3 * hidden)]).to(self.device)
        scale = torch.ones(4 * hidden, device=self.device, dtype=self.dtype)
        scale[3 * hidden:] = -2.0
        fused = []
        for cell in self.cells:
            w = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)[order] * scale[:, None]
            b = (cell.bias_ih + cell.bias_hh)[order] * scale
            fused.append((w.t().contiguous(), b))
        return fused

    def as_torch_optimizer(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
                           **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` that steps with the in-place ``update_``
        (``inplace_update=None`` selects the functional ``update``)."""
        options.setdefault("inplace_update", self.update_)
        return TransformOptimizer(self.transform(), params, **options)
