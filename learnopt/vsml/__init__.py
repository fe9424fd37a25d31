"""Meta-learned learners (VSML, Kirsch & Schmidhuber 2021): the learning algorithm lives in the
states of per-weight LSTMs with shared parameters; baselines share the online-learner protocol."""

from learnopt.vsml.baselines import BlackBoxOnlineLSTM, OnlineLinear
from learnopt.vsml.network import LayerState, VSMLLayer, VSMLNetwork, VSMLState
from learnopt.vsml.online import OnlineLearner, online_episode, online_metrics, online_predictions

# Classes a "vsml_learner" checkpoint may name (looked up by name; loading runs no code).
REGISTRY = {"VSMLNetwork": VSMLNetwork, "BlackBoxOnlineLSTM": BlackBoxOnlineLSTM}

__all__ = ["REGISTRY", "BlackBoxOnlineLSTM", "LayerState", "OnlineLearner", "OnlineLinear", "VSMLLayer",
           "VSMLNetwork", "VSMLState", "online_episode", "online_metrics", "online_predictions"]
