"""Minimum error rate training (MERT, Och 2003, ACL P03-1021) of a linear argmax model.

Each candidate ``c`` of example ``i`` has features ``F[i, c, :]``; the model decides
``argmax_c F[i, c] · w``; the metric of those decisions is piecewise constant in ``w`` and is
minimised by exact line searches (``exact_line_search``) along directions, Powell-style: every
coordinate direction and a few random ones per sweep, each step taken as soon as it improves;
sweeps until none improves; restarts from random points, the best kept (Och 2003, section 6;
random directions as in Macherey et al. 2008, EMNLP D08-1076).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from learnopt.gradient_free.line_search import DecisionMetric, decisions_at, error_metric, exact_line_search


class MERTResult(NamedTuple):
    """``weights``: the best found; ``value``: its metric; ``history``: per run (the first, then
    each restart), the metric at its start and after every accepted step; ``line_searches``: how
    many were run."""

    weights: np.ndarray
    value: float
    history: list[list[float]]
    line_searches: int


def mert(features: np.ndarray, metric: DecisionMetric, weights: np.ndarray | None = None, *,
         random_directions: int = 8, max_sweeps: int = 20, restarts: int = 3, seed: int = 0,
         mask: np.ndarray | None = None) -> MERTResult:
    """Minimise ``metric`` of ``argmax_c features[i, c] · w`` over ``w``.

    Args:
      features: ``[n, C, D]`` candidate features.
      metric: the loss of the decisions (``DecisionMetric``, e.g. ``error_metric``).
      weights: the starting point of the first run (default: zeros); restarts draw N(0, I).
      random_directions: random unit directions added to the ``D`` coordinate ones each sweep.
      max_sweeps: sweeps per run; a run also ends when a whole sweep improves nothing.
      restarts: further runs from random starting points.
      seed: the random directions and restarts.
      mask: optional ``[n, C]``: ``False`` for missing candidates (n-best lists of different sizes).
    Returns:
      A ``MERTResult`` with the best weights over all runs.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 3:
        raise ValueError(f"mert: features must be [examples, candidates, dims], got shape {features.shape}")
    n, C, D = features.shape
    rng = np.random.default_rng(seed)
    starts = [np.zeros(D) if weights is None else np.asarray(weights, dtype=np.float64).copy()]
    starts += [rng.standard_normal(D) for _ in range(restarts)]
    best_w, best_value, history, searches = None, np.inf, [], 0
    for w in starts:
        a = features @ w  # scores, kept up to date as w moves
        value = metric(decisions_at(a, np.zeros((n, C)), 0.0, mask))
        history.append([value])
        for _ in range(max_sweeps):
            improved = False
            randoms = rng.standard_normal((random_directions, D))
            directions = [(j, None) for j in range(D)] + [(None, d / np.linalg.norm(d)) for d in randoms]
            for j, d in directions:
                b = features[:, :, j] if d is None else features @ d
                result = exact_line_search(a, b, metric, mask)
                searches += 1
                if result.value < value:
                    if d is None:
                        w = w.copy()
                        w[j] += result.step
                    else:
                        w = w + result.step * d
                    a = a + result.step * b
                    # argmax decisions do not change with the scale of w; keep it near 1
                    scale = max(np.abs(w).max(), 1e-300)
                    w, a = w / scale, a / scale
                    value = result.value
                    history[-1].append(value)
                    improved = True
            if not improved:
                break
        if value < best_value:
            best_w, best_value = w, value
    return MERTResult(best_w, float(best_value), history, searches)


class MERTClassifier:
    """A multiclass linear classifier ``argmax_c W[c] · [x, 1]`` trained by MERT on its
    training 0/1 error, with scikit-learn's ``fit`` / ``predict`` / ``score``.

    Each class is a candidate whose features are ``[x, 1]`` placed in that class's block of
    ``W``.

    Args:
        random_directions, max_sweeps, restarts, seed: ``mert``'s options.
    """

    def __init__(self, *, random_directions: int = 8, max_sweeps: int = 20, restarts: int = 3, seed: int = 0):
        self.options = dict(random_directions=random_directions, max_sweeps=max_sweeps, restarts=restarts, seed=seed)

    def _features(self, X: np.ndarray) -> np.ndarray:
        X1 = np.hstack([np.asarray(X, dtype=np.float64), np.ones((len(X), 1))])
        n, d = X1.shape
        C = len(self.classes_)
        F = np.zeros((n, C, C * d))
        for c in range(C):
            F[:, c, c * d:(c + 1) * d] = X1
        return F

    def fit(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> MERTClassifier:
        """Train on the training 0/1 error.

        Args:
            X: ``[n, d]`` inputs.
            y: ``[n]`` labels (at least two classes).
            weights: ``[C, d + 1]`` to start from (None: zeros).
        Returns:
            ``self``, with ``coef_``, ``training_error_`` and ``result_`` set.
        Raises:
            ValueError: ``y`` has fewer than two classes.
        """
        self.classes_, labels = np.unique(np.asarray(y), return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("MERTClassifier.fit: y has fewer than two classes")
        start = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        result = mert(self._features(X), error_metric(labels, len(self.classes_)), start, **self.options)
        self.coef_ = result.weights.reshape(len(self.classes_), -1)
        self.training_error_ = result.value
        self.result_ = result
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Scores of every class, ``[X, 1] @ coef_.T``.

        Args:
            X: ``[n, d]`` inputs.
        Returns:
            ``[n, C]``.
        """
        X1 = np.hstack([np.asarray(X, dtype=np.float64), np.ones((len(X), 1))])
        return X1 @ self.coef_.T

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The class with the highest score.

        Args:
            X: ``[n, d]`` inputs.
        Returns:
            ``[n]`` labels.
        """
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy, as scikit-learn's ``score``.

        Args:
            X: ``[n, d]`` inputs.
            y: ``[n]`` labels.
        Returns:
            The fraction predicted correctly.
        """
        return float(np.mean(self.predict(X) == np.asarray(y)))
