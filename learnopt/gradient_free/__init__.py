"""Gradient-free optimizers that are not black-box: exact line searches of piecewise-constant
objectives of linear models (MERT, Och 2003; 0/1-loss random coordinate descent, Li & Lin 2007).

``exact_line_search`` is the shared core; ``mert`` and ``MERTClassifier`` (argmax models) and
``RCDPerceptron`` (a binary perceptron trained on its 0/1 loss) are built on it. numpy only.
"""

from learnopt.gradient_free.line_search import (
    DecisionMetric,
    LineSearchResult,
    decisions_at,
    error_metric,
    exact_line_search,
)
from learnopt.gradient_free.mert import MERTClassifier, MERTResult, mert
from learnopt.gradient_free.rcd import RCDPerceptron

__all__ = [
    "DecisionMetric", "LineSearchResult", "MERTClassifier", "MERTResult", "RCDPerceptron", "decisions_at",
    "error_metric", "exact_line_search", "mert",
]
