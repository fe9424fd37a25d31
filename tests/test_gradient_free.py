"""``learnopt.gradient_free``: the exact line search against brute force (fine grids plus every
interval between breakpoints), MERT and the 0/1-loss RCD perceptron against their defining
properties and scikit-learn's logistic regression."""

from __future__ import annotations

import numpy as np
import pytest

from learnopt.gradient_free import (
    DecisionMetric,
    MERTClassifier,
    RCDPerceptron,
    decisions_at,
    error_metric,
    exact_line_search,
    mert,
)


def _brute_force(a, b, metric, breakpoints, mask=None):
    """The best metric over a fine grid (offset so that it misses exact crossings) and one point
    inside every interval between the breakpoints, the unbounded ones included."""
    grid = np.linspace(-30, 30, 1201) + np.sqrt(2) * 1e-4
    if len(breakpoints):
        inside = np.concatenate([[breakpoints[0] - 1.0], 0.5 * (breakpoints[:-1] + breakpoints[1:]),
                                 [breakpoints[-1] + 1.0]])
        grid = np.concatenate([grid, inside])
    return min(metric(decisions_at(a, b, t, mask)) for t in grid)


def _f1_metric(labels):
    """1 - F1 of predicting class 1: not additive, so it goes through its sufficient statistics."""
    n = len(labels)
    stats = np.zeros((n, 2, 3))  # true positive, false positive, false negative
    stats[:, 1, 0] = labels == 1
    stats[:, 1, 1] = labels == 0
    stats[:, 0, 2] = labels == 1

    def aggregate(totals):
        tp, fp, fn = totals[:, 0], totals[:, 1], totals[:, 2]
        return 1.0 - 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12)

    return DecisionMetric(stats, aggregate)


@pytest.mark.parametrize("kind", ["integer_ties", "gaussian", "f1"])
def test_exact_line_search_equals_brute_force_and_never_worsens(kind):
    rng = np.random.default_rng({"integer_ties": 0, "gaussian": 1, "f1": 2}[kind])
    for _ in range(60):
        n = int(rng.integers(1, 10))
        C = 2 if kind == "f1" else int(rng.integers(2, 5))
        if kind == "gaussian":
            a, b = rng.normal(size=(n, C)), rng.normal(size=(n, C))
        else:  # small integers: shared crossings, parallel and identical lines, ties at t = 0
            a, b = rng.integers(-2, 3, (n, C)).astype(float), rng.integers(-1, 2, (n, C)).astype(float)
        labels = rng.integers(0, C, n)
        metric = _f1_metric(labels) if kind == "f1" else error_metric(labels, C)
        result = exact_line_search(a, b, metric)
        assert result.value <= result.start_value
        assert result.start_value == metric(decisions_at(a, b, 0.0))
        assert metric(decisions_at(a, b, result.step)) == pytest.approx(result.value, abs=1e-12)
        assert result.value == pytest.approx(min(result.start_value, _brute_force(a, b, metric, result.breakpoints)),
                                             abs=1e-12)


def test_interval_values_are_the_metric_inside_each_interval():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    metric = error_metric(rng.integers(0, 4, 7), 4)
    r = exact_line_search(a, b, metric)
    inside = np.concatenate([[r.breakpoints[0] - 1], 0.5 * (r.breakpoints[:-1] + r.breakpoints[1:]),
                             [r.breakpoints[-1] + 1]])
    assert [metric(decisions_at(a, b, t)) for t in inside] == pytest.approx(list(r.interval_values))


def test_degenerate_directions_and_masks():
    a = np.array([[1.0, 2.0], [0.0, 0.0]])
    labels = np.array([0, 1])
    flat = exact_line_search(a, np.zeros_like(a), error_metric(labels, 2))  # no crossing anywhere
    assert flat.step == 0.0 and len(flat.breakpoints) == 0 and flat.value == flat.start_value == 1.0
    same = exact_line_search(a, np.ones_like(a), error_metric(labels, 2))  # parallel lines
    assert same.step == 0.0 and len(same.breakpoints) == 0
    # a masked-out candidate is never decided, however high its score
    a3, b3 = np.array([[0.0, 5.0, 1.0]]), np.array([[0.0, 1.0, -1.0]])
    mask = np.array([[True, False, True]])
    r = exact_line_search(a3, b3, error_metric(np.array([1]), 3), mask=mask)
    assert r.value == 1.0 and r.step == 0.0
    with pytest.raises(ValueError, match="finite"):
        exact_line_search(np.array([[np.nan, 0.0]]), np.zeros((1, 2)), error_metric(np.array([0]), 2))
    with pytest.raises(ValueError, match="statistics"):
        exact_line_search(np.zeros((2, 2)), np.zeros((2, 2)), error_metric(np.array([0, 1, 1]), 2))


def test_mert_reaches_zero_error_on_separable_candidates_and_only_ever_improves():
    rng = np.random.default_rng(0)
    n, C, D = 60, 4, 5
    F = rng.normal(size=(n, C, D))
    w_true = rng.normal(size=D)
    labels = np.argmax(F @ w_true, axis=1)
    result = mert(F, error_metric(labels, C), random_directions=4, max_sweeps=30, restarts=2)
    assert result.value == 0.0
    assert len(result.history) == 3
    for run in result.history:
        assert all(b < a for a, b in zip(run, run[1:]))
    assert np.mean(np.argmax(F @ result.weights, axis=1) != labels) == 0.0


def test_classifiers_fit_predict_and_never_raise_their_training_error():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    del sklearn
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)[:300]
    y = y[:300]
    lr = LogisticRegression(max_iter=5000).fit(X, y)
    lr_error = 1 - lr.score(X, y)
    start = np.append(lr.coef_[0], lr.intercept_[0])
    rcd = RCDPerceptron(iterations=300, init=start, seed=1).fit(X, y)
    assert all(b <= a for a, b in zip(rcd.history_, rcd.history_[1:]))
    assert rcd.training_error_ == pytest.approx(1 - rcd.score(X, y)) and rcd.training_error_ <= lr_error
    assert set(rcd.predict(X)) <= set(y)
    m = MERTClassifier(max_sweeps=2, restarts=0, random_directions=2).fit(X, y)
    assert m.training_error_ == pytest.approx(1 - m.score(X, y))


@pytest.mark.parametrize("make,words", [
    (lambda: RCDPerceptron(direction="diagonal"), "direction"),
    (lambda: RCDPerceptron(init="ones"), "init"),
    (lambda: RCDPerceptron(init=np.zeros(3)).fit(np.zeros((4, 3)), np.array([0, 1, 0, 1])), "shape"),
    (lambda: RCDPerceptron().fit(np.zeros((3, 2)), np.array([0, 1, 2])), "two classes"),
    (lambda: mert(np.zeros((3, 2)), error_metric(np.zeros(3, dtype=int), 2)), "features"),
])
def test_bad_input_gets_clear_errors(make, words):
    with pytest.raises(ValueError, match=words):
        make()
