"""Meta-training inside PyTorch Lightning: a ``LightningModule`` around any fastmeta learner.

Needs the ``lightning`` package (``pip install fastmeta[lightning]``); ``import fastmeta``
never imports it.

The learner owns its update: :meth:`fastmeta.MetaLearner.meta_step` computes the
meta-gradient (second-order, first-order, Reptile's pseudo-gradient, iMAML's implicit
one) and steps the optimiser. So :class:`MetaModule` uses Lightning's manual optimisation:
each training step is exactly one ``meta_step`` with the optimiser Lightning built from
``configure_optimizers``, stepped through Lightning (so ``max_steps``, checkpoints,
precision plugins and optimiser hooks see it). Everything is reported through
``self.log``, so every Lightning logger receives it.

Example:
    >>> import lightning, torch, fastmeta
    >>> from fastmeta.lightning import MetaModule
    >>> learner = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01)
    >>> module = MetaModule(learner, optimizer=lambda params: torch.optim.Adam(params, 1e-3))
    >>> loader = fastmeta.data.BatchMetaDataLoader(
    ...     fastmeta.data.sinusoid(10, test_shots=10, seed=0, num_tasks=250), batch_size=25)
    >>> trainer = lightning.Trainer(max_steps=20, logger=False, enable_checkpointing=False,
    ...                             enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(module, loader)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

try:
    import lightning
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fastmeta.lightning needs the lightning package, which is not installed: "
        "pip install 'fastmeta[lightning]' (or pip install lightning)"
    ) from error
import torch
from torch import Tensor, nn

from . import distributed as _distributed
from ._learner import MetaLearner, MetaStepResult, check_steps
from ._task import TaskBatch
from ._tree import tree_map

__all__ = ["MetaModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

_CLIP_ALGORITHMS = ("norm", "value")


class MetaModule(lightning.LightningModule):
    """A ``LightningModule`` whose training step is one ``meta_step`` of ``learner``.

    Training: each batch (tasks from any loader fastmeta's protocol accepts, e.g.
    :class:`fastmeta.data.BatchMetaDataLoader`) is one ``learner.meta_step(batch,
    optimizer)``; ``Trainer(max_steps=n)`` runs ``n`` meta-steps. Logged per step:
    ``train/meta_loss`` (mean query loss after adaptation) and ``train/support_loss``
    (mean support loss before the first inner step).

    Validation: each batch of held-out tasks is adapted with ``eval_steps`` inner steps
    (the wrapped model is not changed) and ``val/query_loss`` is logged, with
    ``val/query_accuracy`` when the query targets are class indices; both are averaged
    over every task of the validation epoch (and over processes under DDP).

    Gradient clipping: Lightning refuses ``Trainer(gradient_clip_val=...)`` with manual
    optimisation, so the meta-gradient is clipped here, by ``gradient_clip_val`` (after
    the processes have averaged it, before the optimiser steps).

    Distributed (``Trainer(strategy="ddp")``, gloo on CPU or NCCL on GPU): the learner
    is wrapped with :func:`fastmeta.distributed.data_parallel` when training starts, so
    each process meta-trains on its batch and the meta-gradient is the mean over all
    processes' tasks, exactly as in fastmeta's own data-parallel run. With a
    :class:`fastmeta.data.BatchMetaDataLoader`, pass ``shard_batches=True`` and
    ``Trainer(use_distributed_sampler=False)``: every process reads the same seeded
    meta-batch and keeps its share (:func:`fastmeta.distributed.shard`), as ``torchrun``
    scripts do. With ``shard_batches=False`` (the default) every process trains on the
    whole batch its loader gives, e.g. a plain ``DataLoader`` that Lightning's distributed
    sampler splits between processes.

    Checkpoints: the learner's meta-parameters and buffers (``state_dict``), the
    optimiser state and the learner's count of meta-steps (which schedules such as
    MAML++'s read) are saved and restored, so a resumed run continues exactly.

    Args:
        learner: the fastmeta learner to meta-train (its ``nn.Module`` is a submodule).
        optimizer: builds the outer optimiser from the meta-parameters, e.g.
            ``lambda params: torch.optim.Adam(params, 1e-3)``.
        scheduler: builds a learning-rate schedule of that optimiser, stepped once per
            meta-step, e.g. ``lambda opt: CosineAnnealingLR(opt, T_max=max_steps)``
            (MAML++'s cosine-annealed outer rate; ``ReduceLROnPlateau`` is given the
            meta-loss); saved in checkpoints.
        eval_steps: inner steps when validating (default: the learner's ``inner_steps``).
        gradient_clip_val: clip the meta-gradient to this norm (or value); ``None`` for
            no clipping.
        gradient_clip_algorithm: ``"norm"`` (the total 2-norm, default) or ``"value"``.
        shard_batches: under DDP, keep only this process's share of each batch.

    Raises:
        TypeError: ``learner`` is not a fastmeta learner, or ``optimizer`` or ``scheduler``
            is not callable.
        ValueError: a bad ``eval_steps``, ``gradient_clip_val`` or ``gradient_clip_algorithm``.

    Example:
        >>> module = MetaModule(learner, optimizer=lambda p: torch.optim.Adam(p, 1e-3),
        ...                     gradient_clip_val=1.0)
        >>> lightning.Trainer(max_steps=1000).fit(module, train_loader, val_loader)
    """

    def __init__(
        self,
        learner: MetaLearner,
        *,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        eval_steps: int | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        shard_batches: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(learner, MetaLearner):
            raise TypeError(
                f"learner must be a fastmeta learner (fastmeta.MAML(model, inner_lr=...), "
                f"...), got {type(learner).__name__}"
            )
        if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a function that builds the outer optimiser from the "
                f"meta-parameters, got {type(optimizer).__name__}; pass e.g. "
                f"optimizer=lambda params: torch.optim.Adam(params, 1e-3)"
            )
        if scheduler is not None and not callable(scheduler):
            raise TypeError(
                f"scheduler must be a function that builds a learning-rate schedule of the "
                f"optimiser, or None, got {type(scheduler).__name__}; pass e.g. "
                f"scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)"
            )
        if gradient_clip_val is not None and (
            isinstance(gradient_clip_val, bool)
            or not isinstance(gradient_clip_val, numbers.Real)
            or not math.isfinite(gradient_clip_val)
            or gradient_clip_val <= 0
        ):
            raise ValueError(
                f"gradient_clip_val must be a finite number > 0 or None (no clipping), got "
                f"{gradient_clip_val!r}"
            )
        if gradient_clip_algorithm not in _CLIP_ALGORITHMS:
            raise ValueError(
                f"gradient_clip_algorithm must be one of {list(_CLIP_ALGORITHMS)}, got "
                f"{gradient_clip_algorithm!r}"
            )
        self.learner = learner
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.eval_steps = (
            learner.inner_steps if eval_steps is None else check_steps("eval_steps", eval_steps, 0)
        )
        self.gradient_clip_val = None if gradient_clip_val is None else float(gradient_clip_val)
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.shard_batches = bool(shard_batches)
        self.automatic_optimization = False  # the learner's meta_step steps the optimiser

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's output (with the meta-parameters, no adaptation)."""
        return self.learner(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        built = self.optimizer_factory(self.learner.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer(params) must return a torch.optim.Optimizer, got "
                f"{type(built).__name__}; pass e.g. "
                f"optimizer=lambda params: torch.optim.Adam(params, 1e-3)"
            )
        if self.scheduler_factory is None:
            return built
        schedule = self.scheduler_factory(built)
        if not isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(
                f"scheduler(optimizer) must return a torch.optim.lr_scheduler.LRScheduler, got "
                f"{type(schedule).__name__}"
            )
        # Lightning saves and restores it; training_step steps it (manual optimisation).
        return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ distributed

    def on_fit_start(self) -> None:
        # The learner averages its meta-gradient itself. DDP's own averaging stays off: with
        # manual optimisation Lightning arms DDP's reducer only in manual_backward, which
        # is never called here.
        if self.trainer.world_size > 1 and self.learner.meta_gradient_sync is None:
            _distributed.data_parallel(self.learner)

    def _local(self, batch: Any) -> Any:
        if self.shard_batches and self.trainer.world_size > 1:
            return _distributed.shard(batch)
        return batch

    # ------------------------------------------------------------------ training

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"MetaModule steps one outer optimiser over the learner's meta-parameters, but "
                f"configure_optimizers gave {len(optimizer)}; build one optimiser over "
                f"learner.parameters() (parameter groups can give parts their own settings)"
            )
        result: MetaStepResult = self.learner.meta_step(self._local(batch), optimizer)
        schedule = self.lr_schedulers()
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step(result.loss)  # on the meta-loss
        elif isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
            schedule.step()
        tasks = int(result.task_losses.shape[0])
        self.log("train/meta_loss", result.loss, prog_bar=True, batch_size=tasks)
        if result.support_losses.numel():  # learners without an inner loop have none
            self.log("train/support_loss", float(result.support_losses[:, 0].mean()),
                     batch_size=tasks)
        return torch.tensor(result.loss)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        losses, accuracies = self.evaluate(batch)
        tasks = int(losses.shape[0])
        self.log("val/query_loss", losses.mean(), batch_size=tasks, sync_dist=True)
        if accuracies is not None:
            self.log("val/query_accuracy", accuracies.mean(), batch_size=tasks, sync_dist=True)

    def evaluate(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Per-task query loss (and accuracy, for class targets) after ``eval_steps``.

        Adapts to each task's support set; the wrapped model is not changed. Works inside
        Lightning's ``torch.inference_mode`` evaluation loops.

        Returns:
            ``([tasks] query losses, [tasks] accuracies or None)``, detached, float64.
        """
        # Adaptation needs autograd, which inference mode forbids: leave it, with copies
        # of the batch made outside it.
        with torch.inference_mode(False), torch.enable_grad():
            batch = _outside_inference_mode(batch)
            task = self.learner.prepare(batch)
            adapted = self.learner.adapt_many(task, steps=self.eval_steps)
            with torch.no_grad():
                prediction = adapted(task.query_x)
                return _query_metrics(self.learner, task, prediction)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fastmeta"] = {"meta_steps_taken": self.learner.meta_steps_taken}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("fastmeta", {})
        self.learner.meta_steps_taken = int(saved.get("meta_steps_taken", 0))


def _outside_inference_mode(batch: Any) -> Any:
    """``batch`` with every tensor copied into an ordinary (autograd-capable) tensor."""
    if isinstance(batch, TaskBatch):
        return TaskBatch(*(tree_map(torch.clone, part) for part in batch))
    if isinstance(batch, Mapping):
        copied = {key: _outside_inference_mode(value) for key, value in batch.items()}
        return type(batch)(copied) if isinstance(batch, dict) else copied
    if isinstance(batch, (list, tuple)):
        return type(batch)(_outside_inference_mode(value) for value in batch)
    return batch.clone() if isinstance(batch, Tensor) else batch


def _query_metrics(
    learner: MetaLearner, task: TaskBatch, prediction: Any
) -> tuple[Tensor, Tensor | None]:
    """Query loss of each task, and accuracy where the targets are class indices."""
    target = task.query_y
    losses = torch.stack([
        learner.loss_fn(_index(prediction, t), _index(target, t)).detach()
        for t in range(task.num_tasks)
    ]).to(torch.float64)
    accuracies = None
    if (isinstance(target, Tensor) and isinstance(prediction, Tensor)
            and not target.is_floating_point() and prediction.dim() == target.dim() + 1):
        hits = prediction.argmax(dim=-1) == target
        accuracies = hits.to(torch.float64).flatten(1).mean(dim=1)
    return losses, accuracies


def _index(tree: Any, t: int) -> Any:
    return tree_map(lambda leaf: leaf[t], tree)
