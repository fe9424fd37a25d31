"""learnopt: learned optimizers in PyTorch.

``learnopt.optim``: hand-designed optimizers as differentiable transforms;
``learnopt.learned``: learned optimizers; ``learnopt.meta``: meta-gradient estimators;
``learnopt.train``: the Lightning shell; ``load`` / ``load_optimizer``: checkpoints.
"""

__version__ = "0.1.0"

from learnopt.checkpoint import CheckpointError, export_checkpoint, load, load_optimizer  # noqa: E402

__all__ = ["CheckpointError", "__version__", "export_checkpoint", "load", "load_optimizer"]
