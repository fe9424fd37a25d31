"""L2-regularised logistic regression as a finite sum, the test problem of the variance-reduced
methods (SAG, Le Roux et al. 2012; SVRG, Johnson & Zhang 2013; SAGA, Defazio et al. 2014)::

    f(w, b) = (1/m) sum_i f_i(w, b),   f_i = log(1 + exp(z_i)) - y_i z_i + (l2/2) ||w||^2,
    z_i = x_i . w + b,  y_i in {0, 1}

(the bias is not regularised, as in scikit-learn's ``LogisticRegression``, whose
``C = 1 / (m l2)`` gives the same minimiser). Each instance has its own dataset of ``m``
examples. ``sample_batch`` returns example indices drawn *without replacement* and shared by all
instances (the finite-sum methods index one gradient table per instance with them), and
``extra_args(indices)`` returns what ``learnopt.optim``'s finite-sum methods read
(``learnopt.optim.extra``)::

    indices = task.sample_batch(g)
    grads = task.batch_grad(params, indices)            # or autograd of task.loss(params, indices).sum()
    updates, state = tx.update(grads, state, params, **task.extra_args(indices))

Gradients are closed-form (``grad_w f_i = (sigmoid(z_i) - y_i) x_i + l2 w``), differentiable in
the parameters, and batched: per-example gradients have shape ``[len(indices), n, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from learnopt.task import Params, Task, generator_device

SOURCES = ("synthetic", "digits")


@dataclass
class LogisticRegressionTask:
    """``x``: [n, m, d] features, ``y``: [n, m] labels in {0, 1} (floating); parameters ``w``: [n, d],
    ``b``: [n]. ``loss(params, indices)`` is each instance's mean of ``f_i`` over ``indices``
    (all ``m`` examples when ``None``).

    Args:
        x: ``[n, m, d]`` features.
        y: ``[n, m]`` labels in {0, 1}.
        l2: the L2 coefficient on ``w``.
        batch_size: indices per ``sample_batch``.
        init_scale: standard deviation of the initial ``w``.
    """

    x: Tensor
    y: Tensor
    l2: float = 1e-2
    batch_size: int = 10
    init_scale: float = 0.0

    @property
    def num_instances(self) -> int:
        """Number of problems ``n``."""
        return self.x.shape[0]

    @property
    def num_examples(self) -> int:
        """Examples per problem ``m``."""
        return self.x.shape[1]

    @property
    def loss_scale(self) -> float:
        """log 2: the loss of the zero classifier, where training starts (``init_scale=0``)."""
        return math.log(2.0)

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def init(self, generator: torch.Generator | None = None) -> Params:
        """``w`` from N(0, ``init_scale``²) (zero by default), ``b = 0``.

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``{"w": [n, d], "b": [n]}``.
        """
        n, _, d = self.x.shape
        w = self.init_scale * torch.randn(n, d, generator=generator, device=generator_device(generator),
                                          dtype=torch.float32)
        return {"w": w.to(self.x), "b": torch.zeros(n, dtype=self.x.dtype, device=self.x.device)}

    def sample_batch(self, generator: torch.Generator | None = None) -> Tensor:
        """``batch_size`` distinct example indices, shared by all instances.

        Args:
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            ``[batch_size]`` int64 indices.
        """
        order = torch.randperm(self.num_examples, generator=generator, device=generator_device(generator))
        return order[: self.batch_size].to(self.x.device)

    def _logits(self, params: Params, indices: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x = self.x if indices is None else self.x[:, indices]
        y = self.y if indices is None else self.y[:, indices]
        return torch.einsum("nmd,nd->nm", x, params["w"]) + params["b"][:, None], x, y

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """Each instance's mean of ``f_i`` over ``batch``, plus the L2 term.

        Args:
            params: the parameters, as ``init`` returns them.
            batch: example indices from ``sample_batch``; None: all ``m``.
        Returns:
            ``[num_instances]`` losses.
        """
        z, _, y = self._logits(params, batch)
        data = (F.softplus(z) - y * z).mean(-1)
        return data + 0.5 * self.l2 * (params["w"] * params["w"]).sum(-1)

    def full_loss(self, params: Params) -> Tensor:
        """The loss over all ``m`` examples.

        Args:
            params: the parameters.
        Returns:
            ``[num_instances]`` losses on the whole training set.
        """
        return self.loss(params, None)

    def example_grads(self, params: Params, indices: Tensor) -> Params:
        """Per-example gradients of ``f_i``: ``w``: [len(indices), n, d], ``b``: [len(indices), n].

        Args:
            params: the parameters.
            indices: example indices.
        Returns:
            ``{"w": [len(indices), n, d], "b": [len(indices), n]}``.
        """
        z, x, y = self._logits(params, indices)
        r = torch.sigmoid(z) - y  # [n, B]
        gw = r[..., None] * x + self.l2 * params["w"][:, None, :]
        return {"w": gw.transpose(0, 1), "b": r.transpose(0, 1)}

    def batch_grad(self, params: Params, indices: Tensor | None) -> Params:
        """The gradient of ``loss(params, indices)`` (mean over ``indices``, all when ``None``).

        Args:
            params: the parameters.
            indices: example indices (None: all).
        Returns:
            ``{"w": [n, d], "b": [n]}``.
        """
        z, x, y = self._logits(params, indices)
        r = torch.sigmoid(z) - y
        return {"w": torch.einsum("nm,nmd->nd", r, x) / r.shape[-1] + self.l2 * params["w"], "b": r.mean(-1)}

    def full_grad(self, params: Params) -> Params:
        """The gradient of the loss over all ``m`` examples.

        Args:
            params: the parameters.
        Returns:
            ``{"w": [n, d], "b": [n]}``.
        """
        return self.batch_grad(params, None)

    def extra_args(self, batch: Tensor) -> dict[str, Any]:
        """The extra update arguments (``learnopt.optim.extra``) for a step on ``batch``.

        Args:
            batch: example indices from ``sample_batch``.
        Returns:
            ``indices``, ``example_grads_fn``, ``batch_grad_fn``, ``full_grad_fn``, ``num_examples``, ``loss_fn``.
        """
        loss_fn: Callable[[Params], Tensor] = lambda p: self.loss(p, batch).sum()
        return {"indices": batch, "example_grads_fn": self.example_grads, "batch_grad_fn": self.batch_grad,
                "full_grad_fn": self.full_grad, "num_examples": self.num_examples, "loss_fn": loss_fn}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> LogisticRegressionTask:
        """The same problems on ``device`` / in ``dtype``.

        Args:
            device: the device of the data (None: unchanged).
            dtype: the dtype of the floating data (None: unchanged).
        Returns:
            A ``LogisticRegressionTask`` with the same instances.
        """
        return LogisticRegressionTask(self.x.to(device=device, dtype=dtype), self.y.to(device=device, dtype=dtype),
                                      self.l2, self.batch_size, self.init_scale)


class LogisticRegressionFamily:
    """Binary logistic-regression problems of ``num_examples`` examples each.

    ``data="synthetic"``: ``x ~ N(0, I_dim)``; a planted ``w° ~ N(0, (signal²/dim) I)`` and
    ``b° ~ N(0, 0.5²)``; labels ``y ~ Bernoulli(sigmoid(x.w° + b°))`` (not separable, so the
    unregularised optimum exists too). ``data="digits"``: each instance picks two distinct
    classes of scikit-learn's 8×8 digits at random and ``num_examples`` of their images (64
    features /16), label 1 for the second class; ``dim`` is then 64. ``l2`` > 0 makes every
    instance strongly convex (digit pairs are often separable). ``normalize`` divides by log 2.

    Args:
        data: ``"synthetic"`` or ``"digits"``.
        num_examples: ``m``, examples per problem.
        dim: ``d`` (synthetic; 64 for digits).
        l2: the L2 coefficient.
        batch_size: indices per ``sample_batch``.
        signal: scale of the planted ``w°`` (synthetic).
        init_scale: standard deviation of the initial ``w``.
        dtype: dtype of the data.
    Raises:
        ValueError: an unknown source, ``l2 < 0``, a batch size outside ``[1, m]``, ``dim < 1``, or
            more examples than a digit pair has.
    References:
        Johnson & Zhang 2013 (SVRG); Defazio et al. 2014, arXiv 1407.0202 (SAGA).
    """

    def __init__(
        self,
        data: str = "synthetic",
        num_examples: int = 200,
        dim: int = 10,
        l2: float = 1e-2,
        batch_size: int = 10,
        signal: float = 3.0,
        init_scale: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if data not in SOURCES:
            raise ValueError(f"LogisticRegressionFamily: data must be one of {SOURCES}, got {data!r}")
        if l2 < 0:
            raise ValueError(f"LogisticRegressionFamily: l2 must be >= 0, got {l2}")
        if not 1 <= batch_size <= num_examples:
            raise ValueError(f"LogisticRegressionFamily: need 1 <= batch_size <= num_examples, "
                             f"got batch_size={batch_size}, num_examples={num_examples}")
        if data == "synthetic" and dim < 1:
            raise ValueError(f"LogisticRegressionFamily: dim must be >= 1, got {dim}")
        self.data, self.num_examples, self.l2, self.batch_size = data, num_examples, float(l2), batch_size
        self.signal, self.init_scale, self.dtype = signal, init_scale, dtype
        if data == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            self._images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
            self._labels = torch.tensor(digits.target, dtype=torch.int64)
            counts = torch.bincount(self._labels).sort().values
            most = int(counts[0] + counts[1])  # the rarest pair of classes
            if num_examples > most:
                raise ValueError(f"LogisticRegressionFamily: digits pairs have as few as {most} images, "
                                 f"num_examples={num_examples} is too many")
            dim = self._images.shape[1]
        self.dim = dim
        self.name = f"logreg_{data}_{num_examples}x{dim}"
        self.loss_scale = math.log(2.0)

    def normalize(self, loss: Tensor) -> Tensor:
        """The loss divided by ``loss_scale``.

        Args:
            loss: losses of this family's tasks.
        Returns:
            ``loss / loss_scale``.
        """
        return loss / self.loss_scale

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """A ``LogisticRegressionTask`` of ``num_instances`` instances.

        Args:
            num_instances: ``n``.
            generator: the source of the draw (None: the global generator); drawn on its device.
        Returns:
            A ``LogisticRegressionTask`` of ``n`` instances.
        Raises:
            ValueError: ``num_instances < 1``.
        """
        if num_instances < 1:
            raise ValueError(f"LogisticRegressionFamily.sample: num_instances must be >= 1, got {num_instances}")
        x, y = (self._synthetic if self.data == "synthetic" else self._digits)(num_instances, generator)
        return LogisticRegressionTask(x.to(self.dtype), y.to(self.dtype), self.l2, self.batch_size, self.init_scale)

    def _synthetic(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        m, d = self.num_examples, self.dim
        x = torch.randn(n, m, d, generator=generator, device=generator_device(generator))
        w = torch.randn(n, d, generator=generator, device=generator_device(generator)) * (self.signal / math.sqrt(d))
        b = 0.5 * torch.randn(n, generator=generator, device=generator_device(generator))
        p = torch.sigmoid(torch.einsum("nmd,nd->nm", x, w) + b[:, None])
        return x, (torch.rand(n, m, generator=generator, device=generator_device(generator)) < p).float()

    def _digits(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for _ in range(n):
            neg, pos = torch.randperm(10, generator=generator, device=generator_device(generator))[:2].tolist()
            pool = torch.nonzero((self._labels == neg) | (self._labels == pos)).squeeze(-1)
            order = torch.randperm(len(pool), generator=generator, device=generator_device(generator))
            pick = pool[order[: self.num_examples]]
            xs.append(self._images[pick])
            ys.append((self._labels[pick] == pos).float())
        return torch.stack(xs), torch.stack(ys)
