"""Online classification episodes for meta-learned learners (VSML, black-box meta-learners).

An episode is a stream of ``episode_length`` labelled examples from a random task: a random
subset of ``min_classes … max_classes`` classes of a dataset (relabelled in random order), the
inputs standardised with the dataset's statistics and then either randomly projected
(``"gaussian"``: ``x P`` with ``P ~ N(0, 1/F)``, ``F`` the dataset's feature count), randomly
permuted (``"permutation"``), reduced to a random subset of ``num_features`` of the raw
features in random order (``"subset"``: raw marginals, as cheap as a projection), or left as
they are (``"none"``). A list of projections draws one per call. All episodes of one call
share the class count and input size (one batch).

``OnlineClassificationFamily`` is an *episode family* for ``learnopt.meta.episodic``: its
meta-loss is the mean online cross-entropy of the learner's predictions (each made before
the label was seen), as in Kirsch & Schmidhuber 2021; ``validation_score`` is the same on
fixed episodes of the ``val`` split.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from learnopt.task import haar_orthogonal, seeded_generator
from learnopt.vsml.online import online_episode, online_metrics

PROJECTIONS = ("gaussian", "permutation", "subset", "none")
SKLEARN_SETS = ("iris", "wine", "breast_cancer")
SYNTHETIC = "gaussian_classes"  # a new random task per episode, see OnlineClassificationFamily


@functools.cache
def dataset_arrays(name: str, part: str, standardize: bool = True) -> tuple[Tensor, Tensor]:
    """Features (standardised, or as ``load_dataset`` scales them) and labels of ``name``:
    ``part``. ``digits`` and ``mnist1d`` use ``tasks.datasets.load_dataset``'s split (seed 0);
    sklearn's small sets (``iris``, ``wine``, ``breast_cancer``) are used whole.

    Args:
        name: a dataset name (``tasks.datasets`` or ``SKLEARN_SETS``).
        part: ``"train"``, ``"test"`` or ``"all"``.
        standardize: standardise each feature.
    Returns:
        ``(x [N, F] float32, y [N] int64)``.
    Raises:
        ValueError: an unknown part.
    """
    if name in SKLEARN_SETS:
        import sklearn.datasets as skd

        d = getattr(skd, f"load_{name}")()
        x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)
        parts = {"all": (x, y), "train": (x, y), "test": (x, y)}
    else:
        from tasks.datasets import load_dataset

        x_tr, y_tr, x_te, y_te = load_dataset(name)
        parts = {"train": (x_tr, y_tr), "test": (x_te, y_te),
                 "all": (torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te]))}
    if part not in parts:
        raise ValueError(f"dataset part must be train, test or all, got {part!r}")
    x, y = parts[part]
    if not standardize:
        return x, y
    mean, std = x.mean(0), x.std(0)
    return (x - mean) / torch.where(std > 1e-6, std, torch.ones_like(std)), y


def _gamma(alpha: Tensor, generator: torch.Generator) -> Tensor:
    """Gamma(α, 1) draws from ``generator`` (Marsaglia–Tsang; for α < 1 via Gamma(α + 1)·U^(1/α)),
    because torch's own gamma sampler takes no generator."""
    out = torch.empty_like(alpha)
    for k, a in enumerate(alpha.tolist()):
        boost = a < 1
        d = (a + 1 if boost else a) - 1 / 3
        c = 1 / math.sqrt(9 * d)
        while True:
            z = float(torch.randn((), generator=generator))
            v = (1 + c * z) ** 3
            u = float(torch.rand((), generator=generator))
            if v > 0 and math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
                break
        g = d * v
        if boost:
            g *= float(torch.rand((), generator=generator)) ** (1 / a)
        out[k] = g
    return out


