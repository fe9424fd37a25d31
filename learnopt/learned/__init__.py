"""Learned optimizers (``nn.Module``s with the ``init`` / ``update`` protocol)."""

from learnopt.learned.base import LearnedOptimizer
from learnopt.learned.general import NormalizedMLPOptimizer
from learnopt.learned.general_compact import CompactNormalizedOptimizer
from learnopt.learned.general_lstm import CompactLSTMOptimizer, NormalizedLSTMOptimizer
from learnopt.learned.hyperparams import LearnedHyperparameters
from learnopt.learned.lstm import CoordinatewiseLSTM, LSTMOptimizerState
from learnopt.learned.mlp_lopt import FeatureMLPOptimizer
from learnopt.learned.preprocess import log_and_sign

# Classes a checkpoint may name. Loading looks the name up here and never imports
# anything the file names, so a checkpoint cannot run code.
REGISTRY: dict[str, type[LearnedOptimizer]] = {
    "CompactLSTMOptimizer": CompactLSTMOptimizer,
    "CompactNormalizedOptimizer": CompactNormalizedOptimizer,
    "CoordinatewiseLSTM": CoordinatewiseLSTM,
    "FeatureMLPOptimizer": FeatureMLPOptimizer,
    "LearnedHyperparameters": LearnedHyperparameters,
    "NormalizedLSTMOptimizer": NormalizedLSTMOptimizer,
    "NormalizedMLPOptimizer": NormalizedMLPOptimizer,
}

__all__ = [
    "REGISTRY",
    "CompactLSTMOptimizer",
    "CompactNormalizedOptimizer",
    "CoordinatewiseLSTM",
    "FeatureMLPOptimizer",
    "LSTMOptimizerState",
    "LearnedHyperparameters",
    "LearnedOptimizer",
    "NormalizedLSTMOptimizer",
    "NormalizedMLPOptimizer",
    "log_and_sign",
]
