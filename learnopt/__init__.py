"""learnopt: learned optimizers in PyTorch.

``learnopt.optim``: hand-designed optimizers as differentiable transforms;
``learnopt.learned``: learned optimizers; ``learnopt.blackbox``: gradient-free learned
proposers (ask/tell, ``minimize``); ``learnopt.meta``: meta-gradient estimators;
``learnopt.train``: the Lightning shell; ``load`` / ``load_optimizer``: checkpoints
(``load`` returns whatever the file holds: a learned optimizer, a black-box proposer, ...).
"""

__version__ = "0.1.0"

from learnopt.checkpoint import CheckpointError, export_checkpoint, load, load_optimizer  # noqa: E402

__all__ = ["CheckpointError", "__version__", "export_checkpoint", "load", "load_optimizer"]