def _to_model(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Episodes on the model's device and in its floating-point type."""
    p = next(iter(model.parameters()), None)
    return (x, y) if p is None else (x.to(p.device, p.dtype), y.to(p.device))


class OnlineClassificationFamily:
    """Episodes of online classification (see the module docstring).

    The dataset name ``"gaussian_classes"`` is not a fixed dataset: each episode is a new
    random task of ``synthetic_features`` raw features, Gaussian classes with a shared
    covariance ``L Lᵀ`` (``L = U diag(√λ)``, ``U`` Haar-random, ``λ_i ∝ i^(−β)`` with
    ``β ~ U[0, 2]``, so the features are correlated as real ones are) and class means
    ``μ_c = s L m_c`` (``m_c ~ N(0, I/F)``, so two classes lie about ``√2·s`` apart in
    Mahalanobis distance) with the separation ``s`` log-uniform in ``synthetic_separation``.
    The features are standardised with the task's exact moments under balanced classes (as a
    real dataset is standardised with its own statistics). With ``synthetic_skew`` κ > 0 each
    standardised feature then goes through its own monotone map ``(exp(k x) − 1) / k``,
    ``k ~ U[−κ, κ]`` (skewed, heavy-tailed marginals whose tail carries the class, as in
    measurements such as sizes and areas), and is standardised again with its exact moments.
    Then the features are projected like any dataset's.

    Args:
        datasets: names drawn uniformly per call.
        part: which part of each dataset the examples come from.
        episode_length: ``T``.
        num_features: the projected input size (with ``"subset"``, at most the dataset's feature
            count; ignored with ``"permutation"`` and ``"none"``), or a range ``[low, high]`` to
            draw it from uniformly per call.
        min_classes: the fewest classes of an episode.
        max_classes: the most classes of an episode.
        projection: one of ``PROJECTIONS`` or a list to draw from per call.
        standardize: standardise the features.
        val_episodes: episodes of ``validation_score``.
        seed: keys the validation episodes.
        class_concentration: None draws each episode's examples from the pool of its classes; a
            float α > 0 first draws the class proportions from Dirichlet(α, …, α).
        synthetic_features: raw features of ``"gaussian_classes"``.
        synthetic_separation: ``(low, high)`` of its log-uniform separation ``s``.
        synthetic_skew: its skew ``κ`` (0: none).
    Raises:
        ValueError: an unknown projection, bad class or feature counts, a non-positive length
            or concentration, bad synthetic options, or a dataset with fewer than ``min_classes``.
    """

    validation_name = "online_ce"

    def __init__(self, datasets: list[str] | tuple[str, ...] = ("digits",), part: str = "train",
                 episode_length: int = 100, num_features: int | list[int] = 16, min_classes: int = 2,
                 max_classes: int = 5, projection: str | list[str] = "gaussian", standardize: bool = True,
                 val_episodes: int = 32, seed: int = 0, class_concentration: float | None = None,
                 synthetic_features: int = 32, synthetic_separation: tuple[float, float] = (0.5, 4.0),
                 synthetic_skew: float = 0.0) -> None:
        projections = [projection] if isinstance(projection, str) else list(projection)
        if not projections or any(p not in PROJECTIONS for p in projections):
            raise ValueError(f"projection must be one of {PROJECTIONS} or a non-empty list of them, got {projection!r}")
        if not 2 <= min_classes <= max_classes:
            raise ValueError(f"need 2 <= min_classes <= max_classes, got {min_classes}, {max_classes}")
        feature_range = (num_features, num_features) if isinstance(num_features, int) else tuple(num_features)
        if len(feature_range) != 2 or not 1 <= feature_range[0] <= feature_range[1]:
            raise ValueError(f"num_features must be >= 1 or a range [low, high] with 1 <= low <= high, "
                             f"got {num_features}")
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        if class_concentration is not None and not (math.isfinite(class_concentration) and class_concentration > 0):
            raise ValueError(f"class_concentration must be None or a finite float > 0, got {class_concentration}")
        self.class_concentration = None if class_concentration is None else float(class_concentration)
        self.datasets, self.part = tuple(datasets), part
        self.episode_length = episode_length
        self.num_features = num_features if isinstance(num_features, int) else list(feature_range)
        self.min_classes, self.max_classes = min_classes, max_classes
        self.projection = projection if isinstance(projection, str) else tuple(projections)
        self.standardize = standardize
        self.val_episodes, self.seed = val_episodes, seed
        lo, hi = (float(v) for v in synthetic_separation)
        if synthetic_features < 1 or not 0 < lo <= hi < math.inf or not 0 <= synthetic_skew <= 3:
            raise ValueError(f"need synthetic_features >= 1, 0 < separation low <= high and 0 <= skew <= 3, got "
                             f"{synthetic_features}, {synthetic_separation}, {synthetic_skew}")
        self.synthetic_features, self.synthetic_separation = synthetic_features, (lo, hi)
        self.synthetic_skew = float(synthetic_skew)
        for name in self.datasets:
            if name == SYNTHETIC:
                continue
            _, y = dataset_arrays(name, part, standardize)
            if int(y.max()) + 1 < min_classes:
                raise ValueError(f"dataset {name} has {int(y.max()) + 1} classes, fewer than min_classes={min_classes}")
        self.name = f"online_{'_'.join(self.datasets)}"

    def sample(self, num_episodes: int, generator: torch.Generator,
               length: int | None = None) -> tuple[Tensor, Tensor, int]:
        """One batch of episodes and their class count.

        Args:
            num_episodes: ``E``.
            generator: the source of every draw.
            length: ``T`` (None: ``episode_length``).
        Returns:
            ``(x [E, T, A], y [E, T], C)``.
        """
        name = self.datasets[int(torch.randint(len(self.datasets), (1,), generator=generator))]
        if name == SYNTHETIC:
            available, F_in = self.max_classes, self.synthetic_features
        else:
            data_x, data_y = dataset_arrays(name, self.part, self.standardize)
            available, F_in = int(data_y.max()) + 1, data_x.shape[1]
        hi = min(self.max_classes, available)
        C = int(torch.randint(min(self.min_classes, hi), hi + 1, (1,), generator=generator))
        # A range of sizes or a list of projections: one draw per call, so the batch shares its input size.
        A, projection = self.num_features, self.projection
        if not isinstance(A, int):
            A = int(torch.randint(A[0], A[1] + 1, (1,), generator=generator))
        if not isinstance(projection, str):
            projection = projection[int(torch.randint(len(projection), (1,), generator=generator))]
        T = self.episode_length if length is None else length
        xs, ys = [], []
        for _ in range(num_episodes):
            if name == SYNTHETIC:
                x, y = self._gaussian_task(C, T, generator)
                xs.append(self._project(x, projection, F_in, A, generator))
                ys.append(y)
                continue
            classes = torch.randperm(available, generator=generator)[:C]
            relabel = torch.full((available,), -1, dtype=torch.int64)
            relabel[classes] = torch.arange(C)
            if self.class_concentration is not None:
                idx = self._imbalanced(data_y, classes, T, generator)
            else:
                pool = torch.nonzero(relabel[data_y] >= 0).squeeze(1)
                if len(pool) >= T:
                    idx = pool[torch.randperm(len(pool), generator=generator)[:T]]
                else:
                    idx = pool[torch.randint(len(pool), (T,), generator=generator)]
            xs.append(self._project(data_x[idx], projection, F_in, A, generator))
            ys.append(relabel[data_y[idx]])
        return torch.stack(xs), torch.stack(ys), C

    @staticmethod
    def _project(x: Tensor, projection: str, F_in: int, A: int, generator: torch.Generator) -> Tensor:
        if projection == "gaussian":
            return x @ (torch.randn(F_in, A, generator=generator) / np.sqrt(F_in))
        if projection == "permutation":
            return x[:, torch.randperm(F_in, generator=generator)]
        if projection == "subset":
            return x[:, torch.randperm(F_in, generator=generator)[:A]]
        return x

    def _gaussian_task(self, C: int, T: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One episode of a new random task of Gaussian classes (see the class docstring)."""
        F = self.synthetic_features
        U = haar_orthogonal(n=F, generator=generator)
        beta = 2.0 * float(torch.rand((), generator=generator))
        lam = torch.arange(1, F + 1, dtype=torch.float32) ** -beta
        L = U * (lam / lam.mean()).sqrt()
        lo, hi = self.synthetic_separation
        s = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand((), generator=generator)))
        means = s * (torch.randn(C, F, generator=generator) / math.sqrt(F)) @ L.T
        y = torch.randint(C, (T,), generator=generator) if self.class_concentration is None else \
            self._dirichlet_labels(C, T, generator)
        x = means[y] + torch.randn(T, F, generator=generator) @ L.T
        if not self.standardize and not self.synthetic_skew:
            return x, y
        # the task's exact moments with balanced classes
        centre = means.mean(0)
        noise_var = (L ** 2).sum(1)
        sd = (noise_var + ((means - centre) ** 2).mean(0)).sqrt()
        x = (x - centre) / sd
        if self.synthetic_skew:
            k = self.synthetic_skew * (2 * torch.rand(F, generator=generator) - 1)
            k = torch.where(k.abs() < 1e-3, torch.full_like(k, 1e-3), k)
            m, v = (means - centre) / sd, noise_var / sd ** 2  # each class's mean and variance, per feature
            # E exp(a X) = exp(a m + a² v / 2) for X ~ N(m, v); averaged over the balanced classes
            e1 = torch.exp(k * m + k ** 2 * v / 2).mean(0)
            e2 = torch.exp(2 * k * m + 2 * k ** 2 * v).mean(0)
            x = (torch.exp(k * x) - e1) / (e2 - e1 ** 2).clamp_min(1e-12).sqrt() * torch.sign(k)
        return x, y

    def _dirichlet_labels(self, C: int, T: int, generator: torch.Generator) -> Tensor:
        """``T`` labels of ``C`` classes whose proportions are drawn from Dirichlet(α), as
        normalised Gamma(α, 1) draws from the episode's generator."""
        gammas = _gamma(torch.full((C,), self.class_concentration), generator)
        return torch.multinomial(gammas / gammas.sum(), T, replacement=True, generator=generator)

    def _imbalanced(self, data_y: Tensor, classes: Tensor, T: int, generator: torch.Generator) -> Tensor:
        """``T`` example indices whose labels follow proportions ~ Dirichlet(α) over ``classes``
        (drawn without replacement within a class while its examples last)."""
        labels = self._dirichlet_labels(len(classes), T, generator)
        idx = torch.empty(T, dtype=torch.int64)
        for k, cls in enumerate(classes.tolist()):
            where = torch.nonzero(labels == k).squeeze(1)
            if len(where) == 0:
                continue
            members = torch.nonzero(data_y == cls).squeeze(1)
            order = torch.randperm(len(members), generator=generator)
            picks = order[torch.arange(len(where)) % len(members)]  # reuse examples only if the class runs out
            idx[where] = members[picks]
        return idx

    def meta_loss(self, model: nn.Module, num_episodes: int,
                  generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Mean online cross-entropy of the learner on one batch of episodes.

        Args:
            model: the learner (``learnopt.vsml``).
            num_episodes: episodes in the batch.
            generator: draws the episodes and the learner's initial state.
        Returns:
            ``(loss, metrics)``: the differentiable loss and floats to log.
        """
        x, y, C = self.sample(num_episodes, generator)
        x, y = _to_model(model, x, y)
        logits = online_episode(model, x, y, C, generator)
        ce, accuracy = online_metrics(logits, y)
        return ce, {"online_accuracy": float(accuracy), "classes": float(C)}

    def validation_score(self, model: Any, generator: torch.Generator | None = None) -> float:
        """Mean online cross-entropy on fixed episodes (split ``val``, keyed by ``seed``), in
        batches of 8 so every class count is represented.

        Args:
            model: the learner.
            generator: unused (the episodes are seeded).
        Returns:
            The score.
        """
        total, batches = 0.0, max(1, self.val_episodes // 8)
        with torch.no_grad():
            for k in range(batches):
                g = seeded_generator("val", self.seed, k)
                loss, _ = self.meta_loss(model, min(8, self.val_episodes), g)
                total += float(loss)
        return total / batches


def seeded_batches(family: OnlineClassificationFamily, split: str, n: int, per: int = 8) -> list[Any]:
    """``n`` batches of ``per`` episodes from fixed seeds of ``split`` (``"tune"``, ``"test"``,
    ``"select"``, ...): batch ``k`` is the same whatever ``n`` is, so more batches extend the
    same sample.

    Args:
        family: the family.
        split: the seed stream's name.
        n: number of batches.
        per: episodes per batch.
    Returns:
        ``n`` results of ``family.sample``.
    """
    return [family.sample(per, seeded_generator(split, family.name, k)) for k in range(n)]


def vsml_meta_test_families(episode_length: int = 100) -> dict[str, OnlineClassificationFamily]:
    """The VSML meta-test protocol's sets (``scripts/reproduce_vsml``), fixed whatever the learner
    was meta-trained on: streams drawn from the pool of each episode's classes (the dataset's own
    class proportions), projected to 16 features except raw mnist1d. Never-seen sets say so.

    Args:
        episode_length: ``T``.
    Returns:
        ``{description: family}``.
    """
    base = {"part": "train", "episode_length": episode_length, "num_features": 16, "min_classes": 2,
            "max_classes": 5, "projection": "gaussian", "standardize": True}
    return {
        "digits, unseen examples and projections": OnlineClassificationFamily(**{**base, "part": "test",
                                                                                 "datasets": ["digits"]}),
        "mnist1d (never seen), 16-d projection, 2–5 classes": OnlineClassificationFamily(
            **{**base, "datasets": ["mnist1d"]}),
        "mnist1d (never seen), raw 40 features, 10 classes": OnlineClassificationFamily(
            **{**base, "datasets": ["mnist1d"], "projection": "none", "min_classes": 10, "max_classes": 10}),
        "iris (never seen), 16-d projection, 2–3 classes": OnlineClassificationFamily(
            **{**base, "datasets": ["iris"], "max_classes": 3}),
        "wine (never seen), 16-d projection, 2–3 classes": OnlineClassificationFamily(
            **{**base, "datasets": ["wine"], "max_classes": 3}),
        "breast_cancer (never seen), 16-d projection, 2 classes": OnlineClassificationFamily(
            **{**base, "datasets": ["breast_cancer"], "max_classes": 2}),
    }


class SGDCloneFamily(OnlineClassificationFamily):
    """Streams for learning-algorithm cloning (``learnopt.vsml.clone``): the meta-loss is the
    cloning loss of a one-layer VSML network against online SGD (per-weight rate ``lr``,
    logit gain ``gain``) on the stream. Each batch first runs a random ``0 … max_burn_in``
    steps without gradient, so the clone is trained at late stream positions (grown weights)
    too, then backpropagates through ``episode_length`` steps.

    Args:
        lr: the SGD teacher's per-weight rate.
        gain: its logit gain.
        max_burn_in: the most burn-in steps.
        **kwargs: ``OnlineClassificationFamily``'s options.
    Raises:
        ValueError: ``lr`` or ``gain`` not positive, or ``max_burn_in < 0``.
    """

    validation_name = "clone_loss"

    def __init__(self, lr: float = 0.1, gain: float = 32.0, max_burn_in: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if lr <= 0 or gain <= 0 or max_burn_in < 0:
            raise ValueError(f"SGDCloneFamily: need lr > 0, gain > 0, max_burn_in >= 0; "
                             f"got {lr}, {gain}, {max_burn_in}")
        self.lr, self.gain, self.max_burn_in = lr, gain, max_burn_in
        self.name = f"sgd_clone_{'_'.join(self.datasets)}"

    def meta_loss(self, model: nn.Module, num_episodes: int,
                  generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The cloning loss on one batch of streams, after a random burn-in.

        Args:
            model: the learner (``learnopt.vsml``).
            num_episodes: episodes in the batch.
            generator: draws the episodes and the learner's initial state.
        Returns:
            ``(loss, metrics)``: the differentiable loss and floats to log.
        """
        from learnopt.vsml.clone import clone_loss

        burn_in = int(torch.randint(self.max_burn_in + 1, (1,), generator=generator))
        x, y, C = self.sample(num_episodes, generator, self.episode_length + burn_in)
        x, y = _to_model(model, x, y)
        loss, metrics = clone_loss(model, x, y, C, self.lr, self.gain, generator, burn_in)
        return loss, {**metrics, "burn_in": float(burn_in), "classes": float(C)}
