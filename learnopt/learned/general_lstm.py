"""The coordinate-wise LSTM of Andrychowicz et al. 2016 fed the features of
``NormalizedMLPOptimizer`` (``NormalizedLSTMOptimizer``) or of ``CompactNormalizedOptimizer``
(``CompactLSTMOptimizer``): the ablation of issue 23 that swaps the per-parameter MLP for a
recurrent network and keeps everything else (features, nominal term, per-tensor normalized
direction, bounded step, and for the compact rule its schedule).

Every coordinate of every tensor is one row of a stack of ``num_layers`` ``LSTMCell``s of
``hidden_size`` units (two layers of 20 in the paper), whose hidden and cell states persist
from step to step in the optimizer state; a linear read-out gives (direction, log-magnitude),
which ``NormalizedMLPOptimizer.directions_from`` turns into the update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from learnopt.learned.features import FeaturesState
from learnopt.learned.general import NormalizedMLPOptimizer
from learnopt.learned.general_compact import CompactNormalizedOptimizer, CompactState
from learnopt.optim.base import Params


def lstm_stack(inputs: int, hidden_size: int, num_layers: int,
               output_init_scale: float) -> tuple[nn.ModuleList, nn.Linear]:
    """Stacked ``LSTMCell``s and the (direction, log-magnitude) read-out.

    Args:
        inputs: features per row of the first cell.
        hidden_size: units per layer.
        num_layers: stacked cells.
        output_init_scale: scales the read-out's initial weights (its bias starts at zero).

    Returns:
        ``(cells, readout)``.
    """
    cells = nn.ModuleList(nn.LSTMCell(inputs if i == 0 else hidden_size, hidden_size) for i in range(num_layers))
    readout = nn.Linear(hidden_size, 2)
    with torch.no_grad():
        readout.weight.mul_(output_init_scale)
        readout.bias.zero_()
    return cells, readout


def zero_states(n: int, module: nn.Module) -> tuple[Tensor, ...]:
    """Zero LSTM states for ``n`` coordinates.

    Args:
        n: the coordinates (rows).
        module: an LSTM optimizer (its ``hidden_size``, ``num_layers``, dtype and device).

    Returns:
        One ``[n, hidden_size]`` zero tensor per layer.
    """
    return tuple(torch.zeros(n, module.hidden_size, dtype=module.dtype, device=module.device)
                 for _ in range(module.num_layers))


def run_stack(cells: nn.ModuleList, readout: nn.Linear, x: Tensor, h: tuple[Tensor, ...],
              c: tuple[Tensor, ...]) -> tuple[Tensor, tuple, tuple]:
    """One step of the stacked cells on rows ``x [N, F]``.

    Args:
        cells, readout: from ``lstm_stack``.
        x: the input rows.
        h, c: the hidden and cell states per layer, each ``[N, hidden_size]``.

    Returns:
        ``(out [N, 2], new_h, new_c)``: the read-out and the new states.
    """
    new_h, new_c = [], []
    for cell, h_i, c_i in zip(cells, h, c):
        h_i, c_i = cell(x, (h_i, c_i))
        new_h.append(h_i)
        new_c.append(c_i)
        x = h_i
    return readout(x), tuple(new_h), tuple(new_c)


class NormalizedLSTMState(NamedTuple):
    features: FeaturesState
    h: tuple[Tensor, ...]  # per layer, [coordinates, hidden_size]
    c: tuple[Tensor, ...]


class NormalizedLSTMOptimizer(NormalizedMLPOptimizer):
    """``NormalizedMLPOptimizer`` with a coordinate-wise LSTM instead of the MLP (module
    docstring). ``config()`` returns the constructor arguments.

    Args:
        hidden_size: the LSTM's units per layer.
        num_layers: stacked ``LSTMCell``s.
        **kwargs: the other arguments of ``NormalizedMLPOptimizer`` (not ``hidden_sizes``).
    """

    separable = True  # the LSTM states of all coordinates are one tensor: the drop-in runs a tensor at a time

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, **kwargs: Any) -> None:
        if int(hidden_size) < 1 or int(num_layers) < 1:
            raise ValueError(f"NormalizedLSTMOptimizer: hidden_size and num_layers must be >= 1, "
                             f"got {hidden_size}, {num_layers}")
        if "hidden_sizes" in kwargs:
            raise TypeError("NormalizedLSTMOptimizer takes hidden_size and num_layers, not hidden_sizes")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        super().__init__(hidden_sizes=(self.hidden_size,), **kwargs)

    def _build_network(self) -> None:
        self.cells, self.readout = lstm_stack(self.num_features, self.hidden_size, self.num_layers,
                                              self.output_init_scale)

    def config(self) -> dict[str, Any]:
        config = super().config()
        del config["hidden_sizes"]
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, **config}

    def init(self, params: Params, batch_dims: int | None = None) -> NormalizedLSTMState:
        """Feature state and zero LSTM states for every coordinate of ``params``.

        Args:
            params: the parameters, ``{name: tensor}``.
            batch_dims: leading instance dimensions (default: the constructor's).

        Returns:
            A ``NormalizedLSTMState``.
        """
        features = super().init(params, batch_dims)
        zeros = zero_states(sum(p.numel() for p in params.values()), self)
        return NormalizedLSTMState(features, zeros, zeros)

    def lstm(self, x: Tensor, h: tuple[Tensor, ...], c: tuple[Tensor, ...]) -> tuple[Tensor, tuple, tuple]:
        """One step of the stacked cells on rows ``x [N, F]``: ``(out [N, 2], h, c)``.

        Args:
            x: the feature rows ``[N, num_features]``.
            h, c: the hidden and cell states per layer, each ``[N, hidden_size]``.

        Returns:
            ``(out, new_h, new_c)``: the read-out (direction, log-magnitude) and the new states.
        """
        return run_stack(self.cells, self.readout, x, h, c)

    def update(self, grads: Params, state: NormalizedLSTMState, params: Params | None = None,
               batch_dims: int | None = None, num_steps: int | None = None,
               **extra: Any) -> tuple[Params, NormalizedLSTMState]:
        """``(updates, state)`` as ``NormalizedMLPOptimizer.update``, the LSTM states carried.

        Args:
            grads, state, params: as every ``GradientTransformation`` (``params`` is required).
            batch_dims: leading instance dimensions (default: the constructor's).
            num_steps: the run length T for the progress features (default: the constructor's).

        Returns:
            The updates and the new ``NormalizedLSTMState``.
        """
        if params is None:
            raise ValueError("NormalizedLSTMOptimizer: the parameter-value feature needs params: "
                             "update(grads, state, params)")
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        rows, features = self.feature_rows(grads, state.features, params, batch_dims, num_steps)
        flat = torch.cat([r.reshape(-1, self.num_features) for r in rows.values()])
        if flat.shape[0] != state.h[0].shape[0]:
            raise ValueError(f"NormalizedLSTMOptimizer: the state holds {state.h[0].shape[0]} coordinates, "
                             f"the gradients have {flat.shape[0]}; init the state for these parameters")
        out, h, c = self.lstm(flat, state.h, state.c)
        directions, scales = self.directions_from(out, rows, batch_dims)
        return {k: -scales[k] * d for k, d in directions.items()}, NormalizedLSTMState(features, h, c)


class CompactLSTMState(NamedTuple):
    moments: CompactState
    h: tuple[Tensor, ...]  # per layer, [coordinates, hidden_size]
    c: tuple[Tensor, ...]


class CompactLSTMOptimizer(CompactNormalizedOptimizer):
    """``CompactNormalizedOptimizer`` with a coordinate-wise LSTM instead of its MLP: the same
    features (the progress columns appended to every row), nominal term, normalized direction
    and scheduled, bounded step. ``config()`` returns the constructor arguments.

    Args:
        hidden_size: the LSTM's units per layer.
        num_layers: stacked ``LSTMCell``s.
        **kwargs: the other arguments of ``CompactNormalizedOptimizer``.
    """

    has_fast_path = False  # update_fast is the MLP's
    separable = True  # the LSTM states of all coordinates are one tensor: the drop-in runs a tensor at a time

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, **kwargs: Any) -> None:
        if int(num_layers) < 1:
            raise ValueError(f"CompactLSTMOptimizer: num_layers must be >= 1, got {num_layers}")
        super().__init__(hidden_size=hidden_size, **kwargs)
        self.num_layers = int(num_layers)
        del self.layers
        inputs = self.num_features + len(self.progress_names)
        self.cells, self.readout = lstm_stack(inputs, self.hidden_size, self.num_layers, self.output_init_scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.readout.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.readout.weight.device

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_layers": self.num_layers}

    def init(self, params: Params, batch_dims: int | None = None) -> CompactLSTMState:
        """Zero moments and zero LSTM states for every coordinate of ``params``.

        Args:
            params: the parameters, ``{name: tensor}``.
            batch_dims: leading instance dimensions (default: the constructor's).

        Returns:
            A ``CompactLSTMState``.
        """
        moments = super().init(params, batch_dims)
        zeros = zero_states(sum(p.numel() for p in params.values()), self)
        return CompactLSTMState(moments, zeros, zeros)

    def update(self, grads: Params, state: CompactLSTMState, params: Params | None = None,
               batch_dims: int | None = None, num_steps: int | None = None,
               **extra: Any) -> tuple[Params, CompactLSTMState]:
        """``(updates, state)`` as ``CompactNormalizedOptimizer.update``, the LSTM states carried.

        Args:
            grads, state, params: as every ``GradientTransformation`` (``params`` is unused).
            batch_dims: leading instance dimensions (default: the constructor's).
            num_steps: the run length T for the schedule and progress (default: the constructor's).

        Returns:
            The updates and the new ``CompactLSTMState``.
        """
        batch_dims = self.batch_dims if batch_dims is None else batch_dims
        rows, momenta, second, adam_rms = self.feature_rows(grads, state.moments, batch_dims)
        t = float(state.moments.count)
        flat = torch.cat([r.reshape(-1, self.num_features) for r in rows.values()])
        if flat.shape[0] != state.h[0].shape[0]:
            raise ValueError(f"CompactLSTMOptimizer: the state holds {state.h[0].shape[0]} coordinates, "
                             f"the gradients have {flat.shape[0]}; init the state for these parameters")
        progress = torch.tensor(self.progress(t, num_steps), dtype=self.dtype, device=self.device)
        x = torch.cat([flat, progress.expand(flat.shape[0], -1)], dim=-1)
        out, h, c = run_stack(self.cells, self.readout, x, state.h, state.c)
        updates = self.updates_from(out, rows, t, num_steps, batch_dims, adam_rms)
        moments = CompactState(state.moments.count + 1, momenta, second)
        return updates, CompactLSTMState(moments, h, c)
