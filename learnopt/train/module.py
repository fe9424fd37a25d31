"""Meta-training as a LightningModule: each training step is one meta-gradient estimate."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from torch import nn

from learnopt.meta.base import GradientEstimator, UnrollState, check_count, init_spec
from learnopt.meta.episodic import EpisodeFamily, EpisodicBPTT, is_episodic
from learnopt.meta.truncated_bptt import TruncatedBPTT
from learnopt.meta.unroll import log10_losses, rollout
from learnopt.task import TaskFamily, seeded_generator

class NonFiniteMetaTraining(RuntimeError):
    """Meta-training stopped: too many consecutive truncations had a non-finite meta-gradient."""


class _Once(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        yield 0


def family_spec(family: Any) -> dict[str, Any]:
    """Import path and constructor arguments of a task family (those stored under their own
    name as plain values or tuples), for checkpoint metadata; derived attributes are left out.

    Args:
        family: the task family (or episode family).

    Returns:
        ``{"class_path": ..., "init_args": {...}}`` (``learnopt.meta.base.init_spec``).
    """
    return init_spec(family)


def default_estimator(task_family: Any) -> GradientEstimator:
    """The estimator a module gets when none is given: ``TruncatedBPTT()`` (the paper's), or
    ``EpisodicBPTT()`` for an episode family.

    Args:
        task_family: the family the module meta-trains on.

    Returns:
        A new, unbound estimator.
    """
    return EpisodicBPTT() if is_episodic(task_family) else TruncatedBPTT()


def _load_initial_weights(model: nn.Module, path: str) -> None:
    """Copy the weights of the exported checkpoint ``path`` into ``model``: the same class and
    the same weights (names and shapes). Config keys that leave the weights alike (a VSML
    network's ``bias_input`` or ``micro_ticks``) may differ; they are reported in a warning. A
    model with a ``weights_from(source)`` method may also start from a checkpoint of another
    config it accepts (``RNNProposer``: turning on ``trend`` or ``local``)."""
    import warnings

    from learnopt.checkpoint import CheckpointError, load

    source = load(path)
    if type(source) is not type(model):
        raise CheckpointError(f"init_from {path}: holds a {type(source).__name__}, "
                              f"the run trains a {type(model).__name__}")
    mine, theirs = model.state_dict(), source.state_dict()
    wrong = sorted(k for k in mine.keys() | theirs.keys()
                   if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape)
    cfg_mine, cfg_theirs = getattr(model, "config", dict)(), getattr(source, "config", dict)()
    diff = {k: (cfg_theirs.get(k), cfg_mine.get(k)) for k in sorted(cfg_mine.keys() | cfg_theirs.keys())
            if cfg_mine.get(k) != cfg_theirs.get(k)}
    grow = getattr(model, "weights_from", None)
    if wrong and grow is not None:
        try:
            theirs = grow(source)
        except ValueError as err:
            raise CheckpointError(f"init_from {path}: {err}") from None
        warnings.warn(f"init_from {path}: weights carried over to a learned optimizer of another config "
                      f"({type(model).__name__}.weights_from; config (checkpoint, run): {diff})", stacklevel=2)
        wrong, diff = [], {}
    if wrong:
        raise CheckpointError(f"init_from {path}: its weights do not fit the run's learned optimizer "
                              f"(weights {wrong} missing or of another shape; config (checkpoint, run): {diff})")
    if diff:
        warnings.warn(f"init_from {path}: config differs from the run's (checkpoint, run): {diff}", stacklevel=2)
    model.load_state_dict(theirs)


class MetaTrainModule(pl.LightningModule):
    """Meta-trains ``learned_optimizer`` on ``task_family`` with the meta-gradient estimator
    ``estimator`` (a ``learnopt.meta.GradientEstimator``; default ``TruncatedBPTT()``, or
    ``EpisodicBPTT()`` for an episode family).

    The estimator carries its own settings (tasks per estimate, truncation length and
    schedule, horizon, loss transform, perturbations, ...); a config gives it as an object::

        estimator:
          class_path: learnopt.meta.PES
          init_args: {num_pairs: 4, sigma: 0.01, num_tasks: 8, horizon: 500,
                      schedule: {class_path: learnopt.meta.UniformSchedule, init_args: {low: 25, high: 75}}}

    and the module binds the task family and its ``seed`` into it (``GradientEstimator.bind``).
    The choices: ``TruncatedBPTT`` (Andrychowicz et al. 2016), ``FullBPTT``, ``ES``, ``PES``
    (Vicol et al. 2021) for task families; ``EpisodicBPTT`` and ``EpisodicES`` for episode
    families (black-box proposers, VSML learners). What remains here is the meta-optimizer and
    the shell around it.

    Distributed (Lightning's ``ddp`` strategy, any number of processes and nodes): every rank
    runs its own estimate (its own tasks for BPTT, its share of the antithetic pairs for
    ES/PES; ``GradientEstimator.distribute``), the meta-gradients are averaged with one
    all-reduce, and every rank takes the same Adam step, so the replicas stay identical.

    Manual optimization: the estimator returns the meta-gradient (the same record any
    estimator returns), which is clipped by global norm ``grad_clip`` and applied with Adam
    (``meta_lr``; ``meta_lr_schedule="cosine"`` decays it to ``meta_lr * meta_lr_final_ratio``
    over ``trainer.max_steps``). Truncations whose meta-gradient is not finite are skipped (no
    update), counted in ``train/nonfinite`` and still count as meta-steps, so ``max_steps``
    bounds the run; ``max_nonfinite`` consecutive ones stop it with ``NonFiniteMetaTraining``
    (a task family whose loss is never finite would otherwise train nothing). ``meta_updates``
    counts the updates actually applied; an optimizer with none is never exported. Validation
    runs the estimator's full horizon on fixed held-out instances (split ``"val"``) and reports
    the mean log10 final loss, which the export callback uses to keep the best learned
    optimizer (as the paper keeps the best validation checkpoint).

    ``init_from``: an exported learnopt checkpoint (``checkpoints/*.pt``) whose weights start
    the meta-training (fine-tuning a learned optimizer on another task distribution). Its class
    and weight shapes must equal ``learned_optimizer``'s (config keys that leave the weights
    alike may differ, with a warning); it is read with ``weights_only`` like every checkpoint.
    Resuming a run (``--ckpt_path``) restores the run's own weights over it.

    Args:
        learned_optimizer: the learned optimizer (its parameters are the meta-parameters).
        task_family: a ``TaskFamily``, or an episode family (``learnopt.meta.episodic``).
        estimator: the meta-gradient estimator (see above).
        meta_lr: Adam's learning rate on the meta-parameters.
        meta_lr_schedule: ``"constant"`` or ``"cosine"`` (down to ``meta_lr *
            meta_lr_final_ratio`` at ``trainer.max_steps``).
        meta_lr_final_ratio: the cosine schedule's final fraction of ``meta_lr``.
        grad_clip: the global-norm clip of the meta-gradient.
        seed: the run's seed: the validation tasks', and the estimator's unless it has its own.
        val_tasks: held-out task instances scored at each validation.
        val_draws: how many times validation samples ``val_tasks`` instances (a family that draws one architecture
            per ``sample``, ``MLPFamily`` with ``width_choices``, then validates on ``val_draws`` architectures).
        init_from: an exported checkpoint whose weights start meta-training.
        max_nonfinite: consecutive non-finite truncations that stop meta-training.

    References:
        Andrychowicz et al. 2016, arXiv 1606.04474; Vicol et al. 2021, arXiv 2112.13835.
    """

    def __init__(
        self,
        learned_optimizer: nn.Module,
        task_family: TaskFamily | EpisodeFamily,
        estimator: GradientEstimator | None = None,
        meta_lr: float = 1e-3,
        meta_lr_schedule: Literal["constant", "cosine"] = "constant",
        meta_lr_final_ratio: float = 0.1,
        grad_clip: float = 1.0,
        seed: int = 0,
        val_tasks: int = 256,
        val_draws: int = 1,
        init_from: str | None = None,
        max_nonfinite: int = 50,
    ) -> None:
        super().__init__()
        check_count("MetaTrainModule", "val_tasks", val_tasks,
                    "validation on val_tasks instances chooses the exported learned optimizer")
        check_count("MetaTrainModule", "val_draws", val_draws, "validation samples val_tasks instances that often")
        check_count("MetaTrainModule", "max_nonfinite", max_nonfinite,
                    "it is how many consecutive non-finite truncations stop meta-training")
        if estimator is None:
            estimator = default_estimator(task_family)
        if not isinstance(estimator, GradientEstimator):
            raise TypeError(f"MetaTrainModule: estimator must be a learnopt.meta estimator object (e.g. "
                            f"learnopt.meta.TruncatedBPTT(...)), got {estimator!r}")
        self.estimator = estimator.bind(task_family, seed=seed)
        self.save_hyperparameters(ignore=["learned_optimizer", "task_family", "estimator"])
        if init_from is not None:
            _load_initial_weights(learned_optimizer, init_from)
        self.learned_optimizer = learned_optimizer
        self.task_family = task_family
        self.automatic_optimization = False
        self._unroll: UnrollState | None = None
        self._pending_unroll: dict[str, Any] | None = None
        self.meta_updates = 0  # meta-gradient steps applied (skipped truncations excluded)
        self.skipped_truncations = 0
        self._nonfinite_streak = 0
        self.resolved_config: dict[str, Any] | None = None  # set by the CLI: the full resolved config

    # -- data: the estimator samples tasks itself ---------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # One "batch" per meta-step (an index; the estimator samples the tasks), sized so the
        # progress bar knows the total.
        steps = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else 1000
        # Under DDP Lightning shards this range across the ranks: give each rank all the steps.
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(range(steps * world), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Once(), batch_size=None)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.Adam(self.learned_optimizer.parameters(), lr=hp.meta_lr)
        if hp.meta_lr_schedule == "constant":
            return opt
        total = max(1, self.trainer.max_steps if self.trainer.max_steps > 0 else 1)
        final = hp.meta_lr_final_ratio

        def factor(step: int) -> float:
            progress = min(step, total) / total
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    # -- meta-training ---------------------------------------------------------------------------
    def _current_unroll(self) -> UnrollState:
        if self._unroll is None:
            pending, self._pending_unroll = self._pending_unroll, None
            if pending is None:
                self._unroll = self.estimator.init_unroll(self.learned_optimizer, episode=0)
            else:
                self._unroll = self._restore_unroll(pending)
        return self._unroll

    # -- distributed meta-training (Lightning's DDP strategy) ------------------------------------
    def on_fit_start(self) -> None:
        # Each rank estimates on its own tasks (or, for ES/PES, its own share of the pairs); the
        # meta-gradients are averaged by hand in ``_average_across_ranks`` (the estimator hands
        # us gradients, there is no ``backward`` for DDP's hooks to reduce).
        if self.trainer.world_size > 1:
            self.estimator.distribute(self.global_rank, self.trainer.world_size)

    def _average_across_ranks(self, est: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
        """The meta-gradient and meta-loss averaged over the ranks (one all-reduce), and whether
        every rank's estimate was finite. A single process gets its own estimate back. If any
        rank's estimate is not finite, no rank steps (so the replicas stay identical)."""
        world = self.trainer.world_size
        if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return est.meta_grads, est.meta_loss, est.finite
        names = list(est.meta_grads)
        like = est.meta_grads[names[0]]
        flat = torch.cat([est.meta_grads[n].reshape(-1) for n in names] + [
            est.meta_loss.detach().reshape(1).to(like),
            torch.tensor([0.0 if est.finite else 1.0], dtype=like.dtype, device=like.device),
        ])
        torch.distributed.all_reduce(flat)  # sum
        finite = bool(flat[-1] == 0)
        flat = flat / world
        grads, offset = {}, 0
        for n in names:
            g = est.meta_grads[n]
            grads[n] = flat[offset: offset + g.numel()].view_as(g)
            offset += g.numel()
        return grads, flat[-2], finite

    def training_step(self, batch: Any, batch_idx: int) -> None:
        est = self.estimator.estimate(self.learned_optimizer, self._current_unroll())
        self._unroll = est.unroll_state
        meta_grads, meta_loss, finite = self._average_across_ranks(est)
        if est.finite and not finite:  # another rank diverged: every rank starts a new episode, as it did
            self._unroll = self.estimator.init_unroll(self.learned_optimizer, self._unroll.episode + 1)
        opt = self.optimizers()
        opt.zero_grad()
        if finite:
            for name, p in self.learned_optimizer.named_parameters():
                p.grad = meta_grads[name]
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            self.meta_updates += 1
            self._nonfinite_streak = 0
        else:
            self._skip_truncation(meta_loss)
        # A skipped truncation steps too, with every gradient None (Adam leaves the weights and its
        # state alone): the step counter, hence max_steps and the schedule, advance either way.
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/meta_loss", meta_loss, prog_bar=True, batch_size=1)
        for key, value in est.metrics.items():
            self.log(f"train/{key}", value, reduce_fx="sum" if key == "nonfinite" else "mean", batch_size=1)
        self.log("train/episode", float(self._unroll.episode), batch_size=1)

    def _skip_truncation(self, meta_loss: torch.Tensor) -> None:
        self.skipped_truncations += 1
        self._nonfinite_streak += 1
        limit = self.hparams.max_nonfinite
        if self._nonfinite_streak >= limit:
            raise NonFiniteMetaTraining(
                f"meta-training stopped at meta-step {self.global_step}: {limit} consecutive truncations had a "
                f"non-finite meta-gradient (last meta-loss {float(meta_loss)}); {self.meta_updates} updates were "
                f"applied in all. The task family's loss or the learned optimizer diverges: check the task family, "
                f"lower --model.meta_lr or the estimator's unroll_length, or raise --model.max_nonfinite"
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log(self.monitor_key, self.validation_score(), prog_bar=True, batch_size=1)

    @property
    def monitor_key(self) -> str:
        """The validation metric (lower is better) that model selection watches: the mean log10
        final loss for inner-training families, ``val/<family.validation_name>`` for episode
        families (default ``val/score``)."""
        if is_episodic(self.task_family):
            return f"val/{getattr(self.task_family, 'validation_name', 'score')}"
        return "val/log10_final_loss"

    def validation_score(self) -> float:
        """The current model's score on the fixed validation split (see ``monitor_key``).

        Returns:
            The episode family's ``validation_score``, else ``validation_log10_final_loss()``; lower is better.
        """
        if is_episodic(self.task_family):
            generator = seeded_generator("val", self.hparams.seed)
            with torch.inference_mode(False), torch.enable_grad():
                return float(self.task_family.validation_score(self.learned_optimizer, generator))
        return self.validation_log10_final_loss()

    def validation_log10_final_loss(self) -> float:
        """Mean log10 final loss of the current learned optimizer on the fixed validation tasks
        (a diverged instance counts as +30).

        Returns:
            The mean over ``val_draws`` × ``val_tasks`` instances after an inner run of the estimator's horizon.
        """
        hp = self.hparams
        generator = seeded_generator("val", hp.seed)
        scores = []
        for _ in range(hp.get("val_draws", 1)):  # hparams of runs saved before val_draws lack it
            task = self.task_family.sample(hp.val_tasks, generator)
            if hasattr(task, "to"):
                task = task.to(self.device)
            with torch.inference_mode(False), torch.enable_grad():
                losses = rollout(self.learned_optimizer.transform(), task, self.estimator.horizon,
                                 generator=generator)
            scores.append(log10_losses(losses[-1]).mean())
        return float(torch.stack(scores).mean())

    # -- resuming: the carried unroll is part of the Lightning checkpoint -----------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The estimator's whole carried state: the inner run's parameters, optimizer state and
        # data generator (and for ES/PES the perturbation generator; for PES every particle's
        # inner run and accumulated perturbation), so a resumed run continues bit for bit.
        if self._unroll is not None:
            checkpoint["learnopt_unroll"] = self.estimator.save_unroll(self._unroll)
        checkpoint["learnopt_counts"] = {"meta_updates": self.meta_updates,
                                         "skipped_truncations": self.skipped_truncations,
                                         "nonfinite_streak": self._nonfinite_streak}
        # Distributed: every rank's carried state (rank 0's is the one above), gathered on all
        # ranks because Lightning builds the checkpoint on all of them and writes rank 0's.
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * self.trainer.world_size
            mine = None if self._unroll is None else self.estimator.save_unroll(self._unroll)
            torch.distributed.all_gather_object(ranks, mine)
            checkpoint["learnopt_unroll_ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_unroll = checkpoint.get("learnopt_unroll")
        self._pending_ranks = checkpoint.get("learnopt_unroll_ranks")
        self._unroll = None
        # Checkpoints written before these counts existed: every step was taken as an update.
        counts = checkpoint.get("learnopt_counts", {"meta_updates": int(checkpoint.get("global_step", 0))})
        self.meta_updates = int(counts.get("meta_updates", 0))
        self.skipped_truncations = int(counts.get("skipped_truncations", 0))
        self._nonfinite_streak = int(counts.get("nonfinite_streak", 0))

    def _restore_unroll(self, saved: dict[str, Any]) -> UnrollState:
        world = self.trainer.world_size if self._trainer is not None else 1
        ranks = getattr(self, "_pending_ranks", None)
        if world > 1 or ranks is not None:
            saved_world = 1 if ranks is None else len(ranks)
            if saved_world != world:
                raise ValueError(
                    f"MetaTrainModule: the checkpoint was written by {saved_world} process(es), this run has {world}; "
                    "resume meta-training with the same number of processes (each carries its own inner runs)"
                )
            saved = ranks[self.global_rank] if ranks is not None else saved
        return self.estimator.restore_unroll(self.learned_optimizer, saved)

    def export_metadata(self) -> dict[str, Any]:
        """The metadata an exported checkpoint carries (JSON-able): the meta-training settings
        (``meta_training``: the module's own, with ``estimator`` its ``spec``), counts, the task
        family's and the estimator's class paths and init args, and the resolved CLI config.
        Checkpoints written before estimators were objects hold the estimator's name under
        ``estimator`` and its settings flat in ``meta_training``.

        Returns:
            A dict with ``meta_training``, ``meta_steps``, ``meta_updates``, ``skipped_truncations``,
            ``task_family``, ``estimator`` and ``config``.
        """
        estimator = self.estimator.spec()
        return {
            "meta_training": {**dict(self.hparams), "estimator": estimator},
            "meta_steps": int(self.global_step),
            "meta_updates": self.meta_updates,
            "skipped_truncations": self.skipped_truncations,
            "task_family": family_spec(self.task_family),
            "estimator": estimator,
            "config": self.resolved_config,
        }
