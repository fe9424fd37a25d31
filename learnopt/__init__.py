"""learnopt: learned optimizers in PyTorch.

``learnopt.optim``: hand-designed optimizers as differentiable transforms;
``learnopt.learned``: learned optimizers; ``learnopt.blackbox``: gradient-free learned
proposers (ask/tell, ``minimize``); ``learnopt.meta``: meta-gradient estimators;
``learnopt.train``: the Lightning shell; ``load`` / ``load_optimizer``: checkpoints
(``load`` returns whatever the file holds: a learned optimizer, a black-box proposer, ...).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_CHECKPOINT_NAMES = ("CheckpointError", "export_checkpoint", "load", "load_optimizer")

__all__ = ["CheckpointError", "__version__", "export_checkpoint", "load", "load_optimizer"]


def __getattr__(name: str) -> Any:
    # PEP 562: the checkpoint functions are imported on first use, so ``import learnopt.optim``
    # loads the optimizers alone.
    if name in _CHECKPOINT_NAMES:
        return getattr(importlib.import_module("learnopt.checkpoint"), name)
    raise AttributeError(f"module 'learnopt' has no attribute {name!r}")
