"""The drop-in update of ``CompactNormalizedOptimizer`` (``learnopt.learned.general_compact``): the
reference ``update``'s arithmetic with ``batch_dims=0`` and no graph, arranged for speed (eagerly, or as two
``torch.compile``d loops per tensor from ``general_compact_kernels``). ``CompactFastUpdate`` is the mixin that
carries it; the shared state type and constants live here so that both modules read one definition.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from learnopt.learned.general import DIRECTION_EPS
from learnopt.learned.general_compact_kernels import COMPILE_MIN_SIZE, compiled_kernels
from learnopt.optim.base import Params

# Scale invariance: a feature of RMS 1e-10 is still normalized to RMS 1 (float32 squares stay
# normal down to ~1e-19 RMS); only an all-zero feature stays zero.
FEATURE_EPS = 1e-24
ADAM_EPS = 1e-8
# Coordinates per block of the drop-in's MLP: its hidden units (5 × 64k floats) stay in cache.
FAST_CHUNK = 1 << 16


class CompactState(NamedTuple):
    count: Tensor  # number of previous calls
    momenta: Params  # name -> [len(momentum_decays), *shape]
    second_moment: Params  # name -> [*shape]


class CompactFastUpdate:
    """``update_fast`` and its helpers, mixed into ``CompactNormalizedOptimizer`` (which provides the weights,
    the schedule, ``_check``, ``_first_layer``, ``step_size`` and ``amplification_cap``)."""

    def _scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of this module reused by every step (a fresh one per step costs page faults
        on CPU as large as the arithmetic); made again when the shape, dtype or device changes."""
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        buf = buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != self.dtype or buf.device != like.device:
            buf = buffers[name] = torch.empty(shape, dtype=self.dtype, device=like.device)
        return buf

    @torch.no_grad()
    def update_fast(self, grads: Params, state: CompactState, params: Params | None = None,
                    num_steps: int | None = None, compiled: bool = False,
                    **extra: Any) -> tuple[Params, CompactState]:
        """``update`` with ``batch_dims=0`` and no graph, for a caller that owns ``state`` and applies the
        updates at once (the drop-in ``torch.optim`` step): the same arithmetic up to rounding (tested), arranged
        for speed. It overwrites ``state``'s moments; its updates live in this module's buffers until its next call.

        Per tensor, eagerly: the feature rows ``x`` and a row of ones (the first layer's bias as a weight column)
        in one ``[num_features + 1, n]`` buffer; their per-tensor normalization folded into the first layer's
        weights; then, ``FAST_CHUNK`` coordinates at a time so the hidden units stay in cache,
        ``h = relu(W [x, 1])`` (one ``mm``) and ``d = nominal · x_adam + [w_dir, b_dir] · [h, 1]`` (one ``addmv``).

        Args:
            grads, state, params: as ``update`` (``state`` is overwritten, ``params`` unused).
            num_steps: the run length T (default: the constructor's).
            compiled: two ``torch.compile``d loops per tensor instead (``feature_square_sums``,
                ``direction_into``): the first reads the moments for the features' per-tensor RMS (and the
                gradient's sum, the finiteness check of every tensor before any state changes), the second writes
                them and the direction; where compiling fails, this warns once and runs eagerly.

        Returns:
            The updates (in this module's buffers) and the new state (sharing ``state``'s moments).
        """
        self._check(grads, state, 0)
        count = float(state.count)
        dtype, device = self.dtype, self.device
        b2 = self.second_moment_decay
        # rsqrt(v / bias2 + ε²) = sqrt(bias2) · rsqrt(v + ε² bias2); the normalization drops sqrt(bias2)
        eps2 = ADAM_EPS**2 * (1.0 - b2 ** (count + 1.0))
        w1, b1 = self._first_layer(count, num_steps)
        w2, b2_out = self.layers[1].weight, self.layers[1].bias
        base_step = self.step_size(count, num_steps)
        cap = self.amplification_cap()
        cap = None if cap is None else float(cap) * math.sqrt(1.0 - b2 ** (count + 1.0))  # sqrt(bias2): as above
        k_m, f = len(self.momentum_decays), self.num_features
        decay_weight = torch.tensor([1.0 - b for b in self.momentum_decays], dtype=dtype, device=device)
        kernels = compiled_kernels() if compiled else None
        if kernels is not None:
            scalars = torch.tensor([eps2, 0.0], dtype=dtype, device=device)
            square_sums = self._square_sums(kernels[0], grads, state, decay_weight, scalars)
        updates = {}
        for k, grad in grads.items():
            n = grad.numel()
            g = grad.reshape(n).to(dtype)
            d = self._scratch(f"update:{k}", (n,), g)
            m, v = state.momenta[k].view(k_m, n), state.second_moment[k].view(n)
            if kernels is not None and k in square_sums:
                inv = torch.rsqrt(square_sums[k][1:] / n + FEATURE_EPS)
                scalars[1] = self.nominal * inv[-1]
                sums = kernels[1](d, g, list(m.unbind(0)), v, decay_weight, b2, scalars, w1 * inv, b1, w2, b2_out,
                                  self._adam_row).tolist()
            else:
                x = self._scratch(f"features:{n}", (f + 1, n), g)
                m.lerp_(g.expand(k_m, n), decay_weight[:, None])
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                x[0].copy_(g)
                x[1: 1 + k_m].copy_(m)
                torch.add(v, eps2, out=x[f - 2]).rsqrt_()
                torch.mul(x[1 + self._adam_row], x[f - 2], out=x[f - 1])
                x[f].fill_(1.0)
                inv = torch.rsqrt(torch.linalg.vector_norm(x[:f], dim=1).square() / n + FEATURE_EPS)
                hidden_sum = self._mlp_chunks(x, torch.cat([w1 * inv, b1[:, None]], dim=1),
                                              torch.cat([w2[0], b2_out[:1]]), self.nominal * float(inv[f - 1]), d)
                sums = [float(w2[1] @ hidden_sum), float(torch.dot(d, d))]
            mu = sums[0] / n + float(b2_out[1])
            scale = base_step * math.exp(self.magnitude_range * math.tanh(mu))
            if cap is not None:  # min(1, cap · RMS of x_adam), its RMS 1 / inv[-1] here
                scale *= min(1.0, cap / float(inv[-1]))
            updates[k] = d.mul_(-scale / math.sqrt(sums[1] / n + DIRECTION_EPS)).view(grad.shape)
        return updates, CompactState(state.count + 1, state.momenta, state.second_moment)

    def _square_sums(self, kernel: Any, grads: Params, state: CompactState, decay_weight: Tensor,
                     scalars: Tensor) -> dict[str, Tensor]:
        """``feature_square_sums`` of every tensor of at least ``COMPILE_MIN_SIZE`` elements,
        after checking every gradient (the compiled drop-in's own ``check_finite``).

        Raises:
            FloatingPointError: a gradient has a NaN or infinity (nothing has changed yet).
        """
        out, totals = {}, {}
        for k, grad in grads.items():
            n = grad.numel()
            g = grad.reshape(n).to(self.dtype)
            if n < COMPILE_MIN_SIZE:
                totals[k] = g.sum()
                continue
            out[k] = kernel(g, list(state.momenta[k].view(-1, n).unbind(0)), state.second_moment[k].view(n),
                            decay_weight, self.second_moment_decay, scalars, self._adam_row)
            totals[k] = out[k][0]
        if totals and not bool(torch.isfinite(torch.stack(list(totals.values())).sum())):
            bad = next(k for k, t in totals.items() if not bool(torch.isfinite(t)))
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient in parameter {bad!r} "
                                     f"(shape {tuple(grads[bad].shape)}); the parameters and optimizer state "
                                     "were left unchanged")
        return out

    def _mlp_chunks(self, x: Tensor, w: Tensor, coef: Tensor, beta: float, d: Tensor) -> Tensor:
        """``d = beta · x_adam + coef · [relu(w x), 1]`` over the feature rows ``x`` (last: ones),
        ``FAST_CHUNK`` columns at a time; returns the hidden units' sums ``[hidden_size]``."""
        n, hidden, f = x.shape[1], self.hidden_size, self.num_features
        chunk = min(n, FAST_CHUNK)
        h = self._scratch("hidden", (hidden + 1, FAST_CHUNK), x)[:, :chunk]
        h[hidden].fill_(1.0)  # b_dir's weight column
        hidden_sum = torch.zeros(hidden, dtype=x.dtype, device=x.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            hc = h[:, : end - start]
            torch.mm(w, x[:, start:end], out=hc[:hidden])
            hc[:hidden].relu_()
            hidden_sum += hc[:hidden].sum(dim=1)
            torch.addmv(x[f - 1, start:end], hc.t(), coef, beta=beta, out=d[start:end])
        return hidden_sum
