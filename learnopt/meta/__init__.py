"""Unrolls and meta-gradient estimators. No Lightning or wandb here."""

from learnopt.meta.truncated_bptt import GradientEstimate, TruncatedBPTT, UnrollState
from learnopt.meta.unroll import inner_step, rollout

__all__ = ["GradientEstimate", "TruncatedBPTT", "UnrollState", "inner_step", "rollout"]
