"""Unrolls and meta-gradient estimators. No Lightning or wandb here.

Every estimator (``TruncatedBPTT``, ``FullBPTT``, ``ES``, ``PES``, and for episode families
``EpisodicBPTT``, ``EpisodicES``) is a ``GradientEstimator``, built from its settings alone
(``PES(num_pairs=4, sigma=0.01, horizon=500)``, or in a config ``estimator: {class_path:
learnopt.meta.PES, init_args: ...}``) and bound to a task family by ``bind`` (which
``MetaTrainModule`` does). ``init_unroll(lopt, episode)`` starts inner runs, ``estimate(lopt,
state)`` returns a ``GradientEstimate(meta_loss, meta_grads, unroll_state, metrics, finite)``.
Truncated BPTT, ES and PES run their truncations through one core, ``run_truncation``.
"""

from learnopt.meta.base import GradientEstimate, GradientEstimator, UnrollState
from learnopt.meta.episodic import EpisodicBPTT, EpisodicES
from learnopt.meta.es import ES, ESState, call_with_weights
from learnopt.meta.pes import PES, PESState
from learnopt.meta.schedules import (
    ConstantSchedule,
    GeometricSchedule,
    TruncationSchedule,
    UniformSchedule,
    truncation_length,
)
from learnopt.meta.truncated_bptt import FullBPTT, TruncatedBPTT
from learnopt.meta.truncation import Truncation, run_truncation
from learnopt.meta.unroll import DIVERGED_LOG10, inner_step, log10_losses, rollout

__all__ = [
    "DIVERGED_LOG10",
    "ES",
    "PES",
    "ConstantSchedule",
    "ESState",
    "EpisodicBPTT",
    "EpisodicES",
    "FullBPTT",
    "GeometricSchedule",
    "GradientEstimate",
    "GradientEstimator",
    "PESState",
    "Truncation",
    "TruncatedBPTT",
    "TruncationSchedule",
    "UniformSchedule",
    "UnrollState",
    "call_with_weights",
    "inner_step",
    "log10_losses",
    "rollout",
    "run_truncation",
    "truncation_length",
]
