"""Hand-designed optimizers as pure, differentiable, batched gradient transformations."""

from learnopt.optim.alias import adam, momentum, nesterov, rmsprop, sgd
from learnopt.optim.base import (
    EmptyState,
    GradientTransformation,
    Params,
    Recipe,
    apply_updates,
    chain,
    detach_state,
    rebuildable,
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
from learnopt.optim.hyperparams import InjectHyperparamsState, inject_hyperparams, set_hyperparams
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
from learnopt.optim.alias import (  # first-order optimizers
    adabelief,
    adadelta,
    adagrad,
    adagrad_norm,
    adamw,
    amsgrad,
    eadam,
    lamb,
    lion,
    lookahead,
    nadam,
    quickprop,
    radam,
    rprop,
    sign_sgd,
)
from learnopt.optim.adam_family import scale_by_amsgrad, scale_by_belief, scale_by_eadam, scale_by_nadam, scale_by_radam
from learnopt.optim.transforms import (  # their building blocks
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adagrad_norm,
    scale_by_lr_decay,
    scale_by_trust_ratio,
)
from learnopt.optim.sign_secant import scale_by_generalized_sign, scale_by_lion, scale_by_quickprop, scale_by_rprop
from learnopt.optim.hessian import adahessian, apollo, hutchinson_diagonal, sophia  # second-order
from learnopt.optim.muon import muon, scale_by_muon, zeropower_via_newtonschulz5
from learnopt.optim.newton import conjugate_gradient, newton
from learnopt.optim.quasi_newton import lbfgs
from learnopt.optim.stochastic_lbfgs import stochastic_lbfgs
from learnopt.optim.variance_reduced import jacsketch, saga, svrg

__all__ = [
    "adahessian",
    "apollo",
    "hutchinson_diagonal",
    "sophia",
    "muon",
    "scale_by_muon",
    "zeropower_via_newtonschulz5",
    "lbfgs",
    "newton",
    "conjugate_gradient",
    "stochastic_lbfgs",
    "jacsketch",
    "saga",
    "svrg",
    "adabelief",
    "adadelta",
    "adagrad",
    "adagrad_norm",
    "adamw",
    "amsgrad",
    "eadam",
    "lamb",
    "lion",
    "lookahead",
    "nadam",
    "quickprop",
    "radam",
    "rprop",
    "sign_sgd",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_eadam",
    "scale_by_generalized_sign",
    "scale_by_lion",
    "scale_by_lr_decay",
    "scale_by_nadam",
    "scale_by_quickprop",
    "scale_by_radam",
    "scale_by_rprop",
    "scale_by_trust_ratio",
    "InjectHyperparamsState",
    "inject_hyperparams",
    "set_hyperparams",
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
    "Recipe",
    "rebuildable",
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

# The catalogue of all optimizers by name (helper FEATURES).
from learnopt.optim.registry import (  # noqa: E402
    OPTIMIZERS,
    OptimizerNotAvailable,
    get_optimizer,
    make_torch_optimizer,
)

__all__ += ["OPTIMIZERS", "OptimizerNotAvailable", "get_optimizer", "make_torch_optimizer"]

try:  # with `higher` installed, its innerloop_ctx accepts learnopt's torch optimizers
    import learnopt.optim.higher_support  # noqa: E402,F401
except ImportError:
    pass
