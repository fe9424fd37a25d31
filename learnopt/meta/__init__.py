"""Unrolls and meta-gradient estimators. No Lightning or wandb here.

Every estimator (``TruncatedBPTT``, ``FullBPTT``, ``ES``, ``PES``) is a ``GradientEstimator``:
``init_unroll(lopt, episode)`` starts inner runs, ``estimate(lopt, state)`` returns a
``GradientEstimate(meta_loss, meta_grads, unroll_state, metrics, finite)``.
"""

from learnopt.meta.base import GradientEstimate, GradientEstimator, UnrollState
from learnopt.meta.es import ES, ESState, call_with_weights, forward_truncation
from learnopt.meta.pes import PES, PESState
from learnopt.meta.schedules import (
    ConstantSchedule,
    GeometricSchedule,
    TruncationSchedule,
    UniformSchedule,
    make_schedule,
    truncation_length,
)
from learnopt.meta.truncated_bptt import FullBPTT, TruncatedBPTT
from learnopt.meta.unroll import DIVERGED_LOG10, inner_step, log10_losses, rollout

__all__ = [
    "DIVERGED_LOG10",
    "ES",
    "PES",
    "ConstantSchedule",
    "ESState",
    "FullBPTT",
    "GeometricSchedule",
    "GradientEstimate",
    "GradientEstimator",
    "PESState",
    "TruncatedBPTT",
    "TruncationSchedule",
    "UniformSchedule",
    "UnrollState",
    "call_with_weights",
    "forward_truncation",
    "inner_step",
    "log10_losses",
    "make_schedule",
    "rollout",
    "truncation_length",
]
