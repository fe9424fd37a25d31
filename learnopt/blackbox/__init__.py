"""Gradient-free learned optimizers: the RNN proposer of Chen et al. 2017 and its baselines.

``RNNProposer`` (``learnopt.blackbox.proposer``) proposes queries for a black-box function
from the history of queries and observations; ``AskTellSession`` and ``minimize``
(``learnopt.blackbox.session``) are the user-facing API; ``learnopt.blackbox.baselines`` holds
random search and GP expected improvement (``learnopt.blackbox.gp``) and wraps optuna's
samplers; ``learnopt.blackbox.losses`` the meta-losses L_sum, L_OI and L_EI.
"""

from learnopt.blackbox.proposer import RNNProposer
from learnopt.blackbox.session import AskTellSession, as_bounds, minimize
from learnopt.blackbox.standardizer import RunningStandardizer

REGISTRY = {"RNNProposer": RNNProposer}

__all__ = ["REGISTRY", "AskTellSession", "RNNProposer", "RunningStandardizer", "as_bounds", "minimize"]
