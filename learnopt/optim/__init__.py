"""Hand-designed optimizers as pure, differentiable, batched gradient transformations."""

from learnopt.optim.alias import adam, momentum, nesterov, rmsprop, sgd
from learnopt.optim.base import (
    EmptyState,
    GradientTransformation,
    Params,
    apply_updates,
    chain,
    detach_state,
    tree_leaves,
    tree_map,
)
from learnopt.optim.combinators import (
    clip,
    clip_by_global_norm,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay_schedule,
    instance_norm,
    instance_sum,
    linear_warmup_schedule,
    partition,
    scale_by_schedule,
)
from learnopt.optim.extra import MissingExtraArgument, hessian_vector_product
from learnopt.optim.torch_optimizer import TransformOptimizer, as_torch_optimizer
from learnopt.optim.transforms import (
    add_decayed_weights,
    safe_sqrt,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)

__all__ = [
    "MissingExtraArgument",
    "clip",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay_schedule",
    "hessian_vector_product",
    "instance_norm",
    "instance_sum",
    "linear_warmup_schedule",
    "partition",
    "scale_by_schedule",
    "EmptyState",
    "GradientTransformation",
    "Params",
    "TransformOptimizer",
    "adam",
    "add_decayed_weights",
    "apply_updates",
    "as_torch_optimizer",
    "chain",
    "detach_state",
    "momentum",
    "nesterov",
    "rmsprop",
    "safe_sqrt",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "sgd",
    "trace",
    "tree_leaves",
    "tree_map",
]
