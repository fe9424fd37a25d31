"""A perceptron trained on its 0/1 loss by random coordinate descent (Li & Lin 2007, "Optimizing
0/1 loss for perceptrons by random coordinate descent", IJCNN).

The perceptron decides ``sign(w · [x, 1])``; each iteration draws a direction ``d`` and moves to
the exact minimiser of the training 0/1 error along ``w + t d`` (``exact_line_search`` on the
two candidates "negative", scored 0, and "positive", scored ``w · [x, 1]``). A step is taken
only when it lowers the error, so the training error never rises.
"""

from __future__ import annotations

import numpy as np

from learnopt.gradient_free.line_search import error_metric, exact_line_search

DIRECTIONS = ("gaussian", "coordinate", "mixed")


def _with_bias(X: np.ndarray) -> np.ndarray:
    return np.hstack([np.asarray(X, dtype=np.float64), np.ones((len(X), 1))])


def averaged_perceptron(X1: np.ndarray, signs: np.ndarray, epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Weights of the averaged perceptron (Freund & Schapire 1999) after ``epochs`` passes in
    random order; a starting point for RCD.

    Args:
        X1: ``[n, d + 1]`` inputs with the bias column.
        signs: ``[n]`` labels as ±1.
        epochs: passes over the data.
        rng: the order of the examples.
    Returns:
        ``[d + 1]`` weights.
    """
    w = np.zeros(X1.shape[1])
    total = np.zeros_like(w)
    for _ in range(epochs):
        for i in rng.permutation(len(X1)):
            if signs[i] * (X1[i] @ w) <= 0:
                w = w + signs[i] * X1[i]
            total += w
    return total / max(1, epochs * len(X1))


class RCDPerceptron:
    """Binary linear classifier trained by RCD on the 0/1 loss, with ``fit`` / ``predict`` /
    ``score`` as in scikit-learn.

    Args:
      iterations: line searches (directions tried).
      direction: ``"gaussian"`` (uniform on the sphere), ``"coordinate"`` (one weight or the
        bias), or ``"mixed"`` (alternating).
      init: ``"zeros"``, ``"perceptron"`` (the averaged perceptron, 5 epochs), or weights
        ``[d + 1]`` (bias last), e.g. a logistic regression's.
      seed: the directions and the perceptron's order.
    Raises:
      ValueError: an unknown ``direction`` or ``init``, or ``iterations < 0``.
    """

    def __init__(self, iterations: int = 2000, direction: str = "gaussian", init: str | np.ndarray = "perceptron",
                 seed: int = 0) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"RCDPerceptron: direction must be one of {DIRECTIONS}, got {direction!r}")
        if isinstance(init, str) and init not in ("zeros", "perceptron"):
            raise ValueError(f"RCDPerceptron: init must be 'zeros', 'perceptron' or an array, got {init!r}")
        if iterations < 0:
            raise ValueError(f"RCDPerceptron: iterations must be >= 0, got {iterations}")
        self.iterations, self.direction, self.init, self.seed = iterations, direction, init, seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> RCDPerceptron:
        """Train on the training 0/1 error.

        Args:
            X: ``[n, d]`` inputs.
            y: ``[n]`` labels of exactly two classes.
        Returns:
            ``self``, with ``coef_``, ``intercept_``, ``training_error_`` and ``history_`` set.
        Raises:
            ValueError: ``y`` does not have two classes, or ``init`` weights of the wrong shape.
        """
        self.classes_, labels = np.unique(np.asarray(y), return_inverse=True)
        if len(self.classes_) != 2:
            raise ValueError(f"RCDPerceptron.fit: y must have exactly two classes, got {len(self.classes_)}")
        X1 = _with_bias(X)
        rng = np.random.default_rng(self.seed)
        w = self._initial(X1, labels, rng)
        metric = error_metric(labels, 2)
        zeros = np.zeros(len(X1))
        a = np.stack([zeros, X1 @ w], axis=1)
        error = metric(np.argmax(a, axis=1))
        history = [error]
        for it in range(self.iterations):
            if error == 0:
                break
            d = self._draw(it, X1.shape[1], rng)
            b = np.stack([zeros, X1 @ d], axis=1)
            result = exact_line_search(a, b, metric)
            if result.value < error:
                w = w + result.step * d
                a = a + result.step * b
                scale = max(np.abs(w).max(), 1e-300)  # the decisions do not change with the scale of w
                w, a = w / scale, a / scale
                error = result.value
            history.append(error)
        self.coef_, self.intercept_ = w[:-1], w[-1]
        self.training_error_, self.history_ = error, history
        return self

    def _initial(self, X1: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if isinstance(self.init, str):
            if self.init == "zeros":
                return np.zeros(X1.shape[1])
            return averaged_perceptron(X1, 2.0 * labels - 1.0, 5, rng)
        w = np.asarray(self.init, dtype=np.float64).reshape(-1)
        if w.shape != (X1.shape[1],):
            raise ValueError(f"RCDPerceptron: init weights have shape {w.shape}, expected ({X1.shape[1]},) "
                             "(one per feature, then the bias)")
        return w.copy()

    def _draw(self, it: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        if self.direction == "coordinate" or (self.direction == "mixed" and it % 2):
            d = np.zeros(dim)
            d[rng.integers(dim)] = 1.0
            return d
        d = rng.standard_normal(dim)
        return d / np.linalg.norm(d)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``X @ coef_ + intercept_``.

        Args:
            X: ``[n, d]`` inputs.
        Returns:
            ``[n]`` scores (positive: the second class).
        """
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The predicted class.

        Args:
            X: ``[n, d]`` inputs.
        Returns:
            ``[n]`` labels.
        """
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy, as scikit-learn's ``score``.

        Args:
            X: ``[n, d]`` inputs.
            y: ``[n]`` labels.
        Returns:
            The fraction predicted correctly.
        """
        return float(np.mean(self.predict(X) == np.asarray(y)))
