"""The task interfaces that ``tasks/`` implements and the meta-training layers consume.

A ``Task`` is a *batch* of problem instances sharing one structure: its parameters carry a
leading instance dimension and ``loss`` returns one value per instance, so many instances
train in one call (and a coordinate-wise learned optimizer sees all their coordinates as
rows of one matmul). Because instances never interact, the gradient of ``loss(...).sum()``
is each instance's own gradient: any elementwise optimizer applied to the batch follows
exactly the trajectories it would follow on each instance alone.

Required of a ``Task``: ``init``, ``loss``, ``sample_batch`` (the protocol below) and a
``num_instances`` attribute. Optional members, which consumers look up with ``getattr``:

``to(device=None, dtype=None) -> Task``
    The same instances with their data on ``device`` (and floating data in ``dtype``);
    ``init`` then returns parameters there. Random draws happen on the generator's device
    (``generator_device``) and move to the data, so a CPU generator drives a GPU task and
    gives it the CPU copy's numbers.
``full_loss(params) -> Tensor``
    Per-instance loss on the whole training set (evaluation), ``[num_instances]``; a task
    whose training set is too large to score at every step documents the fixed subset it
    uses instead (``tasks.char_lm``).
``normalize(loss) -> Tensor``
    The loss divided by the family's *typical initial loss* (a constant per family and
    architecture, e.g. ``log C`` for a ``C``-class classifier, ``log 2`` for logistic
    regression started at zero, a seeded Monte-Carlo median for Rosenbrock), so a
    normalised loss near 1 means "where training starts" and curves of different tasks
    share one axis; ``log10(normalize(loss))`` is the log-ratio to that starting loss.
    Families expose the same ``normalize`` and the constant as ``loss_scale``; a task
    without them is left as it is by ``normalize_loss``.
``extra_args(batch) -> dict``
    The extra update arguments (``learnopt.optim.extra``) for a step on ``batch``, for
    methods that need more than the gradient: a finite-sum task returns ``indices``,
    ``example_grads_fn``, ``batch_grad_fn``, ``full_grad_fn``, ``num_examples`` and
    ``loss_fn``; a caller passes them on as ``tx.update(grads, state, params,
    **task.extra_args(batch))``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = dict[str, Tensor]


@runtime_checkable
class Task(Protocol):
    """A batch of instances; ``num_instances`` tells how many."""

    def init(self, generator: torch.Generator | None = None) -> Params:
        """Initial parameters, each with leading dimension ``num_instances``.

        Args:
            generator: the source of random initial values (None: the global generator).
        Returns:
            ``{name: tensor}``.
        """

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """Per-instance loss, shape ``[num_instances]``.

        Args:
            params: the parameters, as ``init`` returns them.
            batch: the step's data from ``sample_batch``.
        Returns:
            ``[num_instances]``.
        """

    def sample_batch(self, generator: torch.Generator | None = None) -> Any:
        """The data for one inner step (``None`` for deterministic tasks).

        Args:
            generator: the source of the draw.
        Returns:
            The batch, in the task's own format.
        """


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution over tasks. Families also carry a ``name`` attribute for reports."""

    def sample(self, num_instances: int, generator: torch.Generator | None = None) -> Task:
        """Draw ``num_instances`` task instances as one batched ``Task``.

        Args:
            num_instances: how many.
            generator: the source of the draw.
        Returns:
            A ``Task``.
        """


def seeded_generator(*keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from a tuple of keys (e.g. ``("train", seed, episode)``), so that the
    splits used for meta-training, tuning and testing draw from disjoint seed streams and a
    resumed run draws exactly what the interrupted one would have.

    Args:
        *keys: the keys, joined as text and hashed (SHA-256).
        device: the generator's device.
    Returns:
        A seeded ``torch.Generator``.
    """
    import hashlib

    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def normalize_loss(task_or_family: Any, loss: Tensor) -> Tensor:
    """``task_or_family.normalize(loss)`` where it has one (see the module docstring), else
    ``loss`` unchanged, so reports can normalise whatever task they are given.

    Args:
        task_or_family: a task or family.
        loss: the loss.
    Returns:
        The normalised loss.
    """
    normalize = getattr(task_or_family, "normalize", None)
    return loss if normalize is None else normalize(loss)


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where to draw random numbers from ``generator`` (its device; the CPU for the global one).
    Tasks draw there and move the result to their data's device, so a CPU generator serves a
    task on a GPU and gives it the same numbers it gives the CPU copy.

    Args:
        generator: a generator, or None.
    Returns:
        Its device.
    """
    return generator.device if generator is not None else torch.device("cpu")


def haar_orthogonal(*batch: int, n: int, generator: torch.Generator | None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Haar-random orthogonal matrices ``[*batch, n, n]`` drawn from ``generator`` (on its
    device): the QR factor of a Gaussian matrix, with the signs of ``R``'s diagonal folded into
    ``Q`` so the distribution is uniform (Mezzadri 2007).

    Args:
        *batch: leading dimensions.
        n: the matrix size.
        generator: the source of the draw.
        dtype: the dtype.
    Returns:
        ``[*batch, n, n]``.
    """
    gauss = torch.randn(*batch, n, n, generator=generator, device=generator_device(generator), dtype=dtype)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
