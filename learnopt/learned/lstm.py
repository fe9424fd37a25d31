"""The coordinate-wise LSTM optimizer of Andrychowicz et al. 2016 (arXiv 1606.04474)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.features import TransformFeatures
from learnopt.learned.preprocess import log_and_sign
from learnopt.optim.base import Params
from learnopt.optim.torch_optimizer import TransformOptimizer

# Coordinates per block of the in-place step: large enough that the ~35 tensor operations per block
# cost little next to its arithmetic, small enough that a block's gates stay in cache.
INPLACE_BLOCK_ROWS = 8192
# On an accelerator there is no cache to keep a block in, and each tensor operation is a kernel
# launch: small blocks make the step launch-bound (docs/benchmarks, section 4). There a block's
# gates may take this many elements (128 MiB in float32).
ACCELERATOR_BLOCK_ELEMENTS = 1 << 25


class LSTMOptimizerState(NamedTuple):
    """One (h, c) per layer, unit and coordinate: ``[num_layers, hidden_size, num_coordinates]``
    (feature-major: each unit's values over all coordinates are contiguous, so every
    elementwise operation of the LSTM runs over long contiguous rows)."""

    h: Tensor
    c: Tensor


class FusedLSTMStack(torch.autograd.Function):
    """One step of a stack of ``nn.LSTMCell`` layers and the linear output layer on top, on
    feature-major data, all in one autograd node with a hand-written backward pass.

    ``apply(x, h, c, out_w, out_b, w_0, b_0, w_1, b_1, ...)``: ``x [k, N]`` the first layer's
    inputs, ``h, c [L, H, N]`` the state, ``out_w [1, H]`` and ``out_b [1]`` the output layer,
    ``w_l [4H, k_l + H]`` and ``b_l [4H]`` layer l's weights fused by
    ``CoordinatewiseLSTM._fused_weights`` (gate rows in the order i, f, o, g, the g rows scaled
    by −2). Returns ``(out [N], h_new, c_new)``, the state ``[L, H, N]`` each.

    Forward, per layer: one matmul ``[b W] [1; x; h]`` giving the gates as ``[4H, N]`` (each
    gate a contiguous block of rows), one sigmoid over all of it (the cell input's
    tanh(z) = 1 − 2 σ(−2z), the −2 folded into ``W`` and ``b``), the tanh of the new cell state
    through the same identity. Only the gates are saved for the backward pass; ``[x; h]`` and
    tanh(c) are rebuilt there from tensors the caller keeps anyway (a truncation holds K
    steps of whatever is saved, and this pass is bound by memory traffic). Backward: the gate
    derivatives written into one ``[4H, N]`` buffer, then one matmul each for the inputs and
    the weights. The output layer inside the node spares autograd a zero-filled
    ``[L, H, N]`` gradient for the top layer's slice every step. Same values and gradients as
    ``nn.LSTMCell`` + ``nn.Linear`` up to rounding (tested against them, and gradchecked). On CPU,
    ``torch.tanh``, elementwise work on strided gate slices and the copies of a per-layer
    ``torch.stack`` cost more than this (``docs/benchmarks``).
    Differentiable once (meta-gradients need no more: the inner gradients fed to the LSTM are
    constants or come from the task's graph, and their gradient is returned).
    """

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, c: Tensor, out_w: Tensor, out_b: Tensor,
                *weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        layers, hidden = h.shape[0], h.shape[1]
        h_new, c_new = torch.empty_like(h), torch.empty_like(c)
        ones = torch.ones(1, h.shape[2], device=h.device, dtype=h.dtype)
        gates = []
        inp = x
        for layer in range(layers):
            w, b = weights[2 * layer], weights[2 * layer + 1]
            # the bias as a weight column on a row of ones: addmm would first fill the whole
            # [4H, N] output with the broadcast bias, a pass over memory as long as the matmul
            xh = torch.cat([ones, inp, h[layer]], dim=0)
            s = torch.mm(torch.cat([b.unsqueeze(1), w], dim=1), xh).sigmoid_()
            del xh  # transient: the backward pass rebuilds it from x, h and h_new, which are kept anyway
            i, f, o, s_g = s.split(hidden, dim=0)
            cn = torch.mul(f, c[layer], out=c_new[layer]).add_(i).addcmul_(i, s_g, value=-2.0)  # f c + i (1 − 2 σ)
            tanh_c = torch.mul(cn, -2.0).sigmoid_().mul_(-2.0).add_(1.0)
            torch.mul(o, tanh_c, out=h_new[layer])
            gates.append(s)
            inp = h_new[layer]
        out = torch.addmm(out_b.unsqueeze(1), out_w, inp).squeeze(0)
        # Saved: the gates and what the caller keeps alive anyway (inputs, new state), not the
        # layers' [x; h] or tanh(c): a truncation holds K steps of these, and the backward pass
        # is bound by memory traffic, so what it recomputes costs less than what it would read.
        ctx.save_for_backward(x, h, c, h_new, c_new, out_w, *weights, *gates)
        ctx.layers = layers
        return out, h_new, c_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor | None, dh_new: Tensor | None, dc_new: Tensor | None):
        layers = ctx.layers
        x, h, c, h_new, c_new, out_w, *rest = ctx.saved_tensors
        weights, gates = rest[: 2 * layers], rest[2 * layers:]
        hidden = c.shape[1]
        d_out_w = d_out_b = None
        # the gradient reaching the top layer's h: from the output layer and from the caller
        if d_out is not None:
            d_out_w = d_out.unsqueeze(0) @ h_new[-1].t()
            d_out_b = d_out.sum().reshape(1)
            top = torch.mm(out_w.t(), d_out.unsqueeze(0))
            if dh_new is not None:
                top.add_(dh_new[-1])
        else:
            top = dh_new[-1].clone() if dh_new is not None else torch.zeros_like(c[-1])
        dh_prev, dc_prev = torch.empty_like(c), torch.empty_like(c)
        d_weights: list[Tensor | None] = [None] * (2 * layers)
        dh = top
        for layer in reversed(range(layers)):
            s = gates[layer]
            tanh_c = torch.mul(c_new[layer], -2.0).sigmoid_().mul_(-2.0).add_(1.0)
            w = weights[2 * layer]
            k = w.shape[1] - hidden
            i, f, o, s_g = s.split(hidden, dim=0)
            dc_total = torch.mul(tanh_c, tanh_c).neg_().add_(1.0).mul_(o).mul_(dh)  # dh o (1 − tanh² c)
            if dc_new is not None:
                dc_total.add_(dc_new[layer])
            d_gates = torch.addcmul(s, s, s, value=-1.0)  # σ' = s (1 − s), then times each gate's upstream
            d_i, d_f, d_o, d_g = d_gates.split(hidden, dim=0)
            d_g.mul_(dc_total).mul_(i).mul_(-2.0)  # tanh_g = 1 − 2 s_g
            d_i.mul_(dc_total).addcmul_(d_i, s_g, value=-2.0)  # × tanh_g
            d_f.mul_(dc_total).mul_(c[layer])
            d_o.mul_(dh).mul_(tanh_c)
            if ctx.needs_input_grad[5 + 2 * layer]:
                xh = torch.cat([x if layer == 0 else h_new[layer - 1], h[layer]], dim=0)
                d_weights[2 * layer] = torch.mm(xh, d_gates.t()).t()  # [K, 4H] is the fast shape
            if ctx.needs_input_grad[6 + 2 * layer]:
                d_weights[2 * layer + 1] = d_gates.sum(1)
            if layer > 0 or ctx.needs_input_grad[0]:
                dxh = torch.mm(w.t(), d_gates)
                dh_prev[layer].copy_(dxh[k:])
                dh = dxh[:k]
                if layer > 0 and dh_new is not None:
                    dh.add_(dh_new[layer - 1])
            else:
                torch.mm(w[:, k:].t(), d_gates, out=dh_prev[layer])
                dh = None
            torch.mul(dc_total, f, out=dc_prev[layer])
        dx = dh if ctx.needs_input_grad[0] else None
        return (dx, dh_prev, dc_prev, d_out_w, d_out_b, *d_weights)


def fused_lstm_stack(x: Tensor, h: Tensor, c: Tensor, output: tuple[Tensor, Tensor],
                     weights: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, h, c)`` after one step of ``FusedLSTMStack``; ``output`` is ``(out_w, out_b)``,
    ``weights`` as ``_fused_weights()``.

    Args:
        x: ``[k, N]`` the first layer's inputs.
        h: ``[L, H, N]`` hidden state.
        c: ``[L, H, N]`` cell state.
        output: ``(out_w [1, H], out_b [1])``.
        weights: per layer ``(W, b)`` as ``CoordinatewiseLSTM._fused_weights()``.
    Returns:
        ``(out [N], h [L, H, N], c [L, H, N])``.
    """
    return FusedLSTMStack.apply(x, h, c, *output, *(t for wb in weights for t in wb))


class CoordinatewiseLSTM(LearnedOptimizer):
    """θ_{t+1} = θ_t + g_t,  [g_t, h_{t+1}] = m(∇f(θ_t), h_t; φ).

    ``m`` is a ``num_layers``-layer LSTM with ``hidden_size`` units followed by a linear layer
    to one output, multiplied by ``output_scale``. Its weights φ are shared by every
    coordinate; every coordinate has its own (h, c). All coordinates of all parameter
    tensors (and of all task instances, which are just more coordinates) are flattened into
    the columns of one feature-major matrix, so each LSTM layer is one matmul per step and
    the whole stack one autograd node (``FusedLSTMStack``; the weights stay those of
    ``nn.LSTMCell`` modules, so checkpoints keep their layout). The state is
    ``[num_layers, hidden_size, coordinates]`` (``LSTMOptimizerState``).

    Args:
        hidden_size: units per layer (paper: 20).
        num_layers: LSTM layers (paper: 2).
        preprocess: ``"log_sign"`` feeds ``log_and_sign(g, preprocess_p)``; ``"none"`` the raw
            gradient (the paper's quadratic setting, output scale 1).
        preprocess_p: ``p`` of ``log_and_sign`` (paper 10, the authors' code 5).
        output_scale: multiplies the output (paper 0.1 on MNIST, the authors' code 0.01).
    Raises:
        ValueError: an unknown ``preprocess``, sizes below 1, or a non-finite or non-positive ``p``
            or non-finite ``output_scale``.
    References:
        Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent",
        arXiv 1606.04474.
    """

    separable = True  # coordinate-wise: the drop-in runs it one parameter tensor at a time

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
        if not math.isfinite(preprocess_p) or preprocess_p <= 0:
            raise ValueError(f"CoordinatewiseLSTM: preprocess_p must be finite and > 0, got {preprocess_p!r}")
        if not math.isfinite(output_scale):
            raise ValueError(f"CoordinatewiseLSTM: output_scale must be finite, got {output_scale!r}")
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
        """Zero ``(h, c)`` for every coordinate of ``params``.

        Args:
            params: ``{name: tensor}``.
        Returns:
            ``LSTMOptimizerState`` with ``h, c`` of shape ``[num_layers, hidden_size, coordinates]``.
        """
        n = sum(p.numel() for p in params.values())
        first = self._input_rows + 1
        h = self._scratch_buffer(n)[first: first + self.num_layers * self.hidden_size]
        c = torch.zeros(self.num_layers, self.hidden_size, n, device=self.device, dtype=self.dtype)
        return LSTMOptimizerState(h.view(self.num_layers, self.hidden_size, n), c)

    @property
    def _input_rows(self) -> int:
        return 2 if self.preprocess == "log_sign" else 1

    @property
    def _buffer_rows(self) -> int:
        """Rows of ``_scratch_buffer``: a row of ones, the inputs, every layer's ``h``, a row of ones."""
        return self._input_rows + 2 + self.num_layers * self.hidden_size

    def _scratch_buffer(self, n: int) -> Tensor:
        """``[1 + inputs + L·H + 1, n]`` zeros with the first and last rows ones: the rows are
        (1, x, h_1, …, h_L, 1). ``init`` places ``h`` inside it, so the drop-in step reads each
        layer's input ``[1; x; h_1]``, ``[h_{l−1}; h_l]`` or ``[h_{L−1}; h_L; 1]`` as one
        contiguous block of rows, without copies and with the bias as a weight column."""
        buffer = torch.zeros(self._buffer_rows, n, device=self.device, dtype=self.dtype)
        buffer[0] = 1.0
        buffer[-1] = 1.0
        return buffer

    def _inputs(self, flat_grad: Tensor) -> Tensor:
        """The first layer's inputs, feature-major: ``[features, N]``."""
        if self.preprocess == "log_sign":
            return log_and_sign(flat_grad, self.preprocess_p).t()
        return flat_grad.unsqueeze(0)

    def _check_state(self, state: LSTMOptimizerState, n: int) -> None:
        expected = (self.num_layers, self.hidden_size, n)
        if tuple(state.h.shape) != expected or tuple(state.c.shape) != expected:
            raise ValueError(
                f"CoordinatewiseLSTM: state h {tuple(state.h.shape)}, c {tuple(state.c.shape)} does not fit "
                f"{n} coordinates; expected [num_layers, hidden_size, coordinates] = {list(expected)}"
            )

    def update(self, grads: Params, state: LSTMOptimizerState, params: Params | None = None, **extra: Any):
        """One step of the LSTM on every coordinate, differentiable in its weights.

        Args:
            grads: ``{name: gradient}``.
            state: the state from ``init`` or the previous ``update``.
            params: unused (the protocol's argument).
            **extra: ignored.
        Returns:
            ``(updates, state)``.
        Raises:
            ValueError: the state does not fit the number of coordinates.
        """
        flat = torch.cat([g.reshape(-1).to(self.dtype) for g in grads.values()])
        self._check_state(state, flat.shape[0])
        output = (self.output.weight * self.output_scale, self.output.bias * self.output_scale)
        step, h, c = fused_lstm_stack(self._inputs(flat), state.h, state.c, output, self._fused_weights())
        return TransformFeatures.unflatten(step, grads), LSTMOptimizerState(h, c)

    # -- the fast drop-in path --------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, grads: Params, state: LSTMOptimizerState, params: Params | None = None,
                block_rows: int | None = None) -> Params:
        """``update`` for a caller that owns ``state`` and needs no graph (the drop-in
        ``torch.optim`` step): overwrites ``state`` in place and returns the updates.

        Same arithmetic as ``update`` (tested to match it), arranged for speed: the
        coordinates are processed in blocks of ``block_rows`` so each block's gates stay in
        cache. ``h`` lives in the rows of a buffer (``_scratch_buffer``) between a row of ones,
        the inputs and a last row of ones, so each layer is one matmul on a contiguous block
        of rows with the bias as a weight column, and writes its new ``h`` back into its own
        rows: nothing is copied. ``block_rows`` defaults to ``INPLACE_BLOCK_ROWS`` on CPU and
        elsewhere to ``ACCELERATOR_BLOCK_ELEMENTS // (4 · hidden_size)``, but never fewer than
        ``INPLACE_BLOCK_ROWS``. One in-place sigmoid over the gates gives the three gates and the
        cell input (see ``FusedLSTMStack``), and each remaining formula is one ``addcmul`` over
        contiguous rows. No tensor of the size of the state is allocated. A state made elsewhere (a
        copy, a loaded state dict) is moved into such a buffer on its first step (``Tensor.set_``: same
        tensor objects, same values).

        Args:
            grads: ``{name: gradient}``.
            state: the state, overwritten in place.
            params: unused (the protocol's argument).
            block_rows: coordinates per block (None: the default above).
        Returns:
            ``{name: update}``.
        Raises:
            ValueError: the state does not fit the number of coordinates.
        """
        flat = torch.cat([g.reshape(-1).to(self.dtype) for g in grads.values()])
        n, hidden, layers, k0 = flat.shape[0], self.hidden_size, self.num_layers, self._input_rows
        self._check_state(state, n)
        if n == 0:  # only empty tensors: nothing to update
            return {k: torch.zeros_like(g) for k, g in grads.items()}
        buffer = self._buffer_of(state.h, n)
        if buffer is None:
            buffer = self._scratch_buffer(n)
            buffer[k0 + 1: k0 + 1 + layers * hidden].view(layers, hidden, n).copy_(state.h)
            state.h.set_(buffer.untyped_storage(), (k0 + 1) * n, state.h.shape, state.h.stride())
        else:
            buffer[0].fill_(1.0)
            buffer[-1].fill_(1.0)
        fused, (out_w, out_rows) = self._inference_weights()
        step = torch.empty(1, n, device=flat.device, dtype=self.dtype)
        if block_rows is None:
            block_rows = (INPLACE_BLOCK_ROWS if flat.device.type == "cpu"
                          else max(INPLACE_BLOCK_ROWS, ACCELERATOR_BLOCK_ELEMENTS // (4 * hidden)))
        cols = min(block_rows, n)
        gates = torch.empty(4 * hidden, cols, device=flat.device, dtype=self.dtype)
        tanh_c = torch.empty(hidden, cols, device=flat.device, dtype=self.dtype)
        for start in range(0, n, cols):
            end = min(start + cols, n)
            m = end - start
            block = buffer[:, start:end]
            self._inputs_into(flat[start:end], block[1: k0 + 1])
            for layer, (w, b, (first, last)) in enumerate(fused):
                g = gates[:, :m]
                if b is None:
                    torch.mm(w, block[first:last], out=g)
                else:
                    torch.addmm(b, w, block[first:last], out=g)
                c = state.c[layer, :, start:end]
                row = k0 + 1 + layer * hidden
                g.sigmoid_()
                i, f, o, s = g[:hidden], g[hidden: 2 * hidden], g[2 * hidden: 3 * hidden], g[3 * hidden:]
                torch.addcmul(i, i, s, value=-2.0, out=s)  # i tanh(z_g) = i (1 − 2 σ(−2 z_g))
                torch.addcmul(s, f, c, out=c)  # c ← f c + i tanh(z_g)
                t = tanh_c[:, :m]
                torch.mul(c, -2.0, out=t).sigmoid_()
                torch.addcmul(o, o, t, value=-2.0, out=block[row: row + hidden])  # h ← o (1 − 2 σ(−2c))
            torch.mm(out_w, block[out_rows[0]: out_rows[1]], out=step[:, start:end])
        return TransformFeatures.unflatten(step.view(-1), grads)

    def _buffer_of(self, h: Tensor, n: int) -> Tensor | None:
        """The ``_scratch_buffer`` that ``h`` lives in, or None for a state made elsewhere."""
        rows = self._buffer_rows
        if (not h.is_contiguous() or h.storage_offset() != (self._input_rows + 1) * n
                or h.untyped_storage().nbytes() != rows * n * h.element_size()):
            return None
        return h.as_strided((rows, n), (n, 1), 0)

    def _inputs_into(self, g: Tensor, out: Tensor) -> None:
        """``_inputs(g)`` written into the rows ``out``: for ``log_sign``,
        log(max(|g|, e^−p)) / p (which is −1 below the threshold) and clamp(e^p g, −1, 1)
        (which is sign g above it), the two cases of ``log_and_sign`` in two formulas."""
        if self.preprocess == "none":
            out[0].copy_(g)
            return
        p = self.preprocess_p
        torch.abs(g, out=out[0]).clamp_min_(math.exp(-p)).log_().mul_(1.0 / p)
        torch.mul(g, math.exp(p), out=out[1]).clamp_(-1.0, 1.0)

    def _inference_weights(self) -> tuple[list[tuple[Tensor, Tensor | None, tuple[int, int]]],
                                           tuple[Tensor, tuple[int, int]]]:
        """For ``update_``: per layer ``(W, b or None, rows)``, ``W`` applied to ``rows`` of the
        scratch buffer, the bias a column of ``W`` where a row of ones is adjacent (first and
        last layer), else ``b [4H, 1]``; and the output layer (scale folded in) with its rows.
        Cached until a weight changes (tensor versions), so a drop-in step on a small model does
        not rebuild them every time."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cached = getattr(self, "_inference_cache", None)
        if cached is None or cached[0] != key:
            hidden, k0, layers = self.hidden_size, self._input_rows, self.num_layers
            fused = []
            with torch.no_grad():
                for layer, (w, b) in enumerate(self._fused_weights()):
                    first = 0 if layer == 0 else k0 + 1 + (layer - 1) * hidden
                    last = k0 + 1 + (layer + 1) * hidden
                    if layer == 0:
                        fused.append((torch.cat([b[:, None], w], 1), None, (first, last)))
                    elif layer == layers - 1:
                        fused.append((torch.cat([w, b[:, None]], 1), None, (first, last + 1)))
                    else:
                        fused.append((w, b[:, None], (first, last)))
                top = k0 + 1 + (layers - 1) * hidden
                out_w = torch.cat([self.output.weight, self.output.bias[:, None]], 1).mul(self.output_scale)
            self._inference_cache = (key, (fused, (out_w.contiguous(), (top, top + hidden + 1))))
        return self._inference_cache[1]

    def _fused_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(W [4H, k + H], b [4H])`` with ``W [x; h] + b`` the gate pre-activations
        in the order (i, f, o, g), the g rows scaled by −2 (see ``FusedLSTMStack``)."""
        hidden = self.hidden_size
        order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                           torch.arange(2 * hidden, 3 * hidden)]).to(self.device)
        scale = torch.ones(4 * hidden, device=self.device, dtype=self.dtype)
        scale[3 * hidden:] = -2.0
        fused = []
        for cell in self.cells:
            w = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)[order] * scale[:, None]
            b = (cell.bias_ih + cell.bias_hh)[order] * scale
            fused.append((w, b))
        return fused

    def as_torch_optimizer(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
                           **options: Any) -> TransformOptimizer:
        """A drop-in ``torch.optim.Optimizer`` that steps each parameter with the in-place
        ``update_`` (``inplace_update=None`` selects the functional ``update``). The LSTM is
        coordinate-wise, so the drop-in runs it one parameter tensor at a time.

        Args:
            params: tensors, ``(name, tensor)`` pairs or param group dicts.
            **options: ``TransformOptimizer``'s keyword options.
        Returns:
            A ``TransformOptimizer``.
        """
        options.setdefault("inplace_update", self.update_)
        return self.drop_in(self.transform(), params, options)
