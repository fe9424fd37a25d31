"""Unrolls and meta-gradient estimators. No Lightning or wandb here."""

from learnopt.meta.truncated_bptt import GradientEstimate, TruncatedBPTT, UnrollState
from learnopt.meta.unroll import DIVERGED_LOG10, inner_step, log10_losses, rollout

__all__ = ["DIVERGED_LOG10", "GradientEstimate", "log10_losses", "TruncatedBPTT", "UnrollState", "inner_step", "rollout"]
